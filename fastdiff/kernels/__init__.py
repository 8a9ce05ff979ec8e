"""fastdiff's Triton kernels (installed as `fastdiff.kernels`): one op per file, each a private
`@triton.jit` kernel and a launcher with exactly the backend signature of the op in fastdiff/ops.py
(out-variants: `step` and `q_sample` write into the buffers they are given and return None;
`cfg_combine` returns its result). Under TRITON_INTERPRET=1 they run on CPU tensors.
"""
from .cfg_combine import cfg_combine
from .q_sample import q_sample
from .step import step

__all__ = ["step", "q_sample", "cfg_combine"]
