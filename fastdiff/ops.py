"""Public fused ops, each registered once with torch.library in the `fastdiff` namespace.

Every op runs on the backend `backends.select` picks (Triton on CUDA, the C++ extension on CPU,
the eager reference anywhere) with the same signature, so each backend module (kernels/,
fastdiff/_cpp.py, fastdiff/eager.py) defines one function per op with exactly these arguments.

Shared conventions:
- `coefs` is one row of a `fastdiff.tables` table (float32 [WIDTH], on the sample's device).
- Noise: `noise` is used as given when not None; else normals of the Philox stream
  (`fastdiff.noise`) with key `seed`, counter = the row's TIMESTEP (steps) or 0 (q_sample), and
  global sample index = `sample_offset` + index in the batch.
- CFG: with `guidance_scale` not None, `model_output` is the [uncond; cond] batch (2B) of a
  sample batch B, combined as u + w (c - u) inside the step.
- Outputs have the sample's dtype and shape (`torch.empty_like` layout); an output not asked for
  (`write_x0=False`, ...) is an empty tensor of shape (0,).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import backends

Tensor = torch.Tensor


def _like(x: Tensor, wanted: bool = True) -> Tensor:
    return torch.empty_like(x) if wanted else x.new_empty((0,))


@torch.library.custom_op("fastdiff::ddpm_step", mutates_args=())
def ddpm_step(model_output: Tensor, sample: Tensor, coefs: Tensor, noise: Optional[Tensor], seed: int,
              sample_offset: int, prediction_type: str, variance_type: str, clip_sample_range: Optional[float],
              threshold: Optional[Tensor], guidance_scale: Optional[float], write_x0: bool) -> tuple[Tensor, Tensor]:
    """DDPM reverse step (see reference.ddpm_step). Returns (prev_sample, pred_original_sample)."""
    impl = backends.select("ddpm_step", sample)
    return impl.ddpm_step(model_output, sample, coefs, noise, seed, sample_offset, prediction_type, variance_type,
                          clip_sample_range, threshold, guidance_scale, write_x0)


@ddpm_step.register_fake
def _(model_output, sample, coefs, noise, seed, sample_offset, prediction_type, variance_type, clip_sample_range,
      threshold, guidance_scale, write_x0):
    return _like(sample), _like(sample, write_x0)


@torch.library.custom_op("fastdiff::ddim_step", mutates_args=())
def ddim_step(model_output: Tensor, sample: Tensor, coefs: Tensor, noise: Optional[Tensor], seed: int,
              sample_offset: int, prediction_type: str, eta: float, use_clipped_model_output: bool,
              clip_sample_range: Optional[float], threshold: Optional[Tensor], guidance_scale: Optional[float],
              write_x0: bool) -> tuple[Tensor, Tensor]:
    """DDIM step (see reference.ddim_step); noise is added only when eta > 0."""
    impl = backends.select("ddim_step", sample)
    return impl.ddim_step(model_output, sample, coefs, noise, seed, sample_offset, prediction_type, eta,
                          use_clipped_model_output, clip_sample_range, threshold, guidance_scale, write_x0)


@ddim_step.register_fake
def _(model_output, sample, coefs, noise, seed, sample_offset, prediction_type, eta, use_clipped_model_output,
      clip_sample_range, threshold, guidance_scale, write_x0):
    return _like(sample), _like(sample, write_x0)


@torch.library.custom_op("fastdiff::q_sample", mutates_args=())
def q_sample(x0: Tensor, timesteps: Tensor, alphas_cumprod: Tensor, noise: Optional[Tensor], seed: int,
             sample_offset: int, write_noise: bool, write_v: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Forward noising with per-sample timesteps. Returns (x_t, noise or empty, v-target or empty)."""
    impl = backends.select("q_sample", x0)
    return impl.q_sample(x0, timesteps, alphas_cumprod, noise, seed, sample_offset, write_noise, write_v)


@q_sample.register_fake
def _(x0, timesteps, alphas_cumprod, noise, seed, sample_offset, write_noise, write_v):
    return _like(x0), _like(x0, write_noise), _like(x0, write_v)


@torch.library.custom_op("fastdiff::cfg_combine", mutates_args=())
def cfg_combine(uncond: Tensor, cond: Tensor, guidance_scale: float) -> Tensor:
    """Classifier-free guidance, u + w (c - u)."""
    return backends.select("cfg_combine", cond).cfg_combine(uncond, cond, guidance_scale)


@cfg_combine.register_fake
def _(uncond, cond, guidance_scale):
    return _like(cond)
