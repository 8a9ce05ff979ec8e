"""Per-step coefficient tables: the device state a step reads (see DESIGN "How a call flows").

A sampler computes, once in `set_timesteps`, a float32 table of shape [T + 1, WIDTH] indexed by
the timestep itself (T = num_train_timesteps): row t holds every scalar a step at timestep t
needs, derived in float64 from diffusers' float32 `alphas_cumprod`; row T (and every row of a
timestep outside the schedule) is NaN, so a bad device-side timestep gives NaN, never a silent
wrong sample. A step gathers one row (`row_index`): a view for a host timestep, a device gather
for a device timestep; no host synchronisation either way.

Column layout (shared by the reference, the Triton kernels and csrc/step_coefs.h):
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

WIDTH = 8

# Columns common to every step table.
TIMESTEP = 0  # t as a float (exact below 2**24): the Philox step counter of this step's noise
SQRT_ABAR = 1  # sqrt(abar_t)
SQRT_1M_ABAR = 2  # sqrt(1 - abar_t)

# DDPM (Ho et al. 2020, eq. 6-7), prev = previous timestep of the schedule:
DDPM_C_X0 = 3  # sqrt(abar_prev) beta_t / (1 - abar_t)            posterior mean coefficient of x0
DDPM_C_XT = 4  # sqrt(alpha_t) (1 - abar_prev) / (1 - abar_t)      posterior mean coefficient of x_t
DDPM_STD = 5  # noise std for fixed variance types; a 0/1 gate for learned ones; 0 when t == 0
DDPM_MIN_LOG = 6  # log of the clamped posterior variance (learned_range lower end)
DDPM_MAX_LOG = 7  # log beta_t (learned_range upper end)

# DDIM (Song et al. 2021, eq. 12 and 16), prev = t - T // num_inference_steps:
DDIM_SQRT_ABAR_PREV = 3  # sqrt(abar_prev)
DDIM_1M_ABAR_PREV = 4  # 1 - abar_prev
DDIM_SIGMA = 5  # sigma_t at eta = 1: sqrt((1 - abar_prev) / (1 - abar_t) (1 - abar_t / abar_prev))

# Variance types, as ints for the kernels (names as in diffusers' `variance_type`).
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")
LEARNED_VARIANCE_TYPES = ("learned", "learned_range")
VAR_FIXED, VAR_LEARNED, VAR_LEARNED_RANGE = 0, 1, 2  # how a kernel gets the std of the noise
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")  # kernel code = index in this tuple


def variance_mode(variance_type: str) -> int:
    return {"learned": VAR_LEARNED, "learned_range": VAR_LEARNED_RANGE}.get(variance_type, VAR_FIXED)


def prediction_code(prediction_type: str) -> int:
    return PREDICTION_TYPES.index(prediction_type)


def _empty_rows(num_train_timesteps: int) -> list[list[float]]:
    return [[math.nan] * WIDTH for _ in range(num_train_timesteps + 1)]


def _as_table(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64).float()  # derived in float64, stored in float32


def _fill_common(row: list[float], t: int, abar_t: float) -> None:
    row[TIMESTEP] = float(t)
    row[SQRT_ABAR] = math.sqrt(abar_t)
    row[SQRT_1M_ABAR] = math.sqrt(1.0 - abar_t)


def ddpm_noise_std(variance_type: str, posterior_variance: float, beta_t: float) -> float:
    """std of the noise for fixed variance types (diffusers' `_get_variance`, then its sqrt).

    fixed_large_log: diffusers returns log(beta_t) and then takes its square root (NaN, since
    log(beta_t) < 0). We read the value as what it names, a log-variance: std = exp(log(beta_t)/2)
    = sqrt(beta_t), the same noise as fixed_large. Learned types: a 1.0 gate (std comes from the
    model output per element).
    """
    if variance_type in ("fixed_small", "fixed_small_log"):
        return math.sqrt(max(posterior_variance, 1e-20))  # DDPM sec. 3.2, sigma^2 = beta~_t
    if variance_type in ("fixed_large", "fixed_large_log"):
        return math.sqrt(beta_t)  # DDPM sec. 3.2, sigma^2 = beta_t
    return 1.0


def ddpm_table(alphas_cumprod: torch.Tensor, timesteps: Sequence[int], variance_type: str) -> torch.Tensor:
    """Rows for the timesteps of a DDPM schedule; prev of timesteps[i] is timesteps[i + 1] (or -1)."""
    abar = alphas_cumprod.to(torch.float32).double().tolist()  # diffusers' float32 values, exactly
    table = _empty_rows(len(abar))
    steps = [int(t) for t in timesteps]
    for i, t in enumerate(steps):
        prev = steps[i + 1] if i + 1 < len(steps) else -1
        abar_t, abar_prev = abar[t], (abar[prev] if prev >= 0 else 1.0)
        alpha_t = abar_t / abar_prev  # the "current" alpha between two schedule entries
        beta_t = 1.0 - alpha_t
        posterior_variance = (1.0 - abar_prev) / (1.0 - abar_t) * beta_t  # DDPM eq. 7, beta~_t
        row = table[t]
        _fill_common(row, t, abar_t)
        row[DDPM_C_X0] = math.sqrt(abar_prev) * beta_t / (1.0 - abar_t)  # DDPM eq. 7
        row[DDPM_C_XT] = math.sqrt(alpha_t) * (1.0 - abar_prev) / (1.0 - abar_t)  # DDPM eq. 7
        row[DDPM_STD] = ddpm_noise_std(variance_type, posterior_variance, beta_t) if t > 0 else 0.0
        row[DDPM_MIN_LOG] = math.log(max(posterior_variance, 1e-20))  # Improved DDPM eq. 15
        row[DDPM_MAX_LOG] = math.log(beta_t) if beta_t > 0 else -math.inf
    return _as_table(table)


def ddim_table(alphas_cumprod: torch.Tensor, step_ratio: int, final_alpha_cumprod: float) -> torch.Tensor:
    """Rows for every training timestep t; prev = t - step_ratio (DDIM, diffusers' rule)."""
    abar = alphas_cumprod.to(torch.float32).double().tolist()
    table = _empty_rows(len(abar))
    for t, abar_t in enumerate(abar):
        prev = t - step_ratio
        abar_prev = abar[prev] if prev >= 0 else final_alpha_cumprod
        row = table[t]
        _fill_common(row, t, abar_t)
        row[DDIM_SQRT_ABAR_PREV] = math.sqrt(abar_prev)
        row[DDIM_1M_ABAR_PREV] = 1.0 - abar_prev
        variance = (1.0 - abar_prev) / (1.0 - abar_t) * (1.0 - abar_t / abar_prev)  # DDIM eq. 16
        row[DDIM_SIGMA] = math.sqrt(max(variance, 0.0))
        row[6:] = [0.0, 0.0]
    return _as_table(table)


def device_row_index(timestep: torch.Tensor, num_train_timesteps: int) -> torch.Tensor:
    """Row index (shape [1]) of a device timestep; out-of-range ones map to the NaN row T (no sync)."""
    t = timestep.reshape(1).to(torch.int64)
    in_range = (t >= 0) & (t < num_train_timesteps)
    return torch.where(in_range, t, torch.full_like(t, num_train_timesteps))


def gather_row(table: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    """The row of a device timestep by a gather. (`table[t]` with a 0-d tensor t would call
    .item(), a host sync on an accelerator.)"""
    return table.index_select(0, device_row_index(timestep, table.shape[0] - 1))[0]
