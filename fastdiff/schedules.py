"""Beta / alpha-bar tables, equal to diffusers' float32 tables bit for bit.

Sources:
- linear: Ho et al. 2020, "Denoising Diffusion Probabilistic Models", sec. 4 (beta 1e-4 .. 0.02).
- scaled_linear: Stable Diffusion (linear in sqrt(beta)), as diffusers builds it.
- squaredcos_cap_v2: Nichol & Dhariwal 2021, "Improved DDPM", eq. 17 (s = 0.008, beta <= 0.999).
- sigmoid: diffusers' form, sigmoid(linspace(-6, 6, T)) scaled into [beta_start, beta_end].
- sigmoid_2015: Sohl-Dickstein et al. 2015, sigmoid(linspace(-18, 10, T)) * (0.3 - 1e-5) + 1e-5.
- rescale_betas_zero_snr: Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps
  are Flawed", Algorithm 1.
Every table is built the way diffusers builds it (same dtype, same operation order), so
`alphas_cumprod` is identical, not merely close.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "sigmoid_2015")


def linear_betas(num_train_timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)


def scaled_linear_betas(num_train_timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2


def cosine_betas(num_train_timesteps: int, max_beta: float = 0.999, s: float = 0.008) -> torch.Tensor:
    """Improved DDPM eq. 17: beta_t = min(1 - abar(t+1)/abar(t), max_beta), abar = cos^2."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + s) / (1 + s) * math.pi / 2) ** 2

    T = num_train_timesteps
    betas = [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta) for i in range(T)]
    return torch.tensor(betas, dtype=torch.float32)


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
        if betas.ndim != 1 or len(betas) != num_train_timesteps:
            raise ValueError(
                f"trained_betas must be 1-D with num_train_timesteps={num_train_timesteps} entries, "
                f"got shape {tuple(betas.shape)}"
            )
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
    else:
        raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES} (or pass trained_betas), got {beta_schedule!r}")
    return rescale_betas_zero_snr(betas) if rescale_zero_snr else betas


def alphas_cumprod_from_betas(betas: torch.Tensor) -> torch.Tensor:
    """abar_t = prod_{s<=t} (1 - beta_s)  (DDPM eq. 4 notation), in float32 as diffusers."""
    return torch.cumprod(1.0 - betas, dim=0)
