"""Fused forward noising with per-sample timesteps (DDPM eq. 4), for training.

x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) n, with abar_t gathered from the fp32 table inside the
kernel (no host sync); optionally writes n and the v-target v = sqrt(abar_t) n - sqrt(1 - abar_t) x0
(Salimans & Ho 2022, sec. 4). A timestep outside the table gives NaN (never an out-of-bounds read).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import _common as C
from ._common import STREAM_Q_SAMPLE, philox_normals, sample_offsets, to_storage


@triton.jit(do_not_specialize=["seed", "sample_offset", "b0"])
def _q_sample_kernel(x0_ptr, t_ptr, abar_ptr, noise_ptr, xt_ptr, noise_out_ptr, v_ptr,
                     per_sample, num_timesteps, sample_offset, seed, b0,
                     HAS_NOISE: tl.constexpr, WRITE_NOISE: tl.constexpr, WRITE_V: tl.constexpr,
                     BLOCK: tl.constexpr):
    b = b0 + tl.program_id(1)
    q, _, off, mask = sample_offsets(tl.program_id(0), b, per_sample, BLOCK)
    t = tl.load(t_ptr + b).to(tl.int64)
    valid = (t >= 0) & (t < num_timesteps)
    abar = tl.where(valid, tl.load(abar_ptr + tl.where(valid, t, 0)), float("nan"))
    a, s = tl.sqrt_rn(abar), tl.sqrt_rn(1.0 - abar)
    x0 = tl.load(x0_ptr + off, mask=mask, other=0.0).to(tl.float32)
    if HAS_NOISE:
        n = tl.load(noise_ptr + off, mask=mask, other=0.0).to(tl.float32)
    else:  # rounded to the storage dtype first: x_t is made of exactly the noise we return
        n = philox_normals(seed, q, sample_offset.to(tl.int64) + b, 0, STREAM_Q_SAMPLE)
        n = to_storage(n, xt_ptr).to(tl.float32)
    tl.store(xt_ptr + off, to_storage(a * x0 + s * n, xt_ptr), mask=mask)  # DDPM eq. 4
    if WRITE_NOISE:
        tl.store(noise_out_ptr + off, to_storage(n, noise_out_ptr), mask=mask)
    if WRITE_V:
        tl.store(v_ptr + off, to_storage(a * n - s * x0, v_ptr), mask=mask)


def q_sample(x0: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, noise: Optional[torch.Tensor],
             seed: int, sample_offset: int, write_noise: bool, write_v: bool, *,
             out: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fastdiff.ops.q_sample on the Triton kernel. Returns (x_t, noise or (0,), v or (0,))."""
    C.check_tensor("x0", x0)
    dev = x0.device
    C.check_tensor("timesteps", timesteps, dev, dtypes=(torch.int64, torch.int32))
    C.check_shape("timesteps", timesteps, (x0.shape[0],), " (one timestep per sample)")
    C.check_tensor("alphas_cumprod", alphas_cumprod, dev, dtypes=(torch.float32,))
    if alphas_cumprod.dim() != 1:
        raise ValueError(f"alphas_cumprod must be 1-D [num_train_timesteps], got shape {tuple(alphas_cumprod.shape)}")
    if noise is not None:
        C.check_tensor("noise", noise, dev)
        C.check_shape("noise", noise, x0.shape, " (x0's shape)")
    xt = C.output(x0, out)
    noise_out = torch.empty_like(x0) if write_noise else x0.new_empty((0,))
    v = torch.empty_like(x0) if write_v else x0.new_empty((0,))
    bufs = [C.writable(xt), C.writable(noise_out) if write_noise else xt, C.writable(v) if write_v else xt]
    per_sample = C.per_sample_size(x0)
    C.launch_per_sample(
        _q_sample_kernel, x0.shape[0], per_sample, dev,
        x0.contiguous(), timesteps.contiguous(), alphas_cumprod.contiguous(),
        noise.contiguous() if noise is not None else x0, *bufs, per_sample, alphas_cumprod.shape[0],
        int(sample_offset), C.kernel_seed(seed, noise),
        HAS_NOISE=noise is not None, WRITE_NOISE=write_noise, WRITE_V=write_v)
    C.finish(xt, bufs[0])
    return xt, (C.finish(noise_out, bufs[1]) if write_noise else noise_out), (C.finish(v, bufs[2]) if write_v else v)
