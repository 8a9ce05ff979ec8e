"""Fused DDPM reverse step (Ho et al. 2020, eq. 6-7, Algorithm 2), one read of every input.

prev = C_X0 * clip(x0) + C_XT * x_t + std * n, with std the row's DDPM_STD for fixed variance
types, or DDPM_STD * (per-element std from the model's variance channels) for learned ones
(IDDPM eq. 15 for learned_range). Semantics: fastdiff.reference.ddpm_step / fastdiff.eager.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from fastdiff import tables as T

from . import _common as C
from ._common import (COL_SQRT_1M_ABAR, COL_SQRT_ABAR, NAN_ALL, STREAM_STEP, clip_x0, load_prediction,
                      philox_normals, predict_x0, sample_offsets, step_counter, to_storage)

COL_C_X0 = tl.constexpr(T.DDPM_C_X0)
COL_C_XT = tl.constexpr(T.DDPM_C_XT)
COL_STD = tl.constexpr(T.DDPM_STD)
COL_MIN_LOG = tl.constexpr(T.DDPM_MIN_LOG)
COL_MAX_LOG = tl.constexpr(T.DDPM_MAX_LOG)
VAR_FIXED = tl.constexpr(T.VAR_FIXED)
VAR_LEARNED = tl.constexpr(T.VAR_LEARNED)


@triton.jit
def _noise_std(mo_ptr, var_off, mask, coefs_ptr, VAR_MODE: tl.constexpr):
    """std of the added noise: the row's scalar, or per element from the variance channels."""
    std = tl.load(coefs_ptr + COL_STD)
    if VAR_MODE != VAR_FIXED:
        v = tl.load(mo_ptr + var_off, mask=mask, other=0.0).to(tl.float32)
        if VAR_MODE == VAR_LEARNED:  # the model outputs the variance; clamp at 0 (NaN policy)
            std = std * tl.sqrt_rn(tl.maximum(v, 0.0, propagate_nan=NAN_ALL))
        else:  # learned_range, IDDPM eq. 15: interpolate the log-variance between its bounds
            frac = (v + 1.0) / 2.0
            log_var = frac * tl.load(coefs_ptr + COL_MAX_LOG) + (1.0 - frac) * tl.load(coefs_ptr + COL_MIN_LOG)
            std = std * tl.exp(0.5 * log_var)
    return std


@triton.jit(do_not_specialize=["seed", "sample_offset", "b0"])
def _ddpm_step_kernel(mo_ptr, x_ptr, coefs_ptr, noise_ptr, thr_ptr, prev_ptr, x0_ptr,
                      per_sample, mo_stride, cond_base, sample_offset, seed, clip_range, guidance_scale, b0,
                      PRED: tl.constexpr, VAR_MODE: tl.constexpr, HAS_NOISE: tl.constexpr, HAS_CLIP: tl.constexpr,
                      HAS_THRESHOLD: tl.constexpr, CFG: tl.constexpr, WRITE_X0: tl.constexpr, BLOCK: tl.constexpr):
    b = b0 + tl.program_id(1)
    q, elem, off, mask = sample_offsets(tl.program_id(0), b, per_sample, BLOCK)
    mo_off = b.to(tl.int64) * mo_stride + elem  # prediction channels; variance follows at + per_sample
    x = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
    m = load_prediction(mo_ptr, mo_off, cond_base, mask, guidance_scale, CFG)
    x0 = predict_x0(m, x, tl.load(coefs_ptr + COL_SQRT_ABAR), tl.load(coefs_ptr + COL_SQRT_1M_ABAR), PRED)
    x0 = clip_x0(x0, clip_range, thr_ptr, b, HAS_CLIP, HAS_THRESHOLD)
    prev = tl.load(coefs_ptr + COL_C_X0) * x0 + tl.load(coefs_ptr + COL_C_XT) * x  # posterior mean, DDPM eq. 7
    if HAS_NOISE:
        n = tl.load(noise_ptr + off, mask=mask, other=0.0).to(tl.float32)
    else:
        n = philox_normals(seed, q, sample_offset.to(tl.int64) + b, step_counter(coefs_ptr), STREAM_STEP)
    # with CFG the variance channels come from the conditional half (reference.split_model_output)
    prev += _noise_std(mo_ptr, cond_base + mo_off + per_sample, mask, coefs_ptr, VAR_MODE) * n
    tl.store(prev_ptr + off, to_storage(prev, prev_ptr), mask=mask)
    if WRITE_X0:
        tl.store(x0_ptr + off, to_storage(x0, x0_ptr), mask=mask)


