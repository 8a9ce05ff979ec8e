"""DDIMSampler: a drop-in for diffusers' DDIMScheduler (Song et al. 2021), a table builder on the fused step.

The step (DDIM eq. 12, sigma_t from eq. 16 scaled by eta), prev = t - T // num_inference_steps:

    x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma_t^2) eps + sigma_t n
    sigma_t = eta sqrt((1 - abar_prev) / (1 - abar_t) (1 - abar_t / abar_prev))

x0 and eps are both linear in (x, m) (or, with use_clipped_model_output, eps in (x, clipped x0)),
so a row holds their combination. The direction term is clamped at 0 for eta > 1 (diffusers: NaN).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from .. import tables as T
from .base import BaseSampler, TrainingTimestepNoising, check_vp_config, spaced_timesteps, table_dtype
from .config import register_to_config
from .ddpm import PREDICTION_TYPES, x0_coefficients


def eps_coefficients(prediction_type: str, abar_t: torch.Tensor, use_clipped: bool) -> dict[str, torch.Tensor]:
    """eps = eps_x x + eps_m m + eps_x0 x0, as diffusers' DDIM derives pred_epsilon."""
    beta_prod_t, zero, one = 1 - abar_t, torch.zeros_like(abar_t), torch.ones_like(abar_t)
    if use_clipped:  # re-derived from the clipped x0: (x - sqrt(abar) x0) / sqrt(1 - abar)
        return {"x": 1 / beta_prod_t ** 0.5, "m": zero, "x0": -abar_t ** 0.5 / beta_prod_t ** 0.5}
    if prediction_type == "epsilon":
        return {"x": zero, "m": one, "x0": zero}
    if prediction_type == "sample":  # (x - sqrt(abar) m) / sqrt(1 - abar)
        return {"x": 1 / beta_prod_t ** 0.5, "m": -abar_t ** 0.5 / beta_prod_t ** 0.5, "x0": zero}
    return {"x": beta_prod_t ** 0.5, "m": abar_t ** 0.5, "x0": zero}  # v: sqrt(abar) v + sqrt(1 - abar) x


