"""EulerAncestralDiscreteSampler: a drop-in for diffusers' EulerAncestralDiscreteScheduler, a table builder
on the fused step.

Euler ancestral as in k-diffusion (`sample_euler_ancestral`, `get_ancestral_step`; Karras et al.
2022 sec. 4 for the sigma view): step from sigma to sigma_down with the ODE, then add fresh noise
of std sigma_up, so that the marginal at sigma_next is right:

    sigma_up   = sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2)
    sigma_down = sqrt(sigma_next^2 - sigma_up^2)
    x0         = x - sigma eps     (epsilon; v: eps (-sigma / sqrt(sigma^2 + 1)) + x / (sigma^2 + 1))
    x'         = x + (x - x0) / sigma (sigma_down - sigma) + sigma_up n

so a row is x' = q x + (1 - q) x0 + NOISE_STD n with q = sigma_down / sigma (the update rewritten
as an interpolation: no cancellation when sigma_down << sigma) and NOISE_STD = sigma_up (0 at the
last step, where diffusers still draws the noise). The model input is x / sqrt(sigma^2 + 1)
(INPUT_DIVISOR).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from .. import tables as T
from . import sigmas as S
from .base import table_dtype
from .config import register_to_config
from .sigma_base import VPSigmaSampler, check_vp_sigma_config, euler_timesteps, init_vp_sigma_schedule, vp_x0_columns

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")  # accepted as diffusers does; "sample" cannot step


class EulerAncestralDiscreteSampler(VPSigmaSampler):
    """Same constructor, config keys and defaults as `diffusers.EulerAncestralDiscreteScheduler`, plus `table_dtype`.

    Differences, on purpose: `step` and `scale_model_input` never synchronise with the device; the
    step's noise is made in the kernel (`seed=`, counter = step index; by default a seed from torch's
    default generator) unless `generator=` (drawn exactly as diffusers draws it, every step) or
    `variance_noise=` is given; `guidance_scale=` (CFG fused), `skip_layer_output=` /
    `skip_layer_guidance_scale=`, `sample_offset=` and `out=` as in EulerDiscreteSampler; output in
    the sample's dtype. A negative sigma_down^2 from rounding is clamped at 0 (diffusers: NaN).
    """

    diffusers_class_name = "EulerAncestralDiscreteScheduler"

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, prediction_type: str = "epsilon",
                 timestep_spacing: str = "linspace", steps_offset: int = 0, rescale_betas_zero_snr: bool = False,
                 table_dtype: str = "float32"):
        check_vp_sigma_config(self.config, PREDICTION_TYPES)
        init_vp_sigma_schedule(self)
        sigmas = np.concatenate([S.vp_sigmas(self.alphas_cumprod)[::-1], [0.0]]).astype(np.float32)
        timesteps = torch.from_numpy(np.linspace(0, num_train_timesteps - 1, num_train_timesteps, dtype=float)[::-1].copy())
        self.is_scale_input_called = False
        self._set_schedule(torch.from_numpy(sigmas), timesteps, None, None)

    @property
    def init_noise_sigma(self) -> torch.Tensor:
        """Standard deviation of x_T: sigma_max, or sqrt(sigma_max^2 + 1) for "leading" spacing (as diffusers)."""
        if self.config.timestep_spacing in ("linspace", "trailing"):
            return self.sigmas.max()
        return (self.sigmas.max() ** 2 + 1) ** 0.5

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """diffusers' spaced timesteps and their linearly interpolated sigmas (and a final 0), then the table."""
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)) \
                or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be an int >= 1, got {num_inference_steps!r}")
        config, n = self.config, int(num_inference_steps)
        timesteps = euler_timesteps(config.num_train_timesteps, n, config.timestep_spacing, config.steps_offset)
        train_sigmas = S.vp_sigmas(self.alphas_cumprod)
        sigmas = np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)
        sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
        self._set_schedule(torch.from_numpy(sigmas), torch.from_numpy(timesteps), device, n)

    def _build_table(self) -> torch.Tensor:
        """One row per step: the ancestral step (k-diffusion's get_ancestral_step), in diffusers' float32 order."""
        dtype = table_dtype(self.config.table_dtype)
        sigmas = self.sigmas.to(dtype)
        sigma_from, sigma_to = sigmas[:-1], sigmas[1:]
        sigma_up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
        sigma_down = torch.clamp(sigma_to**2 - sigma_up**2, min=0) ** 0.5  # NaN policy: rounding below 0
        q = sigma_down / sigma_from  # x' = x + (x - x0) / sigma (sigma_down - sigma) = q x + (1 - q) x0
        return T.step_table(len(sigma_from), dtype=dtype,
                            **vp_x0_columns(self.config.prediction_type, sigma_from, sigma_from),
                            out_x=q, out_x0=1 - q, noise_std=sigma_up, input_divisor=(sigma_from**2 + 1) ** 0.5)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True, *, variance_noise: Optional[torch.Tensor] = None, seed: Optional[int] = None,
             guidance_scale: Optional[float] = None, skip_layer_output: Optional[torch.Tensor] = None,
             skip_layer_guidance_scale: float = 0.0, sample_offset: int = 0, out: Optional[torch.Tensor] = None):
        """One ancestral Euler step in one fused op; noise at every step, as diffusers (`out=`: see BaseSampler)."""
        if self.config.prediction_type == "sample":
            raise NotImplementedError("prediction_type='sample' is not implemented for Euler ancestral (as in diffusers)")
        extra, extra_scale = self._skip_layer_guidance(skip_layer_output, skip_layer_guidance_scale)
        self._check_step_inputs(model_output, sample, guidance_scale, guidance_extra=extra)
        index = self._step_index_tensor(timestep, sample.device)
        table = self._table(sample.device)
        noise, seed = self._noise(sample, model_output, generator, variance_noise, seed, True)
        return self._run_step(model_output, sample, table, index, noise=noise, seed=seed, sample_offset=sample_offset,
                              guidance_scale=guidance_scale, guidance_extra=extra, extra_scale=extra_scale,
                              advance=True, out=out, return_dict=return_dict)
