"""The fused ops: `step` (the generic step of every sampler), `q_sample` (training noising and its
target) and `cfg_combine`, each registered once with torch.library in the `fastdiff` namespace.

Two ways in, same bits (tested):
- the registered custom ops (`torch.ops.fastdiff.*`, what torch.compile and tracing see), which
  allocate their outputs and call the selected backend;
- the eager fast path (`run_step`, `run_q_sample`): straight to the backend's function, with
  optional output buffers (`out=sample` steps in place). Samplers call these.

Every backend module (fastdiff/eager.py, fastdiff/_cpp.py, fastdiff/kernels/) defines the same
out-variant functions:

    step(model_output, sample, table, index, history, out, x0_out, noise, seed, sample_offset,
         guidance_scale, guidance_extra, extra_scale, variance, clip_range, threshold,
         history_reads, write_history, write_out2, advance) -> None
    q_sample(x0, table, index, noise, seed, sample_offset, x_t, target, noise_out) -> None
    cfg_combine(uncond, cond, guidance_scale) -> Tensor

Semantics (the reference, fastdiff/eager.py, is the ground truth):
- `table` [R, tables.WIDTH] float32 and `index` int64 [1] on the sample's device: the step reads
  row `index` (the NaN sentinel row R - 1 when the index is outside [0, R - 1)); with `advance`
  the backend then adds 1 to `index` on the device (the sampler's step counter; the registered
  op leaves that to `run_step`).
- `model_output` is [B or 2B (guidance: [uncond; cond]), C or 2C ([prediction; variance]), ...]
  for a sample [B, C, ...]; `guidance_extra` (SD3 skip-layer) is a [B, ...] prediction.
- Noise: `noise` as given; else, with `seed` (an int64 [1] tensor on the sample's device, read by
  the kernel at run time: a captured graph serves every seed; backends also take an int), Philox
  normals (fastdiff.noise) with counter row[NOISE_COUNTER], global sample index `sample_offset` +
  b, stream STREAM_STEP; with neither, the step has no noise terms.
- `history` [S, *sample.shape]: the row's READ_SLOT[:history_reads] are read; `hist` and `out2`
  are written into the slots the row names when `write_history` / `write_out2`. An empty tensor
  when the sampler keeps no history.
- `out` receives prev_sample (it may be `sample` itself), `x0_out` the clipped x0 when not None.
- q_sample: per sample b, row `index[b]` of a [R, tables.Q_WIDTH] table; noise as given or
  Philox (counter 0, stream STREAM_Q_SAMPLE) rounded to x0's dtype; `noise_out` receives it.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import backends
from . import noise as N

Tensor = torch.Tensor


def _like(x: Tensor, wanted: bool = True) -> Tensor:
    return torch.empty_like(x) if wanted else x.new_empty((0,))


_EMPTY: dict[tuple, Tensor] = {}


def empty_of(x: Tensor) -> Tensor:
    """A shared 0-element tensor of x's dtype and device: an output the caller did not ask for, or the history
    of a sampler without one (the eager path; a fresh empty costs ~2.5 us a step)."""
    key = (x.device, x.dtype)
    empty = _EMPTY.get(key)
    if empty is None:
        empty = _EMPTY[key] = x.new_empty((0,))
    return empty


def _eager_like(x: Tensor, wanted: bool = True) -> Tensor:
    return torch.empty_like(x) if wanted else empty_of(x)


@torch.library.custom_op("fastdiff::step", mutates_args=("history",))
def step(model_output: Tensor, sample: Tensor, table: Tensor, index: Tensor, history: Tensor,
         noise: Optional[Tensor], seed: Optional[Tensor], sample_offset: int, guidance_scale: Optional[float],
         guidance_extra: Optional[Tensor], extra_scale: float, variance: int, clip_range: Optional[float],
         threshold: Optional[Tensor], history_reads: int, write_history: bool, write_out2: bool,
         write_x0: bool) -> tuple[Tensor, Tensor]:
    """The generic step (fastdiff.tables). Returns (prev_sample, pred_original_sample or (0,)).

    The registered op never advances `index` (an index is often a view of a timestep tensor, and
    mutated aliased inputs are fragile under tracing); `run_step` adds 1 to it after the op.
    """
    prev, x0 = _like(sample), _like(sample, write_x0)
    backends.select("step", sample).step(
        model_output, sample, table, index, history, prev, x0 if write_x0 else None, noise, seed, sample_offset,
        guidance_scale, guidance_extra, extra_scale, variance, clip_range, threshold, history_reads, write_history,
        write_out2, False)
    return prev, x0


@step.register_fake
def _(model_output, sample, table, index, history, noise, seed, sample_offset, guidance_scale, guidance_extra,
      extra_scale, variance, clip_range, threshold, history_reads, write_history, write_out2, write_x0):
    return _like(sample), _like(sample, write_x0)


@torch.library.custom_op("fastdiff::q_sample", mutates_args=())
def q_sample(x0: Tensor, table: Tensor, index: Tensor, noise: Optional[Tensor], seed: int, sample_offset: int,
             write_target: bool, write_noise: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Forward noising with one row per sample. Returns (x_t, target or (0,), noise or (0,))."""
    x_t, target, noise_out = _like(x0), _like(x0, write_target), _like(x0, write_noise)
    backends.select("q_sample", x0).q_sample(x0, table, index, noise, seed, sample_offset, x_t,
                                             target if write_target else None, noise_out if write_noise else None)
    return x_t, target, noise_out