def model_output_layout(model_output: torch.Tensor, sample: torch.Tensor, learned: bool,
                        guidance_scale: Optional[float]) -> tuple[int, int]:
    """Check model_output's shape; return (per-sample stride, offset of the cond half) in elements."""
    batch, rest = sample.shape[0], tuple(sample.shape[1:])
    if learned and sample.dim() < 2:
        raise ValueError(f"learned variance needs a channel dimension; sample has shape {tuple(sample.shape)}")
    channels = rest[:1] if not learned else (2 * sample.shape[1],)
    rows = 2 * batch if guidance_scale is not None else batch
    why = (" (2x the sample's channels: [prediction; variance])" if learned else "") + \
          (" ([uncond; cond] batch of CFG)" if guidance_scale is not None else "")
    C.check_shape("model_output", model_output, (rows, *channels, *rest[1:]), why)
    stride = C.per_sample_size(sample) * (2 if learned else 1)
    return stride, (batch * stride if guidance_scale is not None else 0)


def ddpm_step(model_output: torch.Tensor, sample: torch.Tensor, coefs: torch.Tensor, noise: Optional[torch.Tensor],
              seed: int, sample_offset: int, prediction_type: str, variance_type: str,
              clip_sample_range: Optional[float], threshold: Optional[torch.Tensor], guidance_scale: Optional[float],
              write_x0: bool, *, out: Optional[torch.Tensor] = None,
              x0_out: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """fastdiff.ops.ddpm_step on the Triton kernel. `out` / `x0_out` reuse buffers (out=sample: in place)."""
    C.check_tensor("sample", sample)
    dev = sample.device
    C.check_tensor("model_output", model_output, dev)
    C.check_choice("prediction_type", prediction_type, T.PREDICTION_TYPES)
    C.check_choice("variance_type", variance_type, T.VARIANCE_TYPES)
    var_mode = T.variance_mode(variance_type)
    mo_stride, cond_base = model_output_layout(model_output, sample, var_mode != T.VAR_FIXED, guidance_scale)
    if noise is not None:
        C.check_tensor("noise", noise, dev)
        C.check_shape("noise", noise, sample.shape, " (the sample's shape)")
    coefs = C.check_coefs(coefs, dev)
    threshold = C.check_threshold(threshold, sample.shape[0], dev)
    prev = C.output(sample, out)
    x0 = C.output(sample, x0_out, "x0_out") if write_x0 else sample.new_empty((0,))
    prev_buf, x0_buf = C.writable(prev), (C.writable(x0) if write_x0 else prev)
    x, mo = sample.contiguous(), model_output.contiguous()
    C.launch_per_sample(
        _ddpm_step_kernel, sample.shape[0], C.per_sample_size(sample), dev,
        mo, x, coefs, noise.contiguous() if noise is not None else x, threshold if threshold is not None else coefs,
        prev_buf, x0_buf, C.per_sample_size(sample), mo_stride, cond_base, int(sample_offset),
        C.kernel_seed(seed, noise), float(clip_sample_range or 0.0), float(guidance_scale or 0.0),
        PRED=T.prediction_code(prediction_type), VAR_MODE=var_mode, HAS_NOISE=noise is not None,
        HAS_CLIP=clip_sample_range is not None, HAS_THRESHOLD=threshold is not None,
        CFG=guidance_scale is not None, WRITE_X0=write_x0)
    C.finish(prev, prev_buf)
    return prev, (C.finish(x0, x0_buf) if write_x0 else x0)

