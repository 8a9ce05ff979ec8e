"""The reference backend: `fastdiff.reference` math behind the op signatures of `fastdiff.ops`.

Runs anywhere torch runs. Where an op asks for in-kernel noise it draws the same Philox stream
(`fastdiff.noise.randn`) the fused kernels draw, with the counter read from the device row.
"""
from __future__ import annotations

import torch

from . import noise as N
from . import reference as R
from . import tables as T


def _step_noise(noise, sample, coefs, seed, sample_offset):
    if noise is not None:
        return noise
    counter = coefs[T.TIMESTEP].to(torch.int64)  # a device scalar: no sync
    return N.randn(sample.shape, seed, counter=counter, stream=N.STREAM_STEP, sample_offset=sample_offset,
                   device=sample.device)


def _output(x, like, wanted=True):
    """A fresh tensor laid out as the op's fake says (empty_like): op outputs never alias inputs."""
    return torch.empty_like(like).copy_(x) if wanted else like.new_empty((0,))


def ddpm_step(model_output, sample, coefs, noise, seed, sample_offset, prediction_type, variance_type,
              clip_sample_range, threshold, guidance_scale, write_x0):
    prev, x0 = R.ddpm_step(model_output, sample, coefs, prediction_type=prediction_type, variance_type=variance_type,
                           clip_sample_range=clip_sample_range, threshold=threshold,
                           noise=_step_noise(noise, sample, coefs, seed, sample_offset), guidance_scale=guidance_scale)
    return _output(prev, sample), _output(x0, sample, write_x0)


def ddim_step(model_output, sample, coefs, noise, seed, sample_offset, prediction_type, eta, use_clipped_model_output,
              clip_sample_range, threshold, guidance_scale, write_x0):
    step_noise = _step_noise(noise, sample, coefs, seed, sample_offset) if eta > 0 else None
    prev, x0 = R.ddim_step(model_output, sample, coefs, prediction_type=prediction_type, eta=eta,
                           use_clipped_model_output=use_clipped_model_output, clip_sample_range=clip_sample_range,
                           threshold=threshold, noise=step_noise, guidance_scale=guidance_scale)
    return _output(prev, sample), _output(x0, sample, write_x0)


def q_sample(x0, timesteps, alphas_cumprod, noise, seed, sample_offset, write_noise, write_v):
    if noise is None:
        noise = N.randn(x0.shape, seed, counter=0, stream=N.STREAM_Q_SAMPLE, sample_offset=sample_offset,
                        device=x0.device, dtype=x0.dtype)
    x_t = R.q_sample(x0, timesteps, alphas_cumprod, noise)
    v = R.v_target(x0, noise, timesteps, alphas_cumprod) if write_v else None
    return _output(x_t, x0), _output(noise, x0, write_noise), _output(v, x0, write_v)


def cfg_combine(uncond, cond, guidance_scale):
    return _output(R.cfg_combine(uncond, cond, guidance_scale), cond)
