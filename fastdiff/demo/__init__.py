"""The fastdiff demo: `python -m fastdiff.demo` trains a small denoiser on scikit-learn's 8x8
digits (a couple of minutes on a CPU), samples it with fastdiff and writes, to outputs/demo/:
samples.png, reverse_process.gif, forward_process.png, loss_curve.png, timing.md and model.pt.
Needs the demo extras: matplotlib, pillow, scikit-learn (diffusers for its timing row)."""
from .cli import main

__all__ = ["main"]
