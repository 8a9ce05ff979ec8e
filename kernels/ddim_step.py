"""Fused DDIM step (Song et al. 2021, eq. 12; sigma from eq. 16 scaled by eta).

prev = sqrt(abar_prev) clip(x0) + sqrt(max(1 - abar_prev - std^2, 0)) eps + std n, std = eta sigma_t;
the noise term only when eta > 0. Semantics: fastdiff.reference.ddim_step / fastdiff.eager.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from fastdiff import tables as T

from . import _common as C
from ._common import (COL_SQRT_1M_ABAR, COL_SQRT_ABAR, NAN_ALL, STREAM_STEP, clip_x0, load_prediction,
                      philox_normals, predict_eps, predict_x0, sample_offsets, step_counter, to_storage)
from .ddpm_step import model_output_layout

COL_SQRT_ABAR_PREV = tl.constexpr(T.DDIM_SQRT_ABAR_PREV)
COL_1M_ABAR_PREV = tl.constexpr(T.DDIM_1M_ABAR_PREV)
COL_SIGMA = tl.constexpr(T.DDIM_SIGMA)


@triton.jit(do_not_specialize=["seed", "sample_offset", "b0"])
def _ddim_step_kernel(mo_ptr, x_ptr, coefs_ptr, noise_ptr, thr_ptr, prev_ptr, x0_ptr,
                      per_sample, cond_base, sample_offset, seed, eta, clip_range, guidance_scale, b0,
                      PRED: tl.constexpr, ADD_NOISE: tl.constexpr, HAS_NOISE: tl.constexpr,
                      USE_CLIPPED: tl.constexpr, HAS_CLIP: tl.constexpr, HAS_THRESHOLD: tl.constexpr,
                      CFG: tl.constexpr, WRITE_X0: tl.constexpr, BLOCK: tl.constexpr):
    b = b0 + tl.program_id(1)
    q, _, off, mask = sample_offsets(tl.program_id(0), b, per_sample, BLOCK)
    sqrt_abar = tl.load(coefs_ptr + COL_SQRT_ABAR)
    sqrt_1m_abar = tl.load(coefs_ptr + COL_SQRT_1M_ABAR)
    x = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
    m = load_prediction(mo_ptr, off, cond_base, mask, guidance_scale, CFG)
    x0 = predict_x0(m, x, sqrt_abar, sqrt_1m_abar, PRED)
    x0 = clip_x0(x0, clip_range, thr_ptr, b, HAS_CLIP, HAS_THRESHOLD)
    if USE_CLIPPED:  # re-derive eps from the clipped x0 (diffusers' use_clipped_model_output)
        eps = (x - sqrt_abar * x0) / sqrt_1m_abar
    else:
        eps = predict_eps(m, x, sqrt_abar, sqrt_1m_abar, PRED)
    std = eta * tl.load(coefs_ptr + COL_SIGMA)
    # "direction pointing to x_t", DDIM eq. 12; clamped at 0 for eta > 1 (NaN policy)
    direction = tl.sqrt_rn(tl.maximum(tl.load(coefs_ptr + COL_1M_ABAR_PREV) - std * std, 0.0,
                                      propagate_nan=NAN_ALL))
    prev = tl.load(coefs_ptr + COL_SQRT_ABAR_PREV) * x0 + direction * eps
    if ADD_NOISE:
        if HAS_NOISE:
            n = tl.load(noise_ptr + off, mask=mask, other=0.0).to(tl.float32)
        else:
            n = philox_normals(seed, q, sample_offset.to(tl.int64) + b, step_counter(coefs_ptr), STREAM_STEP)
        prev += std * n
    tl.store(prev_ptr + off, to_storage(prev, prev_ptr), mask=mask)
    if WRITE_X0:
        tl.store(x0_ptr + off, to_storage(x0, x0_ptr), mask=mask)


def ddim_step(model_output: torch.Tensor, sample: torch.Tensor, coefs: torch.Tensor, noise: Optional[torch.Tensor],
              seed: int, sample_offset: int, prediction_type: str, eta: float, use_clipped_model_output: bool,
              clip_sample_range: Optional[float], threshold: Optional[torch.Tensor], guidance_scale: Optional[float],
              write_x0: bool, *, out: Optional[torch.Tensor] = None,
              x0_out: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """fastdiff.ops.ddim_step on the Triton kernel. `out` / `x0_out` reuse buffers (out=sample: in place)."""
    C.check_tensor("sample", sample)
    dev = sample.device
    C.check_tensor("model_output", model_output, dev)
    C.check_choice("prediction_type", prediction_type, T.PREDICTION_TYPES)
    if not eta >= 0:
        raise ValueError(f"eta must be >= 0, got {eta!r}")
    _, cond_base = model_output_layout(model_output, sample, False, guidance_scale)
    add_noise = eta > 0
    if noise is not None and add_noise:
        C.check_tensor("noise", noise, dev)
        C.check_shape("noise", noise, sample.shape, " (the sample's shape)")
    noise = noise if add_noise else None  # eta == 0: deterministic, any noise is unused
    coefs = C.check_coefs(coefs, dev)
    threshold = C.check_threshold(threshold, sample.shape[0], dev)
    prev = C.output(sample, out)
    x0 = C.output(sample, x0_out, "x0_out") if write_x0 else sample.new_empty((0,))
    prev_buf, x0_buf = C.writable(prev), (C.writable(x0) if write_x0 else prev)
    x, mo = sample.contiguous(), model_output.contiguous()
    per_sample = C.per_sample_size(sample)
    C.launch_per_sample(
        _ddim_step_kernel, sample.shape[0], per_sample, dev,
        mo, x, coefs, noise.contiguous() if noise is not None else x, threshold if threshold is not None else coefs,
        prev_buf, x0_buf, per_sample, cond_base, int(sample_offset),
        C.kernel_seed(seed, noise) if add_noise else 0, float(eta), float(clip_sample_range or 0.0),
        float(guidance_scale or 0.0),
        PRED=T.prediction_code(prediction_type), ADD_NOISE=add_noise, HAS_NOISE=noise is not None,
        USE_CLIPPED=bool(use_clipped_model_output), HAS_CLIP=clip_sample_range is not None,
        HAS_THRESHOLD=threshold is not None, CFG=guidance_scale is not None, WRITE_X0=write_x0)
    C.finish(prev, prev_buf)
    return prev, (C.finish(x0, x0_buf) if write_x0 else x0)
