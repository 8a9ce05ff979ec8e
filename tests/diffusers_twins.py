"""diffusers schedulers to compare with: stock, and with float64 coefficient tables.

diffusers derives per-step coefficients in float32 (e.g. beta_t = 1 - abar_t / abar_prev, which
cancels); fastdiff derives them in float64 from the same float32 abar table. Promoting diffusers'
tables to float64 gives the same math with exact coefficients: that twin must match fastdiff to
the DESIGN fp32 tolerance. Stock diffusers differs by its own float32 rounding
(STOCK_DIFFUSERS_ATOL, measured: up to ~1e-5 per step in a 1000-step schedule).
"""
import diffusers
import torch

STOCK_DIFFUSERS_ATOL = 5e-5
FP32 = dict(atol=1e-6, rtol=1e-5)


def stock(name, **config):
    return getattr(diffusers, name)(**config)


def exact(name, **config):
    s = stock(name, **config)
    s.alphas_cumprod = s.alphas_cumprod.double()
    s.one = torch.tensor(1.0, dtype=torch.float64)
    if hasattr(s, "final_alpha_cumprod"):
        s.final_alpha_cumprod = torch.as_tensor(s.final_alpha_cumprod).double()
    return s


def buildable_compatible_names(scheduler) -> set[str]:
    """Names in a diffusers scheduler's `compatibles` that can be built here: diffusers lists
    placeholders (metaclass DummyObject) for classes whose optional package is missing, e.g.
    DPMSolverSDEScheduler without torchsde; fastdiff's `compatibles` leaves those out."""
    return {c.__name__ for c in scheduler.compatibles if type(c).__name__ != "DummyObject"}
