"""Sigma schedules shared by the sigma-parameterised samplers (Euler, Euler ancestral, flow-matching
Euler, DPM-Solver, UniPC): small functions, each a twin of one of diffusers' scheduler helpers.

Every function computes what its diffusers twin computes, with the same dtypes (numpy float64 or
float32, torch float32) and the same operation order, so a schedule built here equals diffusers'
bit for bit; the diffusers method each one mirrors is named in its docstring. They take the
config values as arguments instead of reading `self.config`. Names are stable: other samplers
import them.

Notation: VP sigma = sqrt((1 - abar) / abar) (the noise-to-signal ratio, Karras et al. 2022,
"Elucidating the Design Space of Diffusion-Based Generative Models", EDM, sec. 2 / Table 1);
flow sigma = the noise fraction t of a rectified flow x_t = (1 - t) x0 + t n (Liu et al. 2022;
Esser et al. 2024, "Scaling Rectified Flow Transformers", SD3, sec. 2 and 5.3.2).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch

KARRAS_RHO = 7.0  # EDM eq. 5, the paper's value
TIME_SHIFT_TYPES = ("exponential", "linear")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")


# ---- VP (epsilon / v) sigma schedules ---------------------------------------------------------------
def vp_sigmas(alphas_cumprod: torch.Tensor) -> np.ndarray:
    """sigma_t = sqrt((1 - abar_t) / abar_t) for t = 0 .. T - 1 (ascending in t), float32 numpy.

    diffusers: `np.array(((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5)` (Euler, DPM-Solver, UniPC).
    """
    return (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).numpy().copy()  # the same values, no numpy 2 warning


def _range(in_sigmas, sigma_min: Optional[float], sigma_max: Optional[float]) -> tuple[float, float]:
    """The config's sigma_min / sigma_max when set, else the ends of `in_sigmas` (descending)."""
    sigma_min = sigma_min if sigma_min is not None else in_sigmas[-1].item()
    sigma_max = sigma_max if sigma_max is not None else in_sigmas[0].item()
    return sigma_min, sigma_max


def karras_sigmas(in_sigmas, num_inference_steps: int, sigma_min: Optional[float] = None,
                  sigma_max: Optional[float] = None, rho: float = KARRAS_RHO) -> np.ndarray:
    """EDM eq. 5: (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, float64.

    diffusers: `EulerDiscreteScheduler._convert_to_karras` (and its copies); sigma_min / sigma_max are
    the config's when it has them and they are not None, else in_sigmas[-1] / in_sigmas[0].
    """
    sigma_min, sigma_max = _range(in_sigmas, sigma_min, sigma_max)
    ramp = np.linspace(0, 1, num_inference_steps)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def exponential_sigmas(in_sigmas, num_inference_steps: int, sigma_min: Optional[float] = None,
                       sigma_max: Optional[float] = None) -> np.ndarray:
    """Log-uniform sigmas from sigma_max to sigma_min, float64 (diffusers: `_convert_to_exponential`)."""
    sigma_min, sigma_max = _range(in_sigmas, sigma_min, sigma_max)
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), num_inference_steps))


def beta_sigmas(in_sigmas, num_inference_steps: int, sigma_min: Optional[float] = None,
                sigma_max: Optional[float] = None, alpha: float = 0.6, beta: float = 0.6) -> np.ndarray:
    """Lee et al. 2024, "Beta Sampling is All You Need": sigma_min + ppf_Beta(alpha, beta)(1 - i/(N-1))
    (sigma_max - sigma_min), float64 (diffusers: `_convert_to_beta`; needs scipy, as diffusers)."""
    import scipy.stats  # imported here: scipy is only needed for beta sigmas

    sigma_min, sigma_max = _range(in_sigmas, sigma_min, sigma_max)
    return np.array([sigma_min + (ppf * (sigma_max - sigma_min))
                     for ppf in [scipy.stats.beta.ppf(timestep, alpha, beta)
                                 for timestep in 1 - np.linspace(0, 1, num_inference_steps)]])


