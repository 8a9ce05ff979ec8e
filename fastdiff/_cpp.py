"""The "cpp" backend: the C++/CUDA extension `fastdiff._C` behind the op signatures of `fastdiff.ops`.

Importing `fastdiff._C` registers the `torch.ops.fastdiff_C` ops (csrc/ops.cpp). This module turns
the string arguments of `fastdiff.ops` into the kernels' int codes, registers the fake (meta)
implementations of the `fastdiff_C` ops, and says why the extension cannot run when it cannot.
Build it in a source checkout with `python setup.py build_ext --inplace`.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import noise as N
from . import tables as T

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
        if not torch._C._dispatch_has_kernel_for_dispatch_key("fastdiff_C::ddpm_step", "CUDA"):
            return "the extension fastdiff._C was built without CUDA (torch without CUDA, or nvcc not found)"
        if not torch.cuda.is_available():
            return "no CUDA device"
        return None
    return f"device type {device_type!r} is not supported (cpu, cuda)"


def _prediction(prediction_type: str) -> int:
    if prediction_type not in T.PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {T.PREDICTION_TYPES}, got {prediction_type!r}")
    return T.prediction_code(prediction_type)


def _variance(variance_type: str) -> int:
    if variance_type not in T.VARIANCE_TYPES:
        raise ValueError(f"variance_type must be one of {T.VARIANCE_TYPES}, got {variance_type!r}")
    return T.variance_mode(variance_type)


def _seed(seed: int) -> int:
    return N.check_seed(int(seed))


def ddpm_step(model_output: Tensor, sample: Tensor, coefs: Tensor, noise: Optional[Tensor], seed: int,
              sample_offset: int, prediction_type: str, variance_type: str, clip_sample_range: Optional[float],
              threshold: Optional[Tensor], guidance_scale: Optional[float], write_x0: bool) -> tuple[Tensor, Tensor]:
    return torch.ops.fastdiff_C.ddpm_step(model_output, sample, coefs, noise, _seed(seed), sample_offset,
                                          _prediction(prediction_type), _variance(variance_type), clip_sample_range,
                                          threshold, guidance_scale, write_x0)


def ddim_step(model_output: Tensor, sample: Tensor, coefs: Tensor, noise: Optional[Tensor], seed: int,
              sample_offset: int, prediction_type: str, eta: float, use_clipped_model_output: bool,
              clip_sample_range: Optional[float], threshold: Optional[Tensor], guidance_scale: Optional[float],
              write_x0: bool) -> tuple[Tensor, Tensor]:
    return torch.ops.fastdiff_C.ddim_step(model_output, sample, coefs, noise, _seed(seed), sample_offset,
                                          _prediction(prediction_type), float(eta), use_clipped_model_output,
                                          clip_sample_range, threshold, guidance_scale, write_x0)


def q_sample(x0: Tensor, timesteps: Tensor, alphas_cumprod: Tensor, noise: Optional[Tensor], seed: int,
             sample_offset: int, write_noise: bool, write_v: bool) -> tuple[Tensor, Tensor, Tensor]:
    return torch.ops.fastdiff_C.q_sample(x0, timesteps, alphas_cumprod, noise, _seed(seed), sample_offset,
                                         write_noise, write_v)


def cfg_combine(uncond: Tensor, cond: Tensor, guidance_scale: float) -> Tensor:
    return torch.ops.fastdiff_C.cfg_combine(uncond, cond, float(guidance_scale))


def philox_randn(like: Tensor, seed: int, counter: int = 0, stream: int = N.STREAM_STEP,
                 sample_offset: int = 0) -> tuple[Tensor, Tensor]:
    """The raw stream (tests): float32 normals shaped like `like` and int64 [2, *like.shape]: per element,
    the Philox word its normal comes from and that word's Box-Muller partner (tests/philox_oracle.randn)."""
    return torch.ops.fastdiff_C.philox_randn(like, _seed(seed), counter, stream, sample_offset)


def _like(x: Tensor, wanted: bool = True) -> Tensor:
    return torch.empty_like(x) if wanted else x.new_empty((0,))


def _register_fakes() -> None:
    """Fake (meta) kernels of the fastdiff_C ops: shapes only, as the C++ implementations lay out."""

    @torch.library.register_fake("fastdiff_C::ddpm_step")
    def _(model_output, sample, coefs, noise, seed, sample_offset, prediction, variance_mode, clip_sample_range,
          threshold, guidance_scale, write_x0):
        return _like(sample), _like(sample, write_x0)

    @torch.library.register_fake("fastdiff_C::ddim_step")
    def _(model_output, sample, coefs, noise, seed, sample_offset, prediction, eta, use_clipped_model_output,
          clip_sample_range, threshold, guidance_scale, write_x0):
        return _like(sample), _like(sample, write_x0)

    @torch.library.register_fake("fastdiff_C::q_sample")
    def _(x0, timesteps, alphas_cumprod, noise, seed, sample_offset, write_noise, write_v):
        return _like(x0), _like(x0, write_noise), _like(x0, write_v)

    @torch.library.register_fake("fastdiff_C::cfg_combine")
    def _(uncond, cond, guidance_scale):
        return _like(cond)

    @torch.library.register_fake("fastdiff_C::philox_randn")
    def _(like, seed, counter, stream, sample_offset):
        return like.new_empty(like.shape, dtype=torch.float32), like.new_empty((2, *like.shape), dtype=torch.int64)


if _LOAD_ERROR is None:
    _register_fakes()
