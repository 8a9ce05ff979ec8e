"""The reference backend: `fastdiff.reference` math behind the backend signatures of `fastdiff.ops`.

Runs anywhere torch runs (the meta device included). Where a call asks for in-kernel noise it
draws the same Philox stream (`fastdiff.noise.randn`) the fused kernels draw, with the counter
read from the device row: no host synchronisation anywhere.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import noise as N
from . import reference as R
from . import tables as T

Tensor = torch.Tensor


def history_slots(row: Tensor, columns, num_slots: int) -> Tensor:
    """History slot indices named by the row (int64, clamped into the buffer: a NaN row reads slot 0).
    `columns` are consecutive: a slice, since indexing with a list copies it to the device (no capture)."""
    slots = torch.nan_to_num(row[columns[0]:columns[0] + len(columns)], nan=0.0).to(torch.int64)
    return slots.clamp(0, max(num_slots - 1, 0))


def _noise(noise: Optional[Tensor], seed: Optional[int], row: Tensor, sample: Tensor, sample_offset: int):
    if noise is not None or seed is None:
        return noise
    counter = torch.nan_to_num(row[T.NOISE_COUNTER], nan=0.0).to(torch.int64)  # a device scalar: no sync
    return N.randn(sample.shape, seed, counter=counter, stream=N.STREAM_STEP, sample_offset=sample_offset,
                   device=sample.device)


def step(model_output: Tensor, sample: Tensor, table: Tensor, index: Tensor, history: Tensor, out: Tensor,
         x0_out: Optional[Tensor], noise: Optional[Tensor], seed: Optional[int], sample_offset: int,
         guidance_scale: Optional[float], guidance_extra: Optional[Tensor], extra_scale: float, variance: int,
         clip_range: Optional[float], threshold: Optional[Tensor], history_reads: int, write_history: bool,
         write_out2: bool, advance: bool) -> None:
    row = T.gather_row(table, index)
    reads = history.index_select(0, history_slots(row, T.READ_SLOT[:history_reads], history.shape[0])) \
        if history_reads else ()
    result = R.step(model_output, sample, row, tuple(reads), _noise(noise, seed, row, sample, sample_offset),
                    guidance_scale=guidance_scale, guidance_extra=guidance_extra, extra_scale=extra_scale,
                    variance=variance, clip_range=clip_range, threshold=threshold, write_out2=write_out2,
                    write_history=write_history)
    for written, value, column in ((write_out2, result.out2, T.OUT2_SLOT), (write_history, result.hist, T.HIST_SLOT)):
        if written:  # reads above are copies: a slot read and written by one row would still be safe
            history.index_copy_(0, history_slots(row, (column,), history.shape[0]), value.to(history.dtype)[None])
    out.copy_(result.prev)
    if x0_out is not None:
        x0_out.copy_(result.x0)
    if advance:
        index.add_(1)


def q_sample(x0: Tensor, table: Tensor, index: Tensor, noise: Optional[Tensor], seed: int, sample_offset: int,
             x_t: Tensor, target: Optional[Tensor], noise_out: Optional[Tensor]) -> None:
    if noise is None:  # drawn in x0's dtype: x_t is made of exactly the noise returned
        noise = N.randn(x0.shape, seed, counter=0, stream=N.STREAM_Q_SAMPLE, sample_offset=sample_offset,
                        device=x0.device, dtype=x0.dtype)
    rows = table.index_select(0, T.row_index(index, table.shape[0]))
    noisy, regression_target = R.q_sample(x0, rows, noise)
    x_t.copy_(noisy)
    if target is not None:
        target.copy_(regression_target)
    if noise_out is not None:
        noise_out.copy_(noise)


def cfg_combine(uncond: Tensor, cond: Tensor, guidance_scale: float) -> Tensor:
    return torch.empty_like(cond).copy_(R.cfg_combine(uncond, cond, guidance_scale))
