"""Pieces shared by the fastdiff Triton kernels: tiles and offsets, Philox normals, storage casts,
the device-side row gather (as `@triton.jit` helpers), and the launchers' input checks, output
buffers and grids.

Every per-sample kernel runs on a 2-D grid (block within a sample, sample): the element index within a
sample and the sample index (Philox's c1) are known without a division, and the flat offset
b * per_sample + i is formed in int64 so batches past 2^31 elements index correctly.

A program's BLOCK elements are a [BLOCK // 4, 4] tile: row r holds elements 4 (q0 + r) .. + 3, the
four normals of one Philox evaluation at quad q = q0 + r (fastdiff/noise.py). Philox and Box-Muller
run once per row on [BLOCK // 4] vectors; everything else is elementwise on the tile.
"""
from __future__ import annotations

import numbers
import os
from typing import Optional

import torch
import triton
import triton.language as tl
from triton.language.random import pair_uniform_to_normal, uint_to_uniform_float

from fastdiff import noise as N

BLOCK = 1024  # elements per program (a multiple of 4): memory-bound, 8 per thread (2 quads) at 4 warps
NUM_WARPS = 4
MAX_GRID_Y = 65535  # CUDA's limit on gridDim.y: larger batches launch in chunks of samples
MAX_PER_SAMPLE = 2**31 - 1  # the element index within a sample (4 q + word) is int32
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Stream ids as constexprs (Triton reads only constexpr globals); values from fastdiff.noise, never
# repeated here. Table columns live next to the kernel that reads them (step.py, q_sample.py).
STREAM_STEP = tl.constexpr(N.STREAM_STEP)
STREAM_Q_SAMPLE = tl.constexpr(N.STREAM_Q_SAMPLE)
NAN_ALL = tl.constexpr(tl.PropagateNan.ALL)  # torch.clamp propagates NaN; fmax/fmin would drop it
# The interpreter casts fp32 -> bf16 by truncation (GPUs round to nearest even): emulate RTNE there.
EMULATE_BF16_RTNE = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


