"""The generic step of every sampler (DESIGN "The step engine") as one fused Triton kernel.

Per element exactly fastdiff.reference.step, term by term and in its order (sums left to right),
so fp32 results differ from the reference only by FMA contraction (row columns: fastdiff.tables):

    m    = c | u + w (c - u) | u + w (c - u) + w2 (c - e)      guidance: none / CFG / CFG + extra term
    x    = sample + PRE_NOISE n                                when the step has noise
    x0   = clip((X0_X x + X0_M m) X0_SCALE)                    clip range: clamp; threshold s: clamp to [-s, s], / s
    out  = OUT_X x + OUT_M m + OUT_X0 x0 + sum_k OUT_H[k] h_k (+ std n)            -> out
    out2 = OUT2_X x + OUT2_M m + OUT2_X0 x0 + sum_k OUT2_H[k] h_k                  -> history[OUT2_SLOT]
    hist = HIST_X x + HIST_M m + HIST_X0 x0                                        -> history[HIST_SLOT]

std = NOISE_STD, NOISE_STD sqrt(max(v, 0)) or NOISE_STD exp(VAR_BIAS + VAR_SLOPE v) by variance
mode, v the model's variance channels (of the conditional half under CFG). The kernel gathers its
row from the table at the device index (an index outside [0, R - 1) reads the NaN sentinel row),
reads history slot numbers from the row (clamped into the buffer: a NaN row cannot read or write
out of bounds), and draws its Philox noise itself: no host synchronisation anywhere.
Semantics: fastdiff/eager.py (the reference backend), signature: fastdiff/ops.py.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from fastdiff import noise as N
from fastdiff import tables as T

from . import _common as C
from ._common import NAN_ALL, STREAM_STEP, nan_to_zero, philox_normals, row_pointer, sample_offsets, to_storage

Tensor = torch.Tensor


# ---- row columns as constexprs (values from fastdiff.tables, never repeated here) ---------------
def _first_of_run(columns: tuple[int, ...], name: str) -> tl.constexpr:
    """The first of consecutive columns: the kernel reads column k of the run as first + k."""
    if tuple(columns) != tuple(range(columns[0], columns[0] + len(columns))):
        raise ImportError(f"fastdiff.tables.{name} = {columns} is not a run of consecutive columns; "
                          "fastdiff/kernels/step.py reads it as first + k")
    return tl.constexpr(columns[0])


WIDTH = tl.constexpr(T.WIDTH)
COL_NOISE_COUNTER = tl.constexpr(T.NOISE_COUNTER)
COL_X0_X, COL_X0_M, COL_X0_SCALE = tl.constexpr(T.X0_X), tl.constexpr(T.X0_M), tl.constexpr(T.X0_SCALE)
COL_PRE_NOISE = tl.constexpr(T.PRE_NOISE)
COL_OUT_X, COL_OUT_M, COL_OUT_X0 = tl.constexpr(T.OUT_X), tl.constexpr(T.OUT_M), tl.constexpr(T.OUT_X0)
COL_OUT_H = _first_of_run(T.OUT_H, "OUT_H")
COL_NOISE_STD = tl.constexpr(T.NOISE_STD)
COL_OUT2_X, COL_OUT2_M, COL_OUT2_X0 = tl.constexpr(T.OUT2_X), tl.constexpr(T.OUT2_M), tl.constexpr(T.OUT2_X0)
COL_OUT2_H = _first_of_run(T.OUT2_H, "OUT2_H")
COL_HIST_X, COL_HIST_M, COL_HIST_X0 = tl.constexpr(T.HIST_X), tl.constexpr(T.HIST_M), tl.constexpr(T.HIST_X0)
COL_READ_SLOT = _first_of_run(T.READ_SLOT, "READ_SLOT")
COL_HIST_SLOT, COL_OUT2_SLOT = tl.constexpr(T.HIST_SLOT), tl.constexpr(T.OUT2_SLOT)
COL_VAR_BIAS, COL_VAR_SLOPE = tl.constexpr(T.VAR_BIAS), tl.constexpr(T.VAR_SLOPE)
VAR_FIXED, VAR_SQRT, VAR_EXP = tl.constexpr(T.VAR_FIXED), tl.constexpr(T.VAR_SQRT), tl.constexpr(T.VAR_EXP)

# ---- the kernel's constexpr modes (launcher value, kernel constexpr) ------------------------------
GUIDANCE_NONE, GUIDANCE_CFG, GUIDANCE_CFG_EXTRA = 0, 1, 2  # CFG: m = c | u + w (c - u) | ... + w2 (c - e)
NOISE_NONE, NOISE_GIVEN, NOISE_PHILOX = 0, 1, 2  # the step's noise: none, a tensor, in-kernel Philox
CLIP_NONE, CLIP_RANGE, CLIP_THRESHOLD = 0, 1, 2  # x0: as is, clamp(-r, r), clamp(-s, s) / s
_CFG_EXTRA = tl.constexpr(GUIDANCE_CFG_EXTRA)
_NOISE_NONE, _NOISE_GIVEN = tl.constexpr(NOISE_NONE), tl.constexpr(NOISE_GIVEN)
_CLIP_RANGE, _CLIP_THRESHOLD = tl.constexpr(CLIP_RANGE), tl.constexpr(CLIP_THRESHOLD)
_GUIDANCE_NONE = tl.constexpr(GUIDANCE_NONE)


@triton.jit
def _slot(row, column, num_slots):
    """History slot named by a row (a float): NaN -> 0, clamped into [0, num_slots), as an int64."""
    s = tl.minimum(tl.maximum(nan_to_zero(tl.load(row + column)), 0.0), tl.maximum(num_slots - 1, 0).to(tl.float32))
    return s.to(tl.int64)


# Not specialised: per-call values (one compiled kernel for every seed, offset, table and history
# size) and the pointers read once per program (the row, the index: a view of a device arange whose
# alignment changes with the step; the threshold), which gain nothing from alignment.
@triton.jit(do_not_specialize=["num_rows", "num_slots", "sample_offset", "b0"],
            do_not_specialize_on_alignment=["table_ptr", "index_ptr", "thr_ptr", "seed_ptr"])
def _step_kernel(mo_ptr, x_ptr, table_ptr, index_ptr, hist_ptr, out_ptr, x0_ptr, noise_ptr, thr_ptr, extra_ptr,
                 seed_ptr, per_sample, mo_stride, cond_base: tl.int64, extra_stride, slot_stride: tl.int64, num_rows,
                 num_slots, sample_offset: tl.int64, guidance_scale, extra_scale, clip_range, b0,
                 CFG: tl.constexpr, VAR_MODE: tl.constexpr, NOISE: tl.constexpr, CLIP: tl.constexpr,
                 HISTORY_READS: tl.constexpr, WRITE_HISTORY: tl.constexpr, WRITE_OUT2: tl.constexpr,
                 WRITE_X0: tl.constexpr, BLOCK: tl.constexpr):
    b = b0 + tl.program_id(1)
    q, elem, off, mask = sample_offsets(tl.program_id(0), b, per_sample, BLOCK)
    row = row_pointer(table_ptr, tl.load(index_ptr), num_rows, WIDTH)  # the row gather, on the device
    mo_off = b.to(tl.int64) * mo_stride + elem  # prediction channels; variance channels at + per_sample

    # every store comes last: `out` may be `sample` itself (an in-place step reads before it writes)
    x = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
    c = tl.load(mo_ptr + cond_base + mo_off, mask=mask, other=0.0).to(tl.float32)
    m = c
    if CFG != _GUIDANCE_NONE:  # Ho & Salimans 2022, eq. 6; [uncond; cond] batch
        u = tl.load(mo_ptr + mo_off, mask=mask, other=0.0).to(tl.float32)
        m = u + guidance_scale * (c - u)
        if CFG == _CFG_EXTRA:  # SD3 skip-layer guidance: + w2 (c - e), e = guidance_extra's first C channels
            e = tl.load(extra_ptr + b.to(tl.int64) * extra_stride + elem, mask=mask, other=0.0).to(tl.float32)
            m = m + extra_scale * (c - e)
    if NOISE != _NOISE_NONE:
        pre = tl.load(row + COL_PRE_NOISE)
        std = tl.load(row + COL_NOISE_STD)
        if VAR_MODE != VAR_FIXED:  # the model's variance channels, from the conditional half
            v = tl.load(mo_ptr + cond_base + mo_off + per_sample, mask=mask, other=0.0).to(tl.float32)
        if NOISE == _NOISE_GIVEN:
            n = tl.load(noise_ptr + off, mask=mask, other=0.0).to(tl.float32)
        else:
            seed = tl.load(seed_ptr)  # the Philox key, read at run time (a captured graph serves every seed)
            counter = nan_to_zero(tl.load(row + COL_NOISE_COUNTER)).to(tl.int64)  # exact below 2^24
            sample = sample_offset.to(tl.int64) + b  # the global sample index
            if VAR_MODE == VAR_FIXED:
                n = tl.zeros((BLOCK // 4, 4), tl.float32)
                if (pre != 0.0) | (std != 0.0):  # a scalar branch: a step without noise draws none
                    n = philox_normals(seed, q, sample, counter, STREAM_STEP)
            else:
                n = philox_normals(seed, q, sample, counter, STREAM_STEP)
        x = x + pre * n

    # x0: the prediction type as numbers, then clipping or dynamic thresholding (Imagen sec. 2.3)
    x0 = (tl.load(row + COL_X0_X) * x + tl.load(row + COL_X0_M) * m) * tl.load(row + COL_X0_SCALE)
    if CLIP == _CLIP_THRESHOLD:
        s = tl.load(thr_ptr + b)  # the sample's s, once per program
        x0 = tl.minimum(tl.maximum(x0, -s, propagate_nan=NAN_ALL), s, propagate_nan=NAN_ALL) / s
    elif CLIP == _CLIP_RANGE:
        x0 = tl.minimum(tl.maximum(x0, -clip_range, propagate_nan=NAN_ALL), clip_range, propagate_nan=NAN_ALL)

    out = tl.load(row + COL_OUT_X) * x + tl.load(row + COL_OUT_M) * m + tl.load(row + COL_OUT_X0) * x0
    if WRITE_OUT2:
        out2 = tl.load(row + COL_OUT2_X) * x + tl.load(row + COL_OUT2_M) * m + tl.load(row + COL_OUT2_X0) * x0
    for k in tl.static_range(HISTORY_READS):  # h_k = history[READ_SLOT[k]], added in order k = 1, 2, ...
        h_ptr = hist_ptr + _slot(row, COL_READ_SLOT + k, num_slots) * slot_stride
        h = tl.load(h_ptr + off, mask=mask, other=0.0).to(tl.float32)
        out = out + tl.load(row + COL_OUT_H + k) * h
        if WRITE_OUT2:
            out2 = out2 + tl.load(row + COL_OUT2_H + k) * h
    if NOISE != _NOISE_NONE:
        if VAR_MODE == VAR_SQRT:  # the model outputs a variance; clamped at 0 (NaN policy)
            std = std * tl.sqrt_rn(tl.maximum(v, 0.0, propagate_nan=NAN_ALL))
        elif VAR_MODE == VAR_EXP:  # a log-variance (IDDPM eq. 15 as an affine map)
            std = std * tl.exp(tl.load(row + COL_VAR_BIAS) + tl.load(row + COL_VAR_SLOPE) * v)
        out = out + std * n

    if WRITE_OUT2:  # out2 before hist: with one slot for both (a NaN row: slot 0), hist wins, as in eager
        h_ptr = hist_ptr + _slot(row, COL_OUT2_SLOT, num_slots) * slot_stride
        tl.store(h_ptr + off, to_storage(out2, hist_ptr), mask=mask)
    if WRITE_HISTORY:
        hist = tl.load(row + COL_HIST_X) * x + tl.load(row + COL_HIST_M) * m + tl.load(row + COL_HIST_X0) * x0
        h_ptr = hist_ptr + _slot(row, COL_HIST_SLOT, num_slots) * slot_stride
        tl.store(h_ptr + off, to_storage(hist, hist_ptr), mask=mask)
    tl.store(out_ptr + off, to_storage(out, out_ptr), mask=mask)
    if WRITE_X0:
        tl.store(x0_ptr + off, to_storage(x0, x0_ptr), mask=mask)


# ---- the launcher ------------------------------------------------------------------------------
def model_output_layout(model_output: Tensor, sample: Tensor, guided: bool) -> tuple[int, int, bool]:
    """Check model_output's shape; return (per-sample stride, offset of the cond half, has variance channels).

    model_output is [B or 2B (CFG: [uncond; cond]), C or 2C ([prediction; variance]), *rest] for a
    sample [B, C, *rest] (fastdiff.reference.split_model_output).
    """
    batch, rest = sample.shape[0], tuple(sample.shape[1:])
    rows = 2 * batch if guided else batch
    if sample.dim() >= 2:
        channels = sample.shape[1]
        ok = (model_output.dim() == sample.dim() and model_output.shape[0] == rows
              and model_output.shape[1] in (channels, 2 * channels) and tuple(model_output.shape[2:]) == rest[1:])
        expected = f"[{rows}, {channels} or {2 * channels}" + "".join(f", {s}" for s in rest[1:]) + "]"
        has_variance = ok and model_output.shape[1] == 2 * channels
    else:
        ok = tuple(model_output.shape) == (rows,)
        expected, has_variance = f"[{rows}]", False
    if not ok:
        why = " (channels: the sample's, or 2x the sample's channels: [prediction; variance])"
        why += " ([uncond; cond] batch of CFG)" if guided else ""
        raise ValueError(f"model_output has shape {tuple(model_output.shape)}, expected {expected}{why}")
    stride = C.per_sample_size(sample) * (2 if has_variance else 1)
    return stride, (batch * stride if guided else 0), has_variance


def _check_history(history, sample: Tensor, used: bool) -> tuple[Optional[Tensor], int]:
    """(the history buffer or None when the step does not touch it, its number of slots)."""
    if not used:
        return None, 1
    C.check_tensor("history", history, sample.device)
    if history.dim() != sample.dim() + 1 or tuple(history.shape[1:]) != tuple(sample.shape) or history.shape[0] < 1:
        raise ValueError(f"history has shape {tuple(history.shape)}, expected [slots >= 1, "
                         f"{', '.join(map(str, sample.shape))}] (a step that reads or writes history slots)")
    if not history.is_contiguous():
        raise ValueError("history must be contiguous (the kernel reads and writes its slots in place), got strides "
                         f"{history.stride()}")
    return history, history.shape[0]


def _check_extra(guidance_extra: Tensor, sample: Tensor) -> tuple[Tensor, int]:
    """guidance_extra [B, C' >= C, *rest] (its first C channels are e): (it contiguous, its per-sample size)."""
    C.check_tensor("guidance_extra", guidance_extra, sample.device)
    batch, rest = sample.shape[0], tuple(sample.shape[1:])
    if sample.dim() >= 2:
        ok = (guidance_extra.dim() == sample.dim() and guidance_extra.shape[0] == batch
              and guidance_extra.shape[1] >= rest[0] and tuple(guidance_extra.shape[2:]) == rest[1:])
    else:
        ok = tuple(guidance_extra.shape) == (batch,)
    if not ok:
        raise ValueError(f"guidance_extra has shape {tuple(guidance_extra.shape)}, expected the conditional half's "
                         f"[{batch}, >= {rest[0] if rest else ''}{''.join(f', {s}' for s in rest[1:])}] "
                         "(its first C channels are the extra prediction)")
    return guidance_extra.contiguous(), (guidance_extra[0].numel() if batch else 0)


def step(model_output: Tensor, sample: Tensor, table: Tensor, index: Tensor, history: Tensor, out: Tensor,
         x0_out: Optional[Tensor], noise: Optional[Tensor], seed: Optional[int | Tensor], sample_offset: int,
         guidance_scale: Optional[float], guidance_extra: Optional[Tensor], extra_scale: float, variance: int,
         clip_range: Optional[float], threshold: Optional[Tensor], history_reads: int, write_history: bool,
         write_out2: bool, advance: bool) -> None:
    """fastdiff.ops' backend `step` on the Triton kernel (semantics: fastdiff/eager.py).

    Writes prev_sample into `out` (which may be `sample` itself), the clipped x0 into `x0_out` when
    given, and `hist` / `out2` into the history slots the row names. With `advance`, `index` is
    incremented after the kernel by `index.add_(1)`, a second tiny launch; doing it inside the
    kernel (the last program to finish) is a later optimisation, to be measured on a GPU first.
    """
    C.check_tensor("sample", sample)
    dev = sample.device
    C.check_tensor("model_output", model_output, dev)
    guidance_scale = C.check_float("guidance_scale", guidance_scale, optional=True)
    guided = guidance_scale is not None
    mo_stride, cond_base, has_variance = model_output_layout(model_output, sample, guided)
    C.check_choice("variance", variance, tuple(T.VARIANCE_MODES.values()))
    table = C.check_table("table", table, dev, T.WIDTH, "step rows of fastdiff.tables")
    counter = index  # advanced in place below
    index = C.check_index("index", index, dev, 1, "the device step index")
    sample_offset = C.check_int("sample_offset", sample_offset, 0)
    history_reads = C.check_int("history_reads", history_reads, 0, T.MAX_HISTORY_READS)
    write_history, write_out2, advance = bool(write_history), bool(write_out2), bool(advance)
    history, num_slots = _check_history(history, sample, bool(history_reads) or write_history or write_out2)

    if noise is not None:
        C.check_tensor("noise", noise, dev)
        C.check_shape("noise", noise, sample.shape, " (the sample's shape)")
        noise_mode, seed = NOISE_GIVEN, None
    elif seed is not None:
        noise_mode, seed = NOISE_PHILOX, N.seed_tensor(seed, dev)
    else:
        noise_mode, seed = NOISE_NONE, None
    if variance != T.VAR_FIXED and noise_mode != NOISE_NONE and not has_variance:
        raise ValueError(f"variance={variance} (a learned variance mode) needs model_output with 2x the sample's "
                         f"channels ([prediction; variance]); model_output has shape {tuple(model_output.shape)} "
                         f"for a sample of shape {tuple(sample.shape)}")

    extra, extra_stride, guidance_mode = None, 0, GUIDANCE_NONE
    if guided:  # guidance_extra without guidance_scale is ignored, as in the reference
        guidance_mode = GUIDANCE_CFG
        if guidance_extra is not None:
            extra, extra_stride = _check_extra(guidance_extra, sample)
            guidance_mode = GUIDANCE_CFG_EXTRA
    extra_scale = C.check_float("extra_scale", extra_scale)

    threshold = C.check_threshold(threshold, sample.shape[0], dev)
    clip_range = C.check_float("clip_range", clip_range, optional=True)
    clip_mode = CLIP_THRESHOLD if threshold is not None else CLIP_RANGE if clip_range is not None else CLIP_NONE

    if out is None:
        raise TypeError("out must be a tensor like sample (the step writes prev_sample into it), got None")
    out = C.output(sample, out)
    out_buf = C.writable(out)
    x0_buf = None
    if x0_out is not None:
        x0_out = C.output(sample, x0_out, "x0_out")
        x0_buf = C.writable(x0_out)

    per_sample = C.per_sample_size(sample)
    C.launch_per_sample(
        _step_kernel, sample.shape[0], per_sample, dev,
        model_output.contiguous(), sample.contiguous(), table, index, history, out_buf, x0_buf,
        noise.contiguous() if noise is not None else None, threshold, extra, seed,
        per_sample, mo_stride, cond_base, extra_stride, sample.numel(), table.shape[0], num_slots,
        sample_offset, float(guidance_scale or 0.0), extra_scale, float(clip_range or 0.0),
        CFG=guidance_mode, VAR_MODE=int(variance) if noise_mode != NOISE_NONE else T.VAR_FIXED, NOISE=noise_mode,
        CLIP=clip_mode, HISTORY_READS=history_reads, WRITE_HISTORY=write_history, WRITE_OUT2=write_out2,
        WRITE_X0=x0_out is not None)
    C.finish(out, out_buf)
    if x0_out is not None:
        C.finish(x0_out, x0_buf)
    if advance:
        counter.add_(1)  # on the device, after the kernel (stream order): the sampler's step counter
