"""DDPMSampler: a drop-in for diffusers' DDPMScheduler (Ho et al. 2020), a table builder on the fused step.

The reverse step (DDPM eq. 6-7, Algorithm 2), with prev the next timestep of the schedule:

    x0      = (x - sqrt(1 - abar_t) eps) / sqrt(abar_t)                          (eq. 15; or v / sample)
    x_prev  = sqrt(abar_prev) beta_t / (1 - abar_t) x0
              + sqrt(alpha_t) (1 - abar_prev) / (1 - abar_t) x  +  sigma_t n      (eq. 7)

beta_t = 1 - abar_t / abar_prev; sigma_t^2 = the posterior variance (1 - abar_prev) / (1 - abar_t)
beta_t ("fixed_small"), beta_t ("fixed_large"), or learned (IDDPM eq. 15); no noise at t = 0.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from .. import tables as T
from .base import BaseSampler, check_choice, check_vp_config, spaced_timesteps, table_dtype
from .config import register_to_config

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")


def x0_coefficients(prediction_type: str, abar_t: torch.Tensor) -> dict[str, torch.Tensor]:
    """x0 = (x0_x x + x0_m m) x0_scale for a VP model output m (as diffusers' DDPM / DDIM compute it)."""
    one, beta_prod_t = torch.ones_like(abar_t), 1 - abar_t
    if prediction_type == "epsilon":  # DDPM eq. 15
        return {"x0_x": one, "x0_m": -beta_prod_t ** 0.5, "x0_scale": 1 / abar_t ** 0.5}
    if prediction_type == "sample":
        return {"x0_x": 0 * one, "x0_m": one, "x0_scale": one}
    if prediction_type == "v_prediction":  # Salimans & Ho 2022, sec. 4
        return {"x0_x": abar_t ** 0.5, "x0_m": -beta_prod_t ** 0.5, "x0_scale": one}
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


class DDPMSampler(BaseSampler):
    """Same constructor, config keys and defaults as `diffusers.DDPMScheduler`.

    Differences, all on purpose: `step` never synchronises with the device; it also takes
    `variance_noise=`, `seed=` (in-kernel Philox noise), `guidance_scale=` (CFG fused into the
    step, model_output = [uncond; cond]) and `sample_offset=` (global index of sample 0, for
    noise that does not depend on how a batch is split); NaN cases of diffusers are finite
    (fixed_large_log: std = sqrt(beta_t); learned: a negative variance is clamped at 0); a
    timestep outside the schedule raises instead of an IndexError. `table_dtype="float64"`
    derives the coefficients in float64 instead of diffusers' float32.
    """

    diffusers_class_name = "DDPMScheduler"
    keyed_by_timestep = True

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, variance_type: str = "fixed_small",
                 clip_sample: bool = True, prediction_type: str = "epsilon", thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, clip_sample_range: float = 1.0,
                 sample_max_value: float = 1.0, timestep_spacing: str = "leading", steps_offset: int = 0,
                 rescale_betas_zero_snr: bool = False, table_dtype: str = "float32"):
        check_choice("variance_type", variance_type, VARIANCE_TYPES)
        check_vp_config(self.config, PREDICTION_TYPES)
        self._init_schedule(self.config)
        self._set_schedule(np.arange(0, num_train_timesteps)[::-1].copy(), device=None)

    @property
    def variance_type(self) -> str:
        return self.config.variance_type

    @property
    def variance_mode(self) -> int:
        return {"learned": T.VAR_SQRT, "learned_range": T.VAR_EXP}.get(self.config.variance_type, T.VAR_FIXED)

    # ---- the table ----------------------------------------------------------------------------
    def _build_table(self) -> torch.Tensor:
        """One row per training timestep t (NaN for t not in the schedule), in diffusers' operation order."""
        config, dtype = self.config, table_dtype(self.config.table_dtype)
        T_ = config.num_train_timesteps
        steps = self.timesteps.cpu().numpy()
        t = torch.from_numpy(steps)
        prev = torch.from_numpy(np.append(steps[1:], -1))
        abar = self.alphas_cumprod.to(dtype)
        abar_t = abar[t]
        abar_prev = torch.where(prev >= 0, abar[prev.clamp(min=0)], torch.ones_like(abar_t))
        beta_prod_t, beta_prod_t_prev = 1 - abar_t, 1 - abar_prev
        current_alpha_t = abar_t / abar_prev
        current_beta_t = 1 - current_alpha_t
        rows = {
            **x0_coefficients(config.prediction_type, abar_t),
            "out_x0": (abar_prev ** 0.5 * current_beta_t) / beta_prod_t,  # eq. 7
            "out_x": current_alpha_t ** 0.5 * beta_prod_t_prev / beta_prod_t,  # eq. 7
            **self._noise_columns(beta_prod_t_prev / beta_prod_t * current_beta_t, current_beta_t),
            "noise_counter": t.to(dtype),  # Philox counter: the timestep (seeded noise keyed by t)
        }
        rows["noise_std"] = torch.where(t > 0, rows["noise_std"], 0)  # diffusers adds no noise at t = 0
        full = {name: torch.full((T_,), float("nan"), dtype=dtype).index_copy_(0, t, value.to(dtype))
                for name, value in rows.items()}
        return T.step_table(T_, dtype=dtype, **full)

    def _noise_columns(self, posterior_variance: torch.Tensor, beta_t: torch.Tensor) -> dict[str, torch.Tensor]:
        """std of the noise (diffusers' `_get_variance` and its square root), or the learned-variance map.

        fixed_large_log: diffusers takes the square root of log(beta_t) (NaN); we read it as the
        log-variance it names: std = exp(log(beta_t) / 2) = sqrt(beta_t), as fixed_large.
        learned_range (IDDPM eq. 15): log var = frac log beta_t + (1 - frac) log beta~_t, frac = (v + 1) / 2,
        i.e. std = exp(bias + slope v) with bias = (max + min) / 4, slope = (max - min) / 4.
        """
        variance = torch.clamp(posterior_variance, min=1e-20)
        variance_type, one = self.config.variance_type, torch.ones_like(variance)
        if variance_type == "fixed_small":
            return {"noise_std": variance ** 0.5}
        if variance_type == "fixed_small_log":
            return {"noise_std": torch.exp(0.5 * torch.log(variance))}
        if variance_type in ("fixed_large", "fixed_large_log"):
            return {"noise_std": beta_t ** 0.5}
        if variance_type == "learned":
            return {"noise_std": one}
        min_log, max_log = torch.log(variance), torch.log(beta_t)
        return {"noise_std": one, "var_bias": (max_log + min_log) / 4, "var_slope": (max_log - min_log) / 4}

    # ---- timesteps ----------------------------------------------------------------------------
    def _set_schedule(self, timesteps: np.ndarray, device) -> None:
        self.timesteps = torch.from_numpy(timesteps).to(device)
        self._schedule = set(timesteps.tolist())
        self._previous = dict(zip(timesteps.tolist(), timesteps[1:].tolist() + [-1]))
        self._tables, self._table_config = {}, None
        self._table(torch.device(device or "cpu"))  # build now: step only looks it up

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device: str | torch.device | None = None,
                      timesteps: Optional[list[int]] = None) -> None:
        """Choose the inference timesteps (spacing from the config, or custom descending `timesteps`)."""
        T_ = self.config.num_train_timesteps
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError("pass either num_inference_steps or timesteps, not both")
        if timesteps is not None:
            steps = np.array(list(timesteps), dtype=np.int64)
            if steps.ndim != 1 or len(steps) == 0 or np.any(np.diff(steps) >= 0) or steps[0] >= T_ or steps[-1] < 0:
                raise ValueError(f"timesteps must be a non-empty strictly descending list in [0, {T_}), got {list(timesteps)}")
            self.custom_timesteps, self.num_inference_steps = True, len(steps)
        else:
            if not isinstance(num_inference_steps, (int, np.integer)) or not 1 <= num_inference_steps <= T_:
                raise ValueError(f"num_inference_steps must be an int in [1, num_train_timesteps={T_}], "
                                 f"got {num_inference_steps!r}")
            steps = spaced_timesteps(T_, int(num_inference_steps), self.config.timestep_spacing, self.config.steps_offset)
            if steps.min() < 0 or steps.max() >= T_:
                raise ValueError(f"steps_offset={self.config.steps_offset} moves timesteps outside [0, {T_}): {steps.tolist()}")
            self.custom_timesteps, self.num_inference_steps = False, int(num_inference_steps)
        self._set_schedule(steps, device)

    def previous_timestep(self, timestep):
        """The next timestep of the schedule (-1 after the last), as diffusers defines it."""
        prev = self._previous.get(int(timestep))
        if prev is None:
            self._check_host_timestep(int(timestep))
        return torch.tensor(prev) if isinstance(timestep, torch.Tensor) else prev

    def _check_host_timestep(self, t: int) -> None:
        if t not in self._schedule:
            shown = sorted(self._schedule, reverse=True)
            shown = shown if len(shown) <= 12 else shown[:6] + ["..."] + shown[-6:]
            raise ValueError(f"timestep {t} is not in the schedule set by set_timesteps: {shown}")

    # ---- the step -----------------------------------------------------------------------------
    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True, *, variance_noise: Optional[torch.Tensor] = None, seed: Optional[int] = None,
             guidance_scale: Optional[float] = None, sample_offset: int = 0, out: Optional[torch.Tensor] = None):
        """One reverse step x_t -> x_{t-1} (DDPM Algorithm 2 / eq. 7) in one fused op (`out=`: see BaseSampler)."""
        learned = self.config.variance_type in ("learned", "learned_range")
        self._check_step_inputs(model_output, sample, guidance_scale, learned)
        if self.config.variance_type == "learned" and model_output.shape[1] != 2 * sample.shape[1]:
            raise ValueError(f"variance_type='learned' needs model_output with 2 x {sample.shape[1]} channels, "
                             f"got {model_output.shape[1]}")
        index = self._timestep_index(timestep, sample.device)
        host_last = not isinstance(timestep, torch.Tensor) and int(timestep) == 0  # diffusers draws no noise at t=0
        noise, seed = self._noise(sample, model_output, generator, variance_noise, seed, not host_last)
        return self._run_step(model_output, sample, self._table(sample.device), index, noise=noise, seed=seed,
                              sample_offset=sample_offset, guidance_scale=guidance_scale, advance=False,
                              out=out, return_dict=return_dict)