# ----------------------------------------------------------------------------- jit helpers
@triton.jit
def sample_offsets(pid_block, b, per_sample, BLOCK: tl.constexpr):
    """The program's [BLOCK // 4, 4] tile of sample b: (quad index q [BLOCK // 4] int32, element index
    within the sample [int32 tile], flat int64 offset b * per_sample + element, mask)."""
    tl.static_assert(BLOCK % 4 == 0, "a program must start on a quad boundary")
    q = pid_block * (BLOCK // 4) + tl.arange(0, BLOCK // 4)
    elem = 4 * q[:, None] + tl.arange(0, 4)[None, :]
    # a quad may straddle the end of the sample (per_sample % 4 != 0): its tail is masked, not drawn apart
    return q, elem, b.to(tl.int64) * per_sample + elem, elem < per_sample


@triton.jit
def to_storage(x, ptr):
    """fp32 `x` cast to the element type of `ptr`, rounded to nearest even (as torch's .to())."""
    if EMULATE_BF16_RTNE and ptr.dtype.element_ty == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000  # RTNE into the top 16 bits
        x = bits.to(tl.float32, bitcast=True)  # now exact in bf16: the truncating cast is exact
    return x.to(ptr.dtype.element_ty)


@triton.jit
def philox_quad(seed, q, sample, counter, STREAM: tl.constexpr):
    """Philox4x32-10 words (i0, i1, i2, i3) of counter (q, sample, counter, stream), key = seed (noise.py)."""
    c0 = q.to(tl.uint32)
    zero = c0 * 0  # broadcast the per-program scalars to the quads
    c1 = zero + sample.to(tl.int64).to(tl.uint32)  # global sample index mod 2^32, as the oracle
    c2 = zero + tl.cast(counter, tl.uint32)  # counter may be a literal (q_sample: 0)
    c3 = zero + STREAM
    return tl.philox(seed, c0, c1, c2, c3)


@triton.jit
def interleave4(a, b, c, d):
    """[Q, 4] tile whose row r is (a[r], b[r], c[r], d[r]).

    join + reshape keeps each row in one thread, the layout of vectorized [Q, 4] loads: no layout
    conversion when Triton proves 16-byte alignment (per_sample % 16 == 0), one shared-memory
    transpose otherwise. (A tl.where broadcast per column compiled to 4x the conversions, sm_90.)
    """
    return tl.reshape(tl.join(tl.join(a, c), tl.join(b, d)), (a.shape[0], 4))  # [Q, 2, 2] -> [Q, 4]


@triton.jit
def philox_normals(seed, q, sample, counter, STREAM: tl.constexpr):
    """The [Q, 4] tile of standard normals at quads q: tl.randn4x's uniform conversion and Box-Muller
    (cos and sin of both word pairs), so one Philox and two logs serve four elements."""
    i0, i1, i2, i3 = philox_quad(seed, q, sample, counter, STREAM)
    n0, n1 = pair_uniform_to_normal(uint_to_uniform_float(i0), uint_to_uniform_float(i1))
    n2, n3 = pair_uniform_to_normal(uint_to_uniform_float(i2), uint_to_uniform_float(i3))
    return interleave4(n0, n1, n2, n3)


@triton.jit
def row_pointer(table_ptr, index, num_rows, WIDTH: tl.constexpr):
    """Pointer to row `index` of a [num_rows, WIDTH] table; an index outside [0, num_rows - 1) gives the
    last (all-NaN sentinel) row: a bad device index gives NaN, never an out-of-bounds read."""
    index = index.to(tl.int64)
    valid = (index >= 0) & (index < num_rows - 1)
    return table_ptr + tl.where(valid, index, num_rows - 1) * WIDTH


@triton.jit
def nan_to_zero(x):
    """NaN -> 0 (torch.nan_to_num for the integers a row holds: counters, slots)."""
    return tl.where(x == x, x, 0.0)


# ----------------------------------------------------------------------------- launcher helpers
def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_tensor(name: str, t, device: Optional[torch.device] = None, dtypes=SUPPORTED_DTYPES) -> None:
    """TypeError / ValueError naming the argument, what it is and what is allowed."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        extra = " (float64 runs on the reference or cpp backend)" if t.dtype == torch.float64 else ""
        raise TypeError(f"{name} has dtype {t.dtype}; the triton backend supports {', '.join(map(str, dtypes))}"
                        + extra)
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} (the sample's device)")
    if device is None and t.device.type != "cuda" and not interpreting():
        raise ValueError(f"{name} is on {t.device}: the triton backend needs CUDA tensors "
                         "(or TRITON_INTERPRET=1 for CPU tensors)")


def check_shape(name: str, t: torch.Tensor, expected: tuple, why: str = "") -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(expected)}{why}")


def check_choice(name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def check_table(name: str, table, device: torch.device, width: int, what: str) -> torch.Tensor:
    """A float32 [R >= 1, width] table on the sample's device, contiguous (a no-op when it is)."""
    check_tensor(name, table, device, dtypes=None)
    if table.dtype != torch.float32:
        raise TypeError(f"{name} has dtype {table.dtype}, expected torch.float32 ({what})")
    if table.dim() != 2 or table.shape[1] != width or table.shape[0] < 1:
        raise ValueError(f"{name} has shape {tuple(table.shape)}, expected [rows >= 1, {width}] ({what}, "
                         "the last row the NaN sentinel)")
    return table.contiguous()


def check_index(name: str, index, device: torch.device, numel: int, what: str) -> torch.Tensor:
    """An int32/int64 index tensor with `numel` entries on the sample's device (read on the device only)."""
    check_tensor(name, index, device, dtypes=(torch.int64, torch.int32))
    if index.numel() != numel or (numel != 1 and index.dim() != 1):
        shape = "[1]" if numel == 1 else f"[{numel}]"
        raise ValueError(f"{name} has shape {tuple(index.shape)}, expected {shape} ({what})")
    return index.contiguous()


def check_int(name: str, value, low: int, high: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low or \
            (high is not None and value > high):
        allowed = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be an int in {allowed}, got {value!r}")
    return int(value)


def check_float(name: str, value, optional: bool = False) -> Optional[float]:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        allowed = "a float or None" if optional else "a float"
        raise TypeError(f"{name} must be {allowed}, got {type(value).__name__}")
    return float(value)


def check_threshold(threshold: Optional[torch.Tensor], batch: int, device: torch.device) -> Optional[torch.Tensor]:
    if threshold is None:
        return None
    check_tensor("threshold", threshold, device, dtypes=None)
    check_shape("threshold", threshold, (batch,), " (the per-sample s of dynamic thresholding)")
    if not threshold.is_floating_point():
        raise TypeError(f"threshold has dtype {threshold.dtype}, expected a floating dtype (float32)")
    return threshold.to(torch.float32).contiguous()


def per_sample_size(sample: torch.Tensor) -> int:
    if sample.dim() < 1:
        raise ValueError(f"sample must have a batch dimension, got shape {tuple(sample.shape)}")
    per_sample = sample[0].numel() if sample.shape[0] else 0
    if per_sample > MAX_PER_SAMPLE:
        raise ValueError(f"sample has {per_sample} elements per sample; the triton kernels index a sample "
                         f"with int32 (at most {MAX_PER_SAMPLE})")
    return per_sample


def kernel_seed(seed: int, noise: Optional[torch.Tensor]) -> int:
    """The Philox key; checked only when the kernel draws the noise (an explicit noise ignores it)."""
    return N.check_seed(seed) if noise is None else 0


def output(like: torch.Tensor, out: Optional[torch.Tensor], name: str = "out") -> torch.Tensor:
    """`out` (checked) or a fresh torch.empty_like(like): the op's fake layout, never an input alias."""
    if out is None:
        return torch.empty_like(like)
    check_tensor(name, out, like.device, dtypes=None)
    check_shape(name, out, like.shape)
    if out.dtype != like.dtype:
        raise TypeError(f"{name} has dtype {out.dtype}, expected {like.dtype} (the input's dtype)")
    return out


def writable(result: torch.Tensor) -> torch.Tensor:
    """The contiguous buffer the kernel writes: `result` itself, or scratch that `finish` copies back."""
    return result if result.is_contiguous() else torch.empty(result.shape, dtype=result.dtype, device=result.device)


def finish(result: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
    if buffer is not result:
        result.copy_(buffer)  # channels_last / strided outputs keep empty_like's layout
    return result


def step_grid(batch: int, per_sample: int, block: int = BLOCK) -> list[tuple[int, tuple[int, int]]]:
    """[(first sample b0, grid)]: grid = (blocks per sample, samples), chunked by CUDA's y limit."""
    blocks = triton.cdiv(per_sample, block)
    return [(b0, (blocks, min(MAX_GRID_Y, batch - b0))) for b0 in range(0, batch, MAX_GRID_Y)]


def launch_per_sample(kernel, batch: int, per_sample: int, device: torch.device, *args, **kwargs) -> None:
    """Launch `kernel` over every (block, sample) pair; b0 is passed as a keyword."""
    if batch == 0 or per_sample == 0:
        return
    with device_guard(device):
        for b0, grid in step_grid(batch, per_sample):
            kernel[grid](*args, b0=b0, BLOCK=BLOCK, num_warps=NUM_WARPS, **kwargs)


def device_guard(device: torch.device):
    """Triton launches on the current device's current stream: make it the tensors' device."""
    import contextlib
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


# ----------------------------------------------------------------------------- test hooks
@triton.jit
def _philox_debug_kernel(word_ptr, partner_ptr, n_ptr, per_sample, counter, sample_offset, seed, b0,
                         STREAM: tl.constexpr, BLOCK: tl.constexpr):
    b = b0 + tl.program_id(1)
    q, _, off, mask = sample_offsets(tl.program_id(0), b, per_sample, BLOCK)
    sample = sample_offset.to(tl.int64) + b
    i0, i1, i2, i3 = philox_quad(seed, q, sample, counter, STREAM)
    # element e's normal comes from the pair (word, partner) = (i0, i1) for e % 4 < 2, else (i2, i3)
    tl.store(word_ptr + off, interleave4(i0, i0, i2, i2).to(tl.int32, bitcast=True), mask=mask)
    tl.store(partner_ptr + off, interleave4(i1, i1, i3, i3).to(tl.int32, bitcast=True), mask=mask)
    tl.store(n_ptr + off, philox_normals(seed, q, sample, counter, STREAM), mask=mask)


def philox_debug(batch: int, per_sample: int, seed: int, counter: int, stream: int, sample_offset: int = 0,
                 device="cpu"):
    """(words, partners as int32 bit patterns, normals) [batch, per_sample] as the kernels draw them
    (tests): element e's Philox word pair and its normal, laid out as tests/philox_oracle.randn."""
    words = torch.empty((batch, per_sample), dtype=torch.int32, device=device)
    partners, n = torch.empty_like(words), torch.empty((batch, per_sample), dtype=torch.float32, device=device)
    launch_per_sample(_philox_debug_kernel, batch, per_sample, torch.device(device), words, partners, n, per_sample,
                      counter, sample_offset, N.check_seed(seed), STREAM=stream)
    return words, partners, n


@triton.jit
def _offsets_debug_kernel(out_ptr, per_sample, b0, BLOCK: tl.constexpr):
    """Writes the flat offset of the first and last element of each program's block (tests)."""
    b = b0 + tl.program_id(1)
    _, _, off, mask = sample_offsets(tl.program_id(0), b, per_sample, BLOCK)
    slot = (tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)) * 2
    first = tl.min(tl.where(mask, off, 2**62), axis=None)  # over the whole tile
    last = tl.max(tl.where(mask, off, -1), axis=None)
    tl.store(out_ptr + slot, first)
    tl.store(out_ptr + slot + 1, last)