def lu_lambdas(in_lambdas, num_inference_steps: int) -> np.ndarray:
    """Lu et al. 2022 (DPM-Solver): lambda uniform from in_lambdas[0] to in_lambdas[-1], float64
    (diffusers: `DPMSolverMultistepScheduler._convert_to_lu`, rho = 1)."""
    lambda_min, lambda_max = in_lambdas[-1].item(), in_lambdas[0].item()
    rho = 1.0
    ramp = np.linspace(0, 1, num_inference_steps)
    min_inv_rho = lambda_min ** (1 / rho)
    max_inv_rho = lambda_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


SIGMA_CONVERSIONS = {"use_karras_sigmas": karras_sigmas, "use_exponential_sigmas": exponential_sigmas,
                     "use_beta_sigmas": beta_sigmas}


def sigma_conversion(config) -> Optional[str]:
    """The config key of the sigma conversion in force (use_karras_sigmas / use_exponential_sigmas /
    use_beta_sigmas) or None; more than one is an error, as in diffusers."""
    chosen = [key for key in SIGMA_CONVERSIONS if config.get(key)]
    if len(chosen) > 1:
        raise ValueError(f"only one of use_beta_sigmas, use_exponential_sigmas, use_karras_sigmas can be True, "
                         f"got {' and '.join(chosen)}")
    if chosen == ["use_beta_sigmas"]:
        try:
            import scipy.stats  # noqa: F401
        except ImportError as error:
            raise ImportError("use_beta_sigmas=True needs scipy (pip install scipy), as in diffusers") from error
    return chosen[0] if chosen else None


def convert_sigmas(conversion: Optional[str], in_sigmas, num_inference_steps: int,
                   sigma_min: Optional[float] = None, sigma_max: Optional[float] = None):
    """Apply the conversion named by `sigma_conversion` (None: in_sigmas unchanged)."""
    if conversion is None:
        return in_sigmas
    return SIGMA_CONVERSIONS[conversion](in_sigmas, num_inference_steps, sigma_min, sigma_max)


def sigma_to_t(sigma, log_sigmas: np.ndarray) -> np.ndarray:
    """The (fractional) training timestep of each sigma: piecewise-linear interpolation of log sigma
    against the training log-sigma table (diffusers: `EulerDiscreteScheduler._sigma_to_t`)."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low = log_sigmas[low_idx]
    high = log_sigmas[high_idx]
    w = (low - log_sigma) / (low - high)
    w = np.clip(w, 0, 1)
    t = (1 - w) * low_idx + w * high_idx
    return t.reshape(sigma.shape)


def sigmas_to_timesteps(sigmas, log_sigmas: np.ndarray) -> np.ndarray:
    """`np.array([_sigma_to_t(s, log_sigmas) for s in sigmas])`, as diffusers' set_timesteps writes it."""
    return np.array([sigma_to_t(sigma, log_sigmas) for sigma in sigmas])


