"""fastdiff: fused GPU kernels and drop-in samplers for diffusion-model sampling and training."""
from __future__ import annotations

__version__ = "0.1.0"

from . import backends as _backends
from . import noise, ops, reference, schedules, tables
from .samplers import DDIMSampler, DDPMSampler, SamplerOutput


def backends() -> str:
    """Print (and return) which backend runs each device type, and why the others cannot."""
    text = _backends.report()
    print(text)
    return text


__all__ = ["DDPMSampler", "DDIMSampler", "SamplerOutput", "backends", "noise", "ops", "reference", "schedules",
           "tables", "__version__"]
