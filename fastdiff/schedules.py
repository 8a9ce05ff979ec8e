"""Beta / alpha-bar tables, equal to diffusers' float32 tables bit for bit.

Sources:
- linear: Ho et al. 2020, "Denoising Diffusion Probabilistic Models", sec. 4 (beta 1e-4 .. 0.02).
- scaled_linear: Stable Diffusion (linear in sqrt(beta)), as diffusers builds it.
- squaredcos_cap_v2: Nichol & Dhariwal 2021, "Improved DDPM", eq. 17 (s = 0.008, beta <= 0.999).
- sigmoid: diffusers' form, sigmoid(linspace(-6, 6, T)) scaled into [beta_start, beta_end].
- laplace: diffusers' DDPMScheduler "laplace" (Hang et al. 2024, "Improved Noise Schedule for
  Diffusion Training": logSNR Laplace-distributed around 0), discretised like squaredcos_cap_v2.
- sigmoid_2015: Sohl-Dickstein et al. 2015, sigmoid(linspace(-18, 10, T)) * (0.3 - 1e-5) + 1e-5.
- rescale_betas_zero_snr: Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps
  are Flawed", Algorithm 1.
Every table is built the way diffusers builds it (same dtype, same operation order), so
`alphas_cumprod` is identical, not merely close.

Where diffusers is silent about a config that cannot mean what it says, we warn:
- `trained_betas` longer than `num_train_timesteps`: diffusers keeps them all in `.betas` but its
  steps only ever read the first num_train_timesteps (every timestep is < num_train_timesteps);
  we keep those first ones and warn. Shorter: diffusers fails with an IndexError at the first
  step past the end; we raise a ValueError at construction.
- a `variance_type` DDPM does not know: diffusers' step falls through to the posterior variance
  (fixed_small) without a word; `effective_variance_type` does the same and warns.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, Sequence

import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "sigmoid_2015", "laplace")


def linear_betas(num_train_timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)


def scaled_linear_betas(num_train_timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2


def betas_for_alpha_bar(num_train_timesteps: int, alpha_bar: Callable[[float], float],
                        max_beta: float = 0.999) -> torch.Tensor:
    """beta_t = min(1 - abar((t+1)/T) / abar(t/T), max_beta) in Python floats, then float32 (as diffusers)."""
    T = num_train_timesteps
    betas = [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta) for i in range(T)]
    return torch.tensor(betas, dtype=torch.float32)


def cosine_betas(num_train_timesteps: int, max_beta: float = 0.999, s: float = 0.008) -> torch.Tensor:
    """Improved DDPM eq. 17: beta_t = min(1 - abar(t+1)/abar(t), max_beta), abar = cos^2."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + s) / (1 + s) * math.pi / 2) ** 2

    return betas_for_alpha_bar(num_train_timesteps, alpha_bar, max_beta)


def laplace_betas(num_train_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """diffusers' "laplace": logSNR(t) = -0.5 sign(0.5 - t) log(1 - 2 |0.5 - t| + 1e-6), abar = sqrt(snr / (1 + snr))."""

    def alpha_bar(t: float) -> float:
        lmb = -0.5 * math.copysign(1, 0.5 - t) * math.log(1 - 2 * math.fabs(0.5 - t) + 1e-6)
        snr = math.exp(lmb)
        return math.sqrt(snr / (1 + snr))

    return betas_for_alpha_bar(num_train_timesteps, alpha_bar, max_beta)


def sigmoid_betas(num_train_timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    return torch.sigmoid(torch.linspace(-6, 6, num_train_timesteps)) * (beta_end - beta_start) + beta_start


def sigmoid_2015_betas(num_train_timesteps: int) -> torch.Tensor:
    """Sohl-Dickstein et al. 2015 (their released code): sigmoid(linspace(-18, 10)) in [1e-5, 0.3]."""
    return torch.sigmoid(torch.linspace(-18, 10, num_train_timesteps)) * (0.3 - 1e-5) + 1e-5


def rescale_betas_zero_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023, Algorithm 1: shift and scale sqrt(abar) so that abar_T = 0 exactly."""
    alphas_bar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt -= last
    alphas_bar_sqrt *= first / (first - last)
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


def make_betas(
    num_train_timesteps: int,
    beta_start: float = 0.0001,
    beta_end: float = 0.02,
    beta_schedule: str = "linear",
    trained_betas: Sequence[float] | None = None,
    rescale_zero_snr: bool = False,
) -> torch.Tensor:
    """The float32 beta table for a diffusers-style config."""
    if not isinstance(num_train_timesteps, int) or num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be a positive int, got {num_train_timesteps!r}")
    if trained_betas is not None:
        betas = torch.tensor(trained_betas, dtype=torch.float32)
        if betas.ndim != 1 or len(betas) < num_train_timesteps:
            raise ValueError(
                f"trained_betas must be 1-D with num_train_timesteps={num_train_timesteps} entries, "
                f"got shape {tuple(betas.shape)} (diffusers accepts fewer, then fails with an IndexError at "
                "the first timestep past their end)"
            )
        if len(betas) > num_train_timesteps:
            warnings.warn(
                f"trained_betas has {len(betas)} entries but num_train_timesteps={num_train_timesteps}: using the "
                f"first {num_train_timesteps} (diffusers keeps all of them in .betas, silently, and its steps read "
                "only those); pass num_train_timesteps=len(trained_betas) to use them all",
                stacklevel=3,
            )
            betas = betas[:num_train_timesteps]
    elif beta_schedule == "linear":
        betas = linear_betas(num_train_timesteps, beta_start, beta_end)
    elif beta_schedule == "scaled_linear":
        betas = scaled_linear_betas(num_train_timesteps, beta_start, beta_end)
    elif beta_schedule == "squaredcos_cap_v2":
        betas = cosine_betas(num_train_timesteps)
    elif beta_schedule == "sigmoid":
        betas = sigmoid_betas(num_train_timesteps, beta_start, beta_end)
    elif beta_schedule == "sigmoid_2015":
        betas = sigmoid_2015_betas(num_train_timesteps)
    elif beta_schedule == "laplace":
        betas = laplace_betas(num_train_timesteps)
    else:
        raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES} (or pass trained_betas), got {beta_schedule!r}")
    return rescale_betas_zero_snr(betas) if rescale_zero_snr else betas


def alphas_cumprod_from_betas(betas: torch.Tensor) -> torch.Tensor:
    """abar_t = prod_{s<=t} (1 - beta_s)  (DDPM eq. 4 notation), in float32 as diffusers."""
    return torch.cumprod(1.0 - betas, dim=0)


def effective_variance_type(variance_type: str, known: Sequence[str], *, warn: bool = True) -> str:
    """The DDPM variance type a step uses: `variance_type` if known, else "fixed_small" (with a warning).

    diffusers' DDPMScheduler accepts any string and, for one it does not know, adds noise with the
    posterior variance beta~_t (its `_get_variance` falls through, its step takes the square root):
    fixed_small, silently. Samplers call this with warn=True once, when they are built.
    """
    if variance_type in known:
        return variance_type
    if warn:
        warnings.warn(f"variance_type={variance_type!r} is not one of {tuple(known)}: sampling with 'fixed_small' "
                      "(the posterior variance), as diffusers' DDPMScheduler does without a warning", stacklevel=3)
    return "fixed_small"
