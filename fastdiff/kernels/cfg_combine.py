"""Classifier-free guidance as one elementwise kernel (Ho & Salimans 2022, eq. 6): u + w (c - u).

For a guided step prefer the `guidance_scale` argument of the step op, which fuses this
into the step and saves a round trip of the guided prediction through memory.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common as C
from ._common import to_storage


@triton.jit
def _cfg_combine_kernel(u_ptr, c_ptr, out_ptr, numel, guidance_scale, BLOCK: tl.constexpr):
    off = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # int64: numel may pass 2^31
    mask = off < numel
    u = tl.load(u_ptr + off, mask=mask, other=0.0).to(tl.float32)
    c = tl.load(c_ptr + off, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + off, to_storage(u + guidance_scale * (c - u), out_ptr), mask=mask)


def cfg_combine(uncond: torch.Tensor, cond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """fastdiff.ops.cfg_combine on the Triton kernel (the backend signature); the result has cond's dtype
    and layout."""
    C.check_tensor("cond", cond)
    C.check_tensor("uncond", uncond, cond.device)
    C.check_shape("uncond", uncond, cond.shape, " (cond's shape)")
    result = torch.empty_like(cond)
    buf = C.writable(result)
    if cond.numel():
        with C.device_guard(cond.device):
            _cfg_combine_kernel[(triton.cdiv(cond.numel(), C.BLOCK),)](
                uncond.contiguous(), cond.contiguous(), buf, cond.numel(), float(guidance_scale),
                BLOCK=C.BLOCK, num_warps=C.NUM_WARPS)
    return C.finish(result, buf)