def sigma_to_alpha_sigma_t(sigma: torch.Tensor, flow: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha_t, sigma_t) of a sigma: VP alpha_t = 1 / sqrt(sigma^2 + 1), sigma_t = sigma alpha_t; flow
    alpha_t = 1 - sigma, sigma_t = sigma (diffusers: `DPMSolverMultistepScheduler._sigma_to_alpha_sigma_t`)."""
    if flow:
        return 1 - sigma, sigma
    alpha_t = 1 / ((sigma**2 + 1) ** 0.5)
    return alpha_t, sigma * alpha_t


# ---- flow-matching (rectified flow) sigma schedules -----------------------------------------------
def flow_shift(sigmas, shift: float):
    """SD3's timestep shift (Esser et al. 2024, eq. 23): shift s / (1 + (shift - 1) s), in the input's dtype.

    diffusers: `shift * sigmas / (1 + (shift - 1) * sigmas)` (FlowMatchEulerDiscreteScheduler, and
    `flow_shift` of DPM-Solver / UniPC with use_flow_sigmas).
    """
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def time_shift_exponential(mu: float, sigma: float, t):
    """Resolution-dependent shift of Flux: e^mu / (e^mu + (1 / t - 1)^sigma) (diffusers: `_time_shift_exponential`)."""
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)


def time_shift_linear(mu: float, sigma: float, t):
    """mu / (mu + (1 / t - 1)^sigma) (diffusers: `_time_shift_linear`)."""
    return mu / (mu + (1 / t - 1) ** sigma)


def time_shift(mu: float, sigma: float, t, time_shift_type: str = "exponential"):
    """Dynamic shifting by `mu` (diffusers: `FlowMatchEulerDiscreteScheduler.time_shift`)."""
    if time_shift_type == "exponential":
        return time_shift_exponential(mu, sigma, t)
    if time_shift_type == "linear":
        return time_shift_linear(mu, sigma, t)
    raise ValueError(f"time_shift_type must be one of {TIME_SHIFT_TYPES}, got {time_shift_type!r}")


def stretch_shift_to_terminal(t, shift_terminal: float):
    """Stretch a shifted schedule so that it ends at `shift_terminal` (LTX-Video's rf.py; diffusers:
    `stretch_shift_to_terminal`): 1 - (1 - t) / ((1 - t[-1]) / (1 - shift_terminal))."""
    one_minus_z = 1 - t
    scale_factor = one_minus_z[-1] / (1 - shift_terminal)
    return 1 - (one_minus_z / scale_factor)


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                    base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """Flux's `mu` for a sequence length: linear from base_shift at base_seq_len to max_shift at max_seq_len
    (diffusers: `pipelines.flux.pipeline_flux.calculate_shift`; pass the scheduler config's values)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


def flow_sigmas(num_train_timesteps: int, num_inference_steps: int, shift: float) -> np.ndarray:
    """The use_flow_sigmas schedule of DPM-Solver / UniPC: 1 - linspace(1, 1/T, N + 1), shifted, flipped,
    the last one dropped (descending, N values, float64)."""
    alphas = np.linspace(1, 1 / num_train_timesteps, num_inference_steps + 1)
    sigmas = 1.0 - alphas
    return np.flip(flow_shift(sigmas, shift))[:-1].copy()


# ---- checks -------------------------------------------------------------------------------------
def check_descending(values: Sequence[float], name: str) -> None:
    """Custom `sigmas` / `timesteps` must be finite and strictly descending (a denoising schedule)."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or len(array) == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} must be finite, got {array.tolist()}")
    if len(array) > 1 and not (np.diff(array) < 0).all():
        shown = array.tolist() if len(array) <= 12 else array[:6].tolist() + ["..."] + array[-6:].tolist()
        raise ValueError(f"{name} must be strictly descending (noisiest first), got {shown}")


# ---- multistep solvers' timesteps (DPM-Solver multistep, UniPC) ----------------------------------------
def lambda_clipped_last_timestep(lambda_t: torch.Tensor, lambda_min_clipped: float, num_train_timesteps: int) -> int:
    """How many training timesteps keep lambda(t) = log(alpha_t / sigma_t) >= lambda_min_clipped (the
    spacings then end there; -inf keeps them all). Critical for the cosine schedule, whose last lambdas
    dive. diffusers: `DPMSolverMultistepScheduler.set_timesteps`, `searchsorted(flip(lambda_t), clip)`."""
    clipped_idx = torch.searchsorted(torch.flip(lambda_t, [0]), lambda_min_clipped)
    return int(num_train_timesteps - int(clipped_idx))


def multistep_timesteps(num_inference_steps: int, timestep_spacing: str, steps_offset: int,
                        num_train_timesteps: int, last_timestep: Optional[int] = None) -> np.ndarray:
    """The N descending int64 timesteps of DPM-Solver multistep / UniPC for a spacing (Lin et al. 2023,
    Table 2). Unlike DDPM / DDIM, linspace and leading space N + 1 points and drop the last (t = 0).
    `last_timestep` (default num_train_timesteps) is where lambda_min_clipped ends the schedule.
    diffusers: `DPMSolverMultistepScheduler.set_timesteps` / `UniPCMultistepScheduler.set_timesteps`."""
    n = num_inference_steps
    last = num_train_timesteps if last_timestep is None else last_timestep
    if timestep_spacing == "linspace":
        return np.linspace(0, last - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
    if timestep_spacing == "leading":
        step_ratio = last // (n + 1)
        return (np.arange(0, n + 1) * step_ratio).round()[::-1][:-1].copy().astype(np.int64) + steps_offset
    if timestep_spacing == "trailing":
        step_ratio = num_train_timesteps / n
        return np.arange(last, 0, -step_ratio).round().copy().astype(np.int64) - 1
    raise ValueError(f"timestep_spacing must be one of ('linspace', 'leading', 'trailing'), got {timestep_spacing!r}")