class DDIMSampler(BaseSampler, TrainingTimestepNoising):
    """Same constructor, config keys and defaults as `diffusers.DDIMScheduler`.

    As diffusers, the previous timestep of t is t - num_train_timesteps // num_inference_steps,
    so any t in [0, num_train_timesteps) can be stepped. Extras as in DDPMSampler (`seed=`,
    `guidance_scale=`, `sample_offset=`, `table_dtype=`), no host synchronisation in `step`.
    """

    diffusers_class_name = "DDIMScheduler"
    keyed_by_timestep = True

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, clip_sample: bool = True,
                 set_alpha_to_one: bool = True, steps_offset: int = 0, prediction_type: str = "epsilon",
                 thresholding: bool = False, dynamic_thresholding_ratio: float = 0.995,
                 clip_sample_range: float = 1.0, sample_max_value: float = 1.0, timestep_spacing: str = "leading",
                 rescale_betas_zero_snr: bool = False, table_dtype: str = "float32"):
        check_vp_config(self.config, PREDICTION_TYPES)
        self._init_schedule(self.config)
        self.timesteps = torch.from_numpy(np.arange(0, num_train_timesteps)[::-1].copy())

    @property
    def final_alpha_cumprod(self) -> torch.Tensor:
        """abar after the last step (DDIM eq. 16): 1 (a clean sample) unless set_alpha_to_one=False."""
        return torch.tensor(1.0) if self.config.set_alpha_to_one else self.alphas_cumprod[0]

    def _build_table(self, eta: float = 0.0, use_clipped_model_output: bool = False) -> torch.Tensor:
        """One row per training timestep t (any t can be stepped), in diffusers' operation order."""
        config, dtype = self.config, table_dtype(self.config.table_dtype)
        T_ = config.num_train_timesteps
        t = torch.arange(T_)
        prev = t - T_ // self.num_inference_steps
        abar = self.alphas_cumprod.to(dtype)
        abar_t = abar
        abar_prev = torch.where(prev >= 0, abar[prev.clamp(min=0)], self.final_alpha_cumprod.to(dtype))
        beta_prod_t, beta_prod_t_prev = 1 - abar_t, 1 - abar_prev
        noise_free = beta_prod_t == 0  # abar_t = 1 (leading zero betas): x_t is x0 (diffusers: 0 / 0, NaN)
        variance = (beta_prod_t_prev / beta_prod_t) * (1 - abar_t / abar_prev)  # DDIM eq. 16
        variance = torch.where(noise_free, torch.zeros_like(variance), variance)  # the limit: x_prev = x0
        std_dev_t = eta * variance ** 0.5
        direction = torch.clamp(1 - abar_prev - std_dev_t ** 2, min=0) ** 0.5  # NaN policy: eta > 1
        eps = eps_coefficients(config.prediction_type, abar_t, use_clipped_model_output)
        eps = {k: torch.where(noise_free, torch.zeros_like(v), v) for k, v in eps.items()}  # direction is 0 there
        return T.step_table(T_, dtype=dtype, **x0_coefficients(config.prediction_type, abar_t),
                            out_x=direction * eps["x"], out_m=direction * eps["m"],
                            out_x0=abar_prev ** 0.5 + direction * eps["x0"],  # DDIM eq. 12
                            noise_std=std_dev_t, noise_counter=t.to(dtype))

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        T_ = self.config.num_train_timesteps
        if not isinstance(num_inference_steps, (int, np.integer)) or not 1 <= num_inference_steps <= T_:
            raise ValueError(f"num_inference_steps must be an int in [1, num_train_timesteps={T_}], "
                             f"got {num_inference_steps!r}")
        self.num_inference_steps = int(num_inference_steps)
        steps = spaced_timesteps(T_, self.num_inference_steps, self.config.timestep_spacing, self.config.steps_offset)
        self._install_schedule(torch.from_numpy(steps), device, eta=0.0, use_clipped_model_output=False)

    def previous_timestep(self, timestep):
        return timestep - self.config.num_train_timesteps // self._steps()

    def _steps(self) -> int:
        if self.num_inference_steps is None:
            raise ValueError("num_inference_steps is None: call set_timesteps(num_inference_steps) before step()")
        return self.num_inference_steps

    def _check_host_timestep(self, t: int) -> None:
        T_ = self.config.num_train_timesteps
        if not 0 <= t < T_:
            raise ValueError(f"timestep must be in [0, num_train_timesteps={T_}), got {t}")

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, eta: float = 0.0,
             use_clipped_model_output: bool = False, generator=None, variance_noise: Optional[torch.Tensor] = None,
             return_dict: bool = True, *, seed: Optional[int] = None, guidance_scale: Optional[float] = None,
             sample_offset: int = 0, out: Optional[torch.Tensor] = None,
             skip_layer_output: Optional[torch.Tensor] = None, skip_layer_guidance_scale: float = 0.0):
        """One DDIM step (DDIM eq. 12; sigma_t = eta * eq. 16) in one fused op (`out=`: see BaseSampler)."""
        self._steps()
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not eta >= 0:
            raise ValueError(f"eta must be a float >= 0, got {eta!r}")
        extra, extra_scale = self._skip_layer_guidance(skip_layer_output, skip_layer_guidance_scale)
        self._check_step_inputs(model_output, sample, guidance_scale, guidance_extra=extra)
        index, _ = self._timestep_index(timestep, sample.device)
        noise, seed = self._noise(sample, model_output, generator, variance_noise, seed, eta > 0)
        table = self._table(sample.device, eta=float(eta), use_clipped_model_output=bool(use_clipped_model_output))
        return self._run_step(model_output, sample, table, index, noise=noise if eta > 0 else None,
                              seed=seed, sample_offset=sample_offset, guidance_scale=guidance_scale, advance=False,
                              guidance_extra=extra, extra_scale=extra_scale, out=out, return_dict=return_dict)
