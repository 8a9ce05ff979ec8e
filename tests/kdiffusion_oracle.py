"""k-diffusion's samplers as a second oracle (DESIGN "oracle chain"), loaded by path.

`import k_diffusion` does not work on a CPU-only torch install: its `__init__` pulls in CLIP and
pkg_resources, and its `utils.py` imports torchvision (a wheel built for another torch does not
load). The two files the oracle needs, `utils.py` and `sampling.py`, are loaded here straight from
the installed distribution under a private package name, with stand-ins for the imports they make
but the samplers we call never use (torchvision, and torchsde / torchdiffeq / scipy / PIL /
safetensors when absent). Install with `pip install --no-deps k-diffusion` (its declared
dependencies include torchvision and wandb, which the oracle does not need).
"""
from __future__ import annotations

import functools
import importlib.util
import pathlib
import sys
import types

import pytest

PACKAGE = "_kdiffusion_oracle"


class _Missing(types.ModuleType):
    """A stand-in module: importing it works, using anything in it raises."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)

        def unavailable(*args, **kwargs):
            raise RuntimeError(f"{self.__name__}.{name} is a stand-in of tests/kdiffusion_oracle.py "
                               "(not installed / not loadable here)")
        return unavailable


def _stub(name: str, created: list) -> None:
    """Put a stand-in for `name` (and its parents) into sys.modules unless the real one imports."""
    if name in sys.modules:
        return
    try:
        if name == "torchvision" or name.startswith("torchvision."):
            raise ImportError("the torchvision wheel does not load with this torch")
        importlib.import_module(name)
    except Exception:  # ImportError, or a broken install raising anything else
        parent, _, child = name.rpartition(".")
        if parent:
            _stub(parent, created)
        module = sys.modules[name] = _Missing(name)
        created.append(name)
        if parent:
            setattr(sys.modules[parent], child, module)


@functools.cache
def _load():
    spec = importlib.util.find_spec("k_diffusion")  # finds the package folder without running its __init__
    if spec is None or not spec.submodule_search_locations:
        return None, "k-diffusion is not installed (pip install --no-deps k-diffusion)"
    folder = pathlib.Path(list(spec.submodule_search_locations)[0])
    created = []
    for name in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional", "torchsde",
                 "torchdiffeq", "scipy", "scipy.integrate", "PIL", "PIL.Image", "safetensors"):
        _stub(name, created)
    package = types.ModuleType(PACKAGE)
    package.__path__ = [str(folder)]
    sys.modules[PACKAGE] = package
    modules = {}
    for name in ("utils", "sampling"):
        module_spec = importlib.util.spec_from_file_location(f"{PACKAGE}.{name}", folder / f"{name}.py")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_spec.name] = module
        module_spec.loader.exec_module(module)
        setattr(package, name, module)
        modules[name] = module
    for name in created:  # k-diffusion holds what it imported; other code must not see the stand-ins
        sys.modules.pop(name, None)
    return modules["sampling"], None


def sampling():
    """k-diffusion's `sampling` module, or skip the test (with the reason) when k-diffusion is absent."""
    module, reason = _load()
    if module is None:
        pytest.skip(reason)
    return module


class GivenNoise:
    """A k-diffusion noise_sampler(sigma, sigma_next) handing out the given tensors in order (k-diffusion's
    default is a Brownian tree keyed by sigma; comparing with diffusers needs the same normals)."""

    def __init__(self, noises):
        self.noises, self.calls = list(noises), 0

    def __call__(self, sigma, sigma_next):
        self.calls += 1
        return self.noises[self.calls - 1]
