"""fastdiff: fused GPU kernels and drop-in samplers for diffusion-model sampling and training."""
from __future__ import annotations

__version__ = "0.1.0"

from . import backends  # callable: fastdiff.backends() prints which backend runs where, and why
from . import noise, ops, reference, schedules, tables
from .loop import sample
from .samplers import (DDIMSampler, DDPMSampler, DPMSolverMultistepSampler, EulerAncestralDiscreteSampler,
                       EulerDiscreteSampler, FlowMatchEulerDiscreteSampler, SamplerOutput, UniPCMultistepSampler)
from .training import diffusion_loss

__all__ = ["DDPMSampler", "DDIMSampler", "EulerDiscreteSampler", "EulerAncestralDiscreteSampler",
           "FlowMatchEulerDiscreteSampler", "DPMSolverMultistepSampler", "UniPCMultistepSampler", "SamplerOutput",
           "backends", "diffusion_loss", "noise", "ops", "reference", "sample", "schedules", "tables", "__version__"]
