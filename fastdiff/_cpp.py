"""The "cpp" backend: the C++/CUDA extension `fastdiff._C` behind the backend signatures of `fastdiff.ops`.

Importing `fastdiff._C` registers the `torch.ops.fastdiff_C` ops (csrc/ops.cpp). This module
calls them with the out-variant signatures every backend shares (fastdiff/ops.py docstring;
fastdiff/eager.py is the ground truth), registers the fake (meta) implementations of the
`fastdiff_C` ops, and says why the extension cannot run when it cannot. Build it in a source
checkout with `python setup.py build_ext --inplace`.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import noise as N

Tensor = torch.Tensor

try:
    from . import _C  # noqa: F401  (registers torch.ops.fastdiff_C)
    _LOAD_ERROR: Optional[str] = None
except Exception as error:  # not built, or built against another torch (undefined symbol, ...)
    _LOAD_ERROR = f"{type(error).__name__}: {error}"


def unavailable_reason(device_type: str) -> Optional[str]:
    """None when the extension can run tensors of `device_type`, else why not."""
    if _LOAD_ERROR is not None:
        return (f"the extension fastdiff._C is not available ({_LOAD_ERROR}); build it with "
                f"`python setup.py build_ext --inplace` or `pip install --no-build-isolation .`")
    if device_type == "cpu":
        return None
    if device_type == "cuda":
        if not torch._C._dispatch_has_kernel_for_dispatch_key("fastdiff_C::step", "CUDA"):
            return "the extension fastdiff._C was built without CUDA (torch without CUDA, or nvcc not found)"
        if not torch.cuda.is_available():
            return "no CUDA device"
        return None
    return f"device type {device_type!r} is not supported (cpu, cuda)"


if _LOAD_ERROR is None:
    _step_op = torch.ops.fastdiff_C.step.default
    _q_sample_op = torch.ops.fastdiff_C.q_sample.default
    _cfg_op = torch.ops.fastdiff_C.cfg_combine.default


def step(model_output: Tensor, sample: Tensor, table: Tensor, index: Tensor, history: Tensor, out: Tensor,
         x0_out: Optional[Tensor], noise: Optional[Tensor], seed: Optional[int | Tensor], sample_offset: int,
         guidance_scale: Optional[float], guidance_extra: Optional[Tensor], extra_scale: float, variance: int,
         clip_range: Optional[float], threshold: Optional[Tensor], history_reads: int, write_history: bool,
         write_out2: bool, advance: bool) -> None:
    """The generic step (fastdiff.eager.step semantics), writing `out`, `x0_out` and the history slots."""
    if noise is not None:
        seed = None
    elif seed is not None and not isinstance(seed, Tensor):  # (fastdiff.ops.run_step passes the tensor already)
        seed = N.seed_tensor(seed, sample.device)
    _step_op(model_output, sample, table, index, history, out, x0_out, noise, seed, sample_offset, guidance_scale,
             guidance_extra, extra_scale, variance, clip_range, threshold, history_reads, write_history, write_out2,
             advance)


def q_sample(x0: Tensor, table: Tensor, index: Tensor, noise: Optional[Tensor], seed: int, sample_offset: int,
             x_t: Tensor, target: Optional[Tensor], noise_out: Optional[Tensor]) -> None:
    """x_t (and target, noise) from one q-sample row per sample (fastdiff.eager.q_sample semantics)."""
    _q_sample_op(x0, table, index, noise, N.check_seed(seed) if noise is None else int(seed), sample_offset, x_t,
                 target, noise_out)


def cfg_combine(uncond: Tensor, cond: Tensor, guidance_scale: float) -> Tensor:
    return _cfg_op(uncond, cond, float(guidance_scale))


def philox_randn(like: Tensor, seed: int, counter: int = 0, stream: int = N.STREAM_STEP,
                 sample_offset: int = 0) -> tuple[Tensor, Tensor]:
    """The raw stream (tests): float32 normals shaped like `like` and int64 [2, *like.shape]: per element,
    the Philox word its normal comes from and that word's Box-Muller partner (tests/philox_oracle.randn)."""
    return torch.ops.fastdiff_C.philox_randn(like, N.check_seed(int(seed)), counter, stream, sample_offset)


def _register_fakes() -> None:
    """Fake (meta) kernels of the fastdiff_C ops: shapes only (the out-variant ops return nothing)."""

    @torch.library.register_fake("fastdiff_C::step")
    def _(model_output, sample, table, index, history, out, x0_out, noise, seed, sample_offset, guidance_scale,
          guidance_extra, extra_scale, variance, clip_range, threshold, history_reads, write_history, write_out2,
          advance):
        return None

    @torch.library.register_fake("fastdiff_C::q_sample")
    def _(x0, table, index, noise, seed, sample_offset, x_t, target, noise_out):
        return None

    @torch.library.register_fake("fastdiff_C::cfg_combine")
    def _(uncond, cond, guidance_scale):
        return torch.empty_like(cond)

    @torch.library.register_fake("fastdiff_C::philox_randn")
    def _(like, seed, counter, stream, sample_offset):
        return like.new_empty(like.shape, dtype=torch.float32), like.new_empty((2, *like.shape), dtype=torch.int64)


if _LOAD_ERROR is None:
    _register_fakes()