@q_sample.register_fake
def _(x0, table, index, noise, seed, sample_offset, write_target, write_noise):
    return _like(x0), _like(x0, write_target), _like(x0, write_noise)


@torch.library.custom_op("fastdiff::cfg_combine", mutates_args=())
def cfg_combine(uncond: Tensor, cond: Tensor, guidance_scale: float) -> Tensor:
    """Classifier-free guidance, u + w (c - u)."""
    return backends.select("cfg_combine", cond).cfg_combine(uncond, cond, guidance_scale)


@cfg_combine.register_fake
def _(uncond, cond, guidance_scale):
    return _like(cond)


# ---- the eager fast path --------------------------------------------------------------------------
def _traced(x: Tensor) -> bool:
    """True under torch.compile / tracing (fake or proxy tensors): then the registered op must run."""
    return type(x) is not torch.Tensor or torch.compiler.is_compiling()


def run_step(model_output: Tensor, sample: Tensor, table: Tensor, index: Tensor, history: Tensor,
             noise: Optional[Tensor], seed: Optional[int | Tensor], sample_offset: int, guidance_scale: Optional[float],
             guidance_extra: Optional[Tensor], extra_scale: float, variance: int, clip_range: Optional[float],
             threshold: Optional[Tensor], history_reads: int, write_history: bool, write_out2: bool, advance: bool,
             write_x0: bool, *, out: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """`step` without the dispatcher: the backend's function on (optionally) the caller's `out` buffer.
    An int seed becomes the int64 [1] device tensor the kernels read (cached)."""
    seed = N.seed_tensor(seed, sample.device) if seed is not None and noise is None else None
    if _traced(sample):
        prev, x0 = step(model_output, sample, table, index, history, noise, seed, sample_offset, guidance_scale,
                        guidance_extra, extra_scale, variance, clip_range, threshold, history_reads, write_history,
                        write_out2, write_x0)
        if advance:
            index.add_(1)
        return prev, x0
    prev = torch.empty_like(sample) if out is None else out
    x0 = _eager_like(sample, write_x0)
    backends.select("step", sample).step(
        model_output, sample, table, index, history, prev, x0 if write_x0 else None, noise, seed, sample_offset,
        guidance_scale, guidance_extra, extra_scale, variance, clip_range, threshold, history_reads, write_history,
        write_out2, advance)
    return prev, x0


def run_q_sample(x0: Tensor, table: Tensor, index: Tensor, noise: Optional[Tensor], seed: int, sample_offset: int,
                 write_target: bool, write_noise: bool) -> tuple[Tensor, Tensor, Tensor]:
    if _traced(x0):
        return q_sample(x0, table, index, noise, seed, sample_offset, write_target, write_noise)
    x_t, target, noise_out = _like(x0), _eager_like(x0, write_target), _eager_like(x0, write_noise)
    backends.select("q_sample", x0).q_sample(x0, table, index, noise, seed, sample_offset, x_t,
                                             target if write_target else None, noise_out if write_noise else None)
    return x_t, target, noise_out
