"""fastdiff's Triton kernels (installed as `fastdiff.kernels`): one op per file, each a private
`@triton.jit` kernel and a launcher with exactly the signature of the op in fastdiff/ops.py
(plus an `out=` keyword to reuse buffers). Under TRITON_INTERPRET=1 they run on CPU tensors.
"""
from .cfg_combine import cfg_combine
from .ddim_step import ddim_step
from .ddpm_step import ddpm_step
from .q_sample import q_sample

__all__ = ["ddpm_step", "ddim_step", "q_sample", "cfg_combine"]
