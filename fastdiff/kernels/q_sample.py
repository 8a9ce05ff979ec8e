"""Fused forward noising for training, one q-sample row per sample (fastdiff.tables, Q_*):

    x_t    = Q_A x0 + Q_B n        (DDPM eq. 4 and its relatives: flow matching, EDM, ...)
    target = Q_P x0 + Q_Q n        (the regression target: eps, v (Salimans & Ho 2022, sec. 4), flow, x0)

Row index[b] of the [R, Q_WIDTH] table is gathered in the kernel (an index outside [0, R - 1)
reads the NaN sentinel row R - 1: NaN, never an out-of-bounds read, no host sync). The noise is
given, or drawn in the kernel (Philox, counter 0, stream STREAM_Q_SAMPLE) and rounded to x0's
storage dtype before use, so x_t is made of exactly the noise written to `noise_out`.
Semantics: fastdiff/eager.py q_sample; signature: fastdiff/ops.py.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from fastdiff import noise as N
from fastdiff import tables as T

from . import _common as C
from ._common import STREAM_Q_SAMPLE, philox_normals, row_pointer, sample_offsets, to_storage

Q_WIDTH = tl.constexpr(T.Q_WIDTH)
COL_A, COL_B, COL_P, COL_Q = tl.constexpr(T.Q_A), tl.constexpr(T.Q_B), tl.constexpr(T.Q_P), tl.constexpr(T.Q_Q)


@triton.jit(do_not_specialize=["num_rows", "sample_offset", "seed", "b0"],
            do_not_specialize_on_alignment=["table_ptr", "index_ptr"])  # per-call values; read once per program
def _q_sample_kernel(x0_ptr, table_ptr, index_ptr, noise_ptr, xt_ptr, target_ptr, noise_out_ptr,
                     per_sample, num_rows, sample_offset: tl.int64, seed: tl.int64, b0,
                     HAS_NOISE: tl.constexpr, WRITE_TARGET: tl.constexpr, WRITE_NOISE: tl.constexpr,
                     BLOCK: tl.constexpr):
    b = b0 + tl.program_id(1)
    q, _, off, mask = sample_offsets(tl.program_id(0), b, per_sample, BLOCK)
    row = row_pointer(table_ptr, tl.load(index_ptr + b), num_rows, Q_WIDTH)
    x0 = tl.load(x0_ptr + off, mask=mask, other=0.0).to(tl.float32)
    if HAS_NOISE:
        n = tl.load(noise_ptr + off, mask=mask, other=0.0).to(tl.float32)
    else:  # rounded to x0's storage dtype first: x_t is made of exactly the noise returned
        n = philox_normals(seed, q, sample_offset.to(tl.int64) + b, 0, STREAM_Q_SAMPLE)
        n = to_storage(n, x0_ptr).to(tl.float32)
    tl.store(xt_ptr + off, to_storage(tl.load(row + COL_A) * x0 + tl.load(row + COL_B) * n, xt_ptr), mask=mask)
    if WRITE_TARGET:
        target = tl.load(row + COL_P) * x0 + tl.load(row + COL_Q) * n
        tl.store(target_ptr + off, to_storage(target, target_ptr), mask=mask)
    if WRITE_NOISE:
        tl.store(noise_out_ptr + off, to_storage(n, noise_out_ptr), mask=mask)


def q_sample(x0: torch.Tensor, table: torch.Tensor, index: torch.Tensor, noise: Optional[torch.Tensor], seed: int,
             sample_offset: int, x_t: torch.Tensor, target: Optional[torch.Tensor],
             noise_out: Optional[torch.Tensor]) -> None:
    """fastdiff.ops' backend `q_sample` on the Triton kernel: writes x_t, and target / noise_out when given."""
    C.check_tensor("x0", x0)
    dev = x0.device
    table = C.check_table("table", table, dev, T.Q_WIDTH, "q-sample rows of fastdiff.tables.q_sample_table")
    index = C.check_index("index", index, dev, x0.shape[0] if x0.dim() else 1, "one table row per sample")
    sample_offset = C.check_int("sample_offset", sample_offset, 0)
    if noise is not None:
        C.check_tensor("noise", noise, dev)
        C.check_shape("noise", noise, x0.shape, " (x0's shape)")
        seed = 0  # an explicit noise ignores the seed
    else:
        seed = N.check_seed(seed)
    if x_t is None:
        raise TypeError("x_t must be a tensor like x0 (q_sample writes the noised sample into it), got None")
    outputs = [(x_t, "x_t"), (target, "target"), (noise_out, "noise_out")]
    results = [C.output(x0, t, name) if t is not None else None for t, name in outputs]
    buffers = [C.writable(t) if t is not None else None for t in results]
    per_sample = C.per_sample_size(x0)
    C.launch_per_sample(
        _q_sample_kernel, x0.shape[0], per_sample, dev,
        x0.contiguous(), table, index, noise.contiguous() if noise is not None else None, *buffers,
        per_sample, table.shape[0], sample_offset, seed,
        HAS_NOISE=noise is not None, WRITE_TARGET=target is not None, WRITE_NOISE=noise_out is not None)
    for result, buffer in zip(results, buffers):
        if result is not None:
            C.finish(result, buffer)
