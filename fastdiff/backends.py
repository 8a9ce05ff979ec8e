"""Which implementation runs a call, and why the others cannot.

Order (DESIGN "How a call flows"): CUDA tensors -> cpp, triton, reference (measured: BENCHMARKS.md
"Backend order on CUDA"); CPU tensors -> cpp, reference (triton runs CPU tensors only under the
Triton interpreter, TRITON_INTERPRET=1, and only when forced). FASTDIFF_BACKEND=reference|triton|cpp
forces one; a forced backend that cannot run raises with every reason. `fastdiff.backends()` prints
the table.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
import sys
from types import ModuleType

import torch

NAMES = ("triton", "cpp", "reference")
ENV_VAR = "FASTDIFF_BACKEND"
# CUDA: C++ first. On an H200 (2026-12-04, two runs) its stream time per call was 0.14-0.15x Triton's
# at 16K and 1M elements and 0.49-0.60x at 16M (Triton's Python launch costs ~100-200 us a call, C++'s
# ~13-25 us), so it wins every size class of BENCHMARKS.md's rule; Triton's kernels are faster only
# inside CUDA graphs at 16M elements. Triton stays the fallback when the extension has no CUDA.
DEFAULT_ORDER = {"cuda": ("cpp", "triton", "reference"), "cpu": ("cpp", "reference")}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _import_kernels() -> ModuleType:
    """`fastdiff.kernels`, imported on first use (it imports triton)."""
    return importlib.import_module("fastdiff.kernels")


def _triton_reason(device: torch.device, dtype: torch.dtype | None = None) -> str | None:
    if dtype == torch.float64:
        return "the Triton kernels store fp32/fp16/bf16 only (float64 runs on cpp or reference)"
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "no CUDA device"
        capability = torch.cuda.get_device_capability(device)  # the tensor's GPU, not the current one
        if torch.version.hip is None and capability < (7, 5):
            return f"GPU compute capability {capability} < (7, 5)"
        return None
    if device.type == "cpu":
        return None if _interpreting() else "CPU tensors need the Triton interpreter (TRITON_INTERPRET=1)"
    return f"device type {device.type!r} is not supported"


def _cpp_reason(device_type: str) -> str | None:
    try:
        cpp = importlib.import_module("fastdiff._cpp")
    except ImportError as error:  # the wrapper itself is missing or broken
        return f"fastdiff._cpp failed to import: {error}"
    return cpp.unavailable_reason(device_type)


def unavailable_reason(name: str, device: torch.device | str, dtype: torch.dtype | None = None) -> str | None:
    """None when backend `name` can run tensors on `device` (and of `dtype`), else why not."""
    device = torch.device(device)
    if name == "reference":
        return None
    if name == "triton":
        return _triton_reason(device, dtype)
    if name == "cpp":
        return _cpp_reason(device.type)
    raise ValueError(f"backend must be one of {NAMES}, got {name!r}")


def load(name: str) -> ModuleType:
    if name == "triton":
        return _import_kernels()
    return importlib.import_module({"cpp": "fastdiff._cpp", "reference": "fastdiff.eager"}[name])


def _forced() -> str | None:
    forced = os.environ.get(ENV_VAR, "").strip().lower() or None
    if forced is not None and forced not in NAMES:
        raise ValueError(f"{ENV_VAR} must be one of {NAMES} (or unset), got {forced!r}")
    return forced


def _candidates(device_type: str, forced: str | None) -> tuple[str, ...]:
    if forced is not None:
        return (forced,)
    return DEFAULT_ORDER.get(device_type, ("reference",))


# os.environ.get costs ~1.7 us (it encodes the key); its backing dict answers the same in ~0.1 us.
_ENVIRON_DATA = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey(ENV_VAR) if _ENVIRON_DATA is not None else None


def _forced_raw():
    return _ENVIRON_DATA.get(_ENV_KEY) if _ENVIRON_DATA is not None else os.environ.get(ENV_VAR)


def select(op: str, tensor: torch.Tensor) -> ModuleType:
    """The backend module that runs `op` on `tensor`'s device and dtype (first available in order).

    Cached per (op, device, dtype, FASTDIFF_BACKEND): after the first call of a kind, one dict lookup.
    """
    return _select(op, tensor.device, tensor.dtype, _forced_raw())


@functools.lru_cache(maxsize=None)
def _select(op: str, device: torch.device, dtype: torch.dtype, forced_env) -> ModuleType:
    forced = _forced()
    reasons = []
    for name in _candidates(device.type, forced):
        reason = unavailable_reason(name, device, dtype)
        if reason is None:
            module = load(name)
            if hasattr(module, op):
                return module
            reason = f"does not implement {op}"
        reasons.append(f"{name}: {reason}")
    raise RuntimeError(f"no backend can run fastdiff.{op} on {device.type} tensors "
                       f"({ENV_VAR}={forced!r}): " + "; ".join(reasons))


@contextlib.contextmanager
def forced(name: str | None):
    """Run the block with FASTDIFF_BACKEND=name (None: leave the selection as it is)."""
    old = os.environ.get(ENV_VAR)
    if name is not None:
        os.environ[ENV_VAR] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(ENV_VAR, None)
        else:
            os.environ[ENV_VAR] = old


def status(device_types=("cpu", "cuda")) -> list[tuple[str, str, str]]:
    """(backend, device type, 'available' or the reason it is not) for every pair."""
    return [(name, dev, unavailable_reason(name, dev) or "available") for dev in device_types for name in NAMES]


def report() -> str:
    forced = _forced()
    lines = [f"fastdiff backends ({ENV_VAR}={forced or 'unset'}; order cuda: "
             f"{' > '.join(DEFAULT_ORDER['cuda'])}, cpu: {' > '.join(DEFAULT_ORDER['cpu'])})"]
    lines += [f"  {dev:5s} {name:10s} {state}" for name, dev, state in status()]
    return "\n".join(lines)


class _CallableModule(ModuleType):
    """Lets `fastdiff.backends()` print the table while `fastdiff.backends.select` stays the module's."""

    def __call__(self) -> str:
        text = report()
        print(text)
        return text


sys.modules[__name__].__class__ = _CallableModule
