from .ddpm import DDPMSampler
from .ddim import DDIMSampler
from .output import SamplerOutput
