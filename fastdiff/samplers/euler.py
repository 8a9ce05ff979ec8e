"""EulerDiscreteSampler: a drop-in for diffusers' EulerDiscreteScheduler, a table builder on the fused step.

Karras et al. 2022 (EDM), Algorithm 2, one Euler step per noise level of the VP model seen as a
VE ODE (sigma = sqrt((1 - abar) / abar)), with "churn" (stochastic sampling):

    gamma   = min(s_churn / N, sqrt(2) - 1)  if s_tmin <= sigma <= s_tmax  else 0      (Alg. 2 line 4)
    sigma^  = sigma (1 + gamma)
    x^      = x + s_noise sqrt(sigma^^2 - sigma^2) n                                  (line 6)
    x0      = x^ - sigma^ eps      (epsilon; v: eps (-sigma / sqrt(sigma^2 + 1)) + x^ / (sigma^2 + 1))
    d       = (x^ - x0) / sigma^                                                      (line 7)
    x'      = x^ + (sigma_next - sigma^) d                                            (line 8)

so a row is x0 = X0_X x^ + X0_M m and x' = q x^ + (1 - q) x0 with q = sigma_next / sigma^ (line 8
rewritten: x^ + (x^ - x0) (sigma_next - sigma^) / sigma^; the interpolation form has no cancellation
when sigma_next << sigma^, where diffusers' x + d dt loses ~ulp(x)), and PRE_NOISE = s_noise
sqrt(sigma^^2 - sigma^2) (noise added before the update). The model input is x / sqrt(sigma^2 + 1)
(INPUT_DIVISOR). One table per distinct (s_churn, s_tmin, s_tmax, s_noise).
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from .. import ops
from .. import tables as T
from . import sigmas as S
from .base import check_choice, table_dtype
from .config import register_to_config
from .sigma_base import (VP_PREDICTION_TYPES, VPSigmaSampler, check_vp_sigma_config, euler_timesteps,
                         init_vp_sigma_schedule, vp_x0_columns)

INTERPOLATION_TYPES = ("linear", "log_linear")
TIMESTEP_TYPES = ("discrete", "continuous")


class EulerDiscreteSampler(VPSigmaSampler):
    """Same constructor, config keys and defaults as `diffusers.EulerDiscreteScheduler`, plus `table_dtype`.

    Differences, on purpose: `step` and `scale_model_input` never synchronise with the device; `step`
    also takes `variance_noise=` / `seed=` (in-kernel Philox noise for churn, counter = step index),
    `guidance_scale=` (CFG fused, model_output = [uncond; cond]), `skip_layer_output=` /
    `skip_layer_guidance_scale=` (SD3-style extra guidance term), `sample_offset=` and `out=`;
    output in the sample's dtype (diffusers: the model output's); a step past the end of the schedule
    raises (when the host knows the index) instead of an IndexError from indexing sigmas.
    `table_dtype="float64"` derives the step coefficients in float64 from the same float32 sigmas.
    """

    diffusers_class_name = "EulerDiscreteScheduler"

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, prediction_type: str = "epsilon",
                 interpolation_type: str = "linear", use_karras_sigmas: Optional[bool] = False,
                 use_exponential_sigmas: Optional[bool] = False, use_beta_sigmas: Optional[bool] = False,
                 sigma_min: Optional[float] = None, sigma_max: Optional[float] = None,
                 timestep_spacing: str = "linspace", timestep_type: str = "discrete", steps_offset: int = 0,
                 rescale_betas_zero_snr: bool = False, final_sigmas_type: str = "zero", table_dtype: str = "float32"):
        check_vp_sigma_config(self.config, VP_PREDICTION_TYPES)
        check_choice("interpolation_type", interpolation_type, INTERPOLATION_TYPES)
        check_choice("timestep_type", timestep_type, TIMESTEP_TYPES)
        check_choice("final_sigmas_type", final_sigmas_type, S.FINAL_SIGMAS_TYPES)
        S.sigma_conversion(self.config)
        init_vp_sigma_schedule(self)
        sigmas = torch.from_numpy(S.vp_sigmas(self.alphas_cumprod)).flip(0)
        timesteps = torch.from_numpy(np.linspace(0, num_train_timesteps - 1, num_train_timesteps,
                                                 dtype=float)[::-1].copy()).to(torch.float32)
        if self._continuous_v():
            timesteps = torch.Tensor([0.25 * sigma.log() for sigma in sigmas])  # EDM's c_noise (Karras Table 1)
        self.is_scale_input_called = False
        self._set_schedule(torch.cat([sigmas, torch.zeros(1)]), timesteps, None, None)

    use_karras_sigmas = property(lambda self: self.config.use_karras_sigmas)
    use_exponential_sigmas = property(lambda self: self.config.use_exponential_sigmas)
    use_beta_sigmas = property(lambda self: self.config.use_beta_sigmas)

    def _continuous_v(self) -> bool:
        return self.config.timestep_type == "continuous" and self.config.prediction_type == "v_prediction"

    @property
    def init_noise_sigma(self) -> torch.Tensor:
        """Standard deviation of x_T: sigma_max, or sqrt(sigma_max^2 + 1) for "leading" spacing (as diffusers)."""
        max_sigma = self.sigmas.max()
        if self.config.timestep_spacing in ("linspace", "trailing"):
            return max_sigma
        return (max_sigma**2 + 1) ** 0.5

    # ---- schedule -----------------------------------------------------------------------------
    def set_timesteps(self, num_inference_steps: Optional[int] = None, device: str | torch.device | None = None,
                      timesteps: Optional[list[float]] = None, sigmas: Optional[list[float]] = None) -> None:
        """diffusers' schedule: spaced timesteps and their interpolated sigmas (or Karras / exponential / beta
        sigmas, or custom `timesteps` / `sigmas`, the final sigma included), then the step table."""
        config = self.config
        if timesteps is not None and sigmas is not None:
            raise ValueError("pass only one of timesteps and sigmas")
        if num_inference_steps is None and timesteps is None and sigmas is None:
            raise ValueError("pass exactly one of num_inference_steps, timesteps and sigmas")
        if num_inference_steps is not None and (timesteps is not None or sigmas is not None):
            raise ValueError("pass only one of num_inference_steps, timesteps and sigmas")
        conversion = S.sigma_conversion(config)
        if timesteps is not None and conversion is not None:
            raise ValueError(f"timesteps cannot be set with {conversion}=True")
        if timesteps is not None and self._continuous_v():
            raise ValueError("timesteps cannot be set with timestep_type='continuous' and prediction_type='v_prediction'")
        if timesteps is not None:
            S.check_descending(timesteps, "timesteps")
        if sigmas is not None:
            S.check_descending(sigmas, "sigmas")
            if len(sigmas) < 2:
                raise ValueError(f"sigmas must hold every step's sigma and the final one (>= 2 values), got {list(sigmas)}")
        if num_inference_steps is None:
            num_inference_steps = len(timesteps) if timesteps is not None else len(sigmas) - 1
        elif isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)) \
                or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be an int >= 1, got {num_inference_steps!r}")
        n = int(num_inference_steps)
        train_sigmas = S.vp_sigmas(self.alphas_cumprod)
        log_sigmas = np.log(train_sigmas)
        if sigmas is not None:
            sigmas = np.array(sigmas).astype(np.float32)
            timesteps = S.sigmas_to_timesteps(sigmas[:-1], log_sigmas)
        else:
            if timesteps is not None:
                timesteps = np.array(timesteps).astype(np.float32)
            else:
                timesteps = euler_timesteps(config.num_train_timesteps, n, config.timestep_spacing, config.steps_offset)
            if config.interpolation_type == "linear":
                sigmas = np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)
            else:  # log_linear: n + 1 log-uniform sigmas (diffusers, as written)
                sigmas = torch.linspace(np.log(train_sigmas[-1]), np.log(train_sigmas[0]), n + 1).exp().numpy()
            if conversion is not None:
                sigmas = S.convert_sigmas(conversion, sigmas, n, config.sigma_min, config.sigma_max)
                timesteps = S.sigmas_to_timesteps(sigmas, log_sigmas)
            if config.final_sigmas_type == "sigma_min":
                sigma_last = ((1 - self.alphas_cumprod[0]) / self.alphas_cumprod[0]) ** 0.5
            else:
                sigma_last = 0
            sigmas = np.concatenate([sigmas, [sigma_last]]).astype(np.float32)
        sigmas = torch.from_numpy(sigmas).to(dtype=torch.float32)
        if self._continuous_v():
            timesteps = torch.Tensor([0.25 * sigma.log() for sigma in sigmas[:-1]])
        else:
            timesteps = torch.from_numpy(timesteps.astype(np.float32))
        self._set_schedule(sigmas, timesteps, device, n)

    # ---- the table ----------------------------------------------------------------------------
    def _build_table(self, s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = math.inf,
                     s_noise: float = 1.0) -> torch.Tensor:
        """One row per step of the schedule: EDM Algorithm 2, in diffusers' float32 operation order."""
        dtype = table_dtype(self.config.table_dtype)
        sigmas = self.sigmas.to(dtype)
        sigma, sigma_next = sigmas[:-1], sigmas[1:]
        gamma = min(s_churn / (len(sigmas) - 1), 2**0.5 - 1)  # line 4 (diffusers: N = len(sigmas) - 1)
        window = (s_tmin <= sigma) & (sigma <= s_tmax)
        sigma_hat = sigma * torch.where(window, torch.tensor(gamma + 1, dtype=dtype), torch.tensor(1.0, dtype=dtype))
        churned = window & (gamma > 0)  # diffusers adds noise only when gamma > 0
        pre_noise = torch.where(churned, s_noise * (sigma_hat**2 - sigma**2) ** 0.5, torch.zeros_like(sigma))  # line 6
        self._noisy_rows[(s_churn, s_tmin, s_tmax, s_noise)] = tuple(churned.tolist())
        q = sigma_next / sigma_hat  # x' = x^ + (x^ - x0) / sigma^ (sigma_next - sigma^) = q x^ + (1 - q) x0  (lines 7-8)
        return T.step_table(len(sigma), dtype=dtype, **vp_x0_columns(self.config.prediction_type, sigma, sigma_hat),
                            pre_noise=pre_noise, out_x=q, out_x0=1 - q, input_divisor=(sigma**2 + 1) ** 0.5)

    # ---- the diffusers surface ----------------------------------------------------------------
    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """sqrt(abar) n - sqrt(1 - abar) x, as diffusers' EulerDiscreteScheduler computes it: abar is read at the
        timestep's index in the inference schedule (alphas_cumprod[step index], sic)."""
        self._check_timestep(torch.as_tensor(timesteps))
        index = self._noise_indices(timesteps, sample.shape[0], sample.device, use_begin_index=False)

        def make():
            abar = self.alphas_cumprod[:len(self.timesteps)].to(torch.float32)
            zero = torch.zeros_like(abar)
            return T.q_sample_table(zero, zero, -(1 - abar) ** 0.5, abar ** 0.5)
        table = self._forward_table(sample.device, "velocity", make)
        if noise.shape != sample.shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)} but sample has shape {tuple(sample.shape)}")
        _, velocity, _ = ops.run_q_sample(sample, table, index.contiguous(), noise.to(sample.device), 0, 0, True, False)
        return velocity

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, s_churn: float = 0.0,
             s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0, generator=None,
             return_dict: bool = True, *, variance_noise: Optional[torch.Tensor] = None, seed: Optional[int] = None,
             guidance_scale: Optional[float] = None, skip_layer_output: Optional[torch.Tensor] = None,
             skip_layer_guidance_scale: float = 0.0, sample_offset: int = 0, out: Optional[torch.Tensor] = None):
        """One Euler step (EDM Algorithm 2, churn when s_churn > 0) in one fused op (`out=`: see BaseSampler)."""
        options = _churn_options(s_churn, s_tmin, s_tmax, s_noise)
        extra, extra_scale = self._skip_layer_guidance(skip_layer_output, skip_layer_guidance_scale)
        self._check_step_inputs(model_output, sample, guidance_scale, guidance_extra=extra)
        index = self._step_index_tensor(timestep, sample.device)
        if options and torch.compiler.is_compiling() and tuple(options.values()) not in self._noisy_rows:
            raise RuntimeError(f"step options {options} are new to this schedule: under torch.compile a step only "
                               "reads tables; run one eager step with these options first (that builds the table)")
        table = self._table(sample.device, **options)
        noisy = self._churn_draws(options, generator is not None)
        noise, seed = self._noise(sample, model_output, generator, variance_noise, seed, noisy)
        return self._run_step(model_output, sample, table, index, noise=noise if noisy else None, seed=seed,
                              sample_offset=sample_offset, guidance_scale=guidance_scale, guidance_extra=extra,
                              extra_scale=extra_scale, advance=True, out=out, return_dict=return_dict)

    def _churn_draws(self, options: dict, per_step: bool) -> bool:
        """Whether this step has noise: for in-kernel / given noise, whether any row has (rows without churn
        scale it by 0); for `generator=`, whether diffusers draws at this very step (gamma > 0), so the
        generator advances exactly as diffusers'. That needs the step index only when churn applies to
        some steps and not others; the host knows it unless the loop began with a device timestep and no
        set_begin_index (then it is read from the device: one sync, documented)."""
        if not options:
            return False
        churned = self._noisy_rows[tuple(options.values())]  # set by _build_table (called by _table just before)
        if not per_step or all(churned) or not any(churned):
            return any(churned)
        return churned[self.step_index]


# ---- shared by Euler and Euler ancestral ---------------------------------------------------------------
def _churn_options(s_churn, s_tmin, s_tmax, s_noise) -> dict:
    """The step options that change the table (none when s_churn is 0: gamma = 0 at every step)."""
    for name, value in (("s_churn", s_churn), ("s_tmin", s_tmin), ("s_tmax", s_tmax), ("s_noise", s_noise)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise ValueError(f"{name} must be a float, got {value!r}")
    if s_churn == 0:
        return {}
    return {"s_churn": float(s_churn), "s_tmin": float(s_tmin), "s_tmax": float(s_tmax), "s_noise": float(s_noise)}
