from .ddpm import DDPMSampler
from .ddim import DDIMSampler
from .euler import EulerDiscreteSampler
from .euler_ancestral import EulerAncestralDiscreteSampler
from .flow_match_euler import FlowMatchEulerDiscreteSampler
from .dpm_solver import DPMSolverMultistepSampler
from .unipc import UniPCMultistepSampler
from .output import SamplerOutput

__all__ = ["DDPMSampler", "DDIMSampler", "EulerDiscreteSampler", "EulerAncestralDiscreteSampler",
           "FlowMatchEulerDiscreteSampler", "DPMSolverMultistepSampler", "UniPCMultistepSampler", "SamplerOutput"]
