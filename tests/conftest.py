"""Test-wide setup: the Triton interpreter on machines without a GPU, and the `cuda` marker."""
import os
import sys

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Must be set before any @triton.jit kernel is defined: kernels then run on CPU tensors.
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))  # tests/philox_oracle.py and friends

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


# ---- shared fixtures ------------------------------------------------------------------------------
GRID_BACKENDS = ("reference", "cpp")  # the backends sampler parity grids run on (Triton: a subset, slow)


def use_backend(name: str, monkeypatch, dtype=torch.float32) -> None:
    """Force backend `name` (FASTDIFF_BACKEND) for the test. Skipped, with the reason, when it cannot run
    CPU tensors here, except the C++ backend where CI requires it (FASTDIFF_REQUIRE_CPP=1): a failure."""
    from fastdiff import backends
    try:
        reason = backends.unavailable_reason(name, "cpu", dtype)
        if reason is None and not hasattr(backends.load(name), "step"):
            reason = "does not implement the generic step"
    except Exception as error:  # a backend that fails to import at all
        reason = f"{type(error).__name__}: {error}"
    if reason is not None:
        if name == "cpp" and os.environ.get("FASTDIFF_REQUIRE_CPP") == "1":
            pytest.fail(f"backend cpp unavailable but FASTDIFF_REQUIRE_CPP=1: {reason}")
        pytest.skip(f"backend {name} unavailable: {reason}")
    monkeypatch.setenv("FASTDIFF_BACKEND", name)


def grid_params(grid: dict, triton_subset: tuple) -> list:
    """(backend, option-set name) pairs of a sampler's parity grid: every set on each grid backend,
    `triton_subset` on Triton (the interpreter is slow)."""
    params = [pytest.param(b, name, id=f"{b}-{name}") for b in GRID_BACKENDS for name in grid]
    return params + [pytest.param("triton", name, id=f"triton-{name}") for name in triton_subset]


@pytest.fixture(params=GRID_BACKENDS)
def backend(request, monkeypatch):
    """Each sampler test once per grid backend (forced)."""
    use_backend(request.param, monkeypatch)
    return request.param


@pytest.fixture
def triton_backend(monkeypatch):
    use_backend("triton", monkeypatch)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors and models gain nothing from threads; on a busy 2-core machine two threads spin against
    each other (a tiny UNet test took 390 s with two threads, 15 s with one). Use with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
