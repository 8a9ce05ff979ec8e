"""FlowMatchEulerDiscreteSampler: a drop-in for diffusers' FlowMatchEulerDiscreteScheduler (SD3, Flux,
LTX-Video, HunyuanVideo, Mochi), a table builder on the fused step.

Rectified flow (Liu et al. 2022; Esser et al. 2024, SD3, sec. 2): x_sigma = (1 - sigma) x0 + sigma n,
and the model predicts the velocity v = n - x0. Euler on the ODE dx/dsigma = v:

    x' = x + (sigma_next - sigma) v                          (OUT_X = 1, OUT_M = sigma_next - sigma)

With stochastic_sampling, the step re-noises the predicted x0 to sigma_next instead:

    x0 = x - sigma v,   x' = (1 - sigma_next) x0 + sigma_next n   (OUT_X0 = 1 - sigma_next, NOISE_STD = sigma_next)

The schedule (set_timesteps, as diffusers): sigmas linear in t (or given), shifted by SD3's
`shift` (eq. 23) or by Flux's resolution-dependent `mu` (dynamic shifting), optionally stretched to
end at `shift_terminal` (LTX-Video), converted to Karras / exponential / beta sigmas, inverted
(Mochi), and a final 0 (1 when inverted) appended; timesteps = sigma * num_train_timesteps.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from .. import noise as N
from .. import reference as R
from .. import tables as T
from . import sigmas as S
from .base import check_choice, upload
from .config import register_to_config
from .sigma_base import SigmaSampler, q_rows
from .output import SamplerOutput

_FLOAT32 = torch.empty(0)  # stands for the dtype diffusers draws flow-matching noise in


class FlowMatchEulerDiscreteSampler(SigmaSampler):
    """Same constructor, config keys and defaults as `diffusers.FlowMatchEulerDiscreteScheduler`.

    Differences, on purpose: `step` never synchronises with the device; it also takes `seed=` /
    `variance_noise=` (stochastic sampling: in-kernel Philox noise, counter = step index, unless
    `generator=` is given: then drawn exactly as diffusers draws it), `guidance_scale=` (CFG fused,
    model_output = [uncond; cond]), `skip_layer_output=` / `skip_layer_guidance_scale=` (SD3's
    skip-layer guidance: guided = u + w (c - u) + s (c - skip)), `sample_offset=` and `out=`; the
    output is in the sample's dtype (diffusers: the model output's); custom sigmas / timesteps must
    be strictly descending; a step past the end raises (when the host knows the step index).
    s_churn / s_tmin / s_tmax / s_noise are accepted and, as in diffusers, unused.
    """

    diffusers_class_name = "FlowMatchEulerDiscreteScheduler"
    returns_x0 = False  # diffusers' output has prev_sample only
    flow_matching = True  # fastdiff.diffusion_loss trains the velocity n - x0 (rectified flow)

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0, use_dynamic_shifting: bool = False,
                 base_shift: Optional[float] = 0.5, max_shift: Optional[float] = 1.15, base_image_seq_len: int = 256,
                 max_image_seq_len: int = 4096, invert_sigmas: bool = False, shift_terminal: Optional[float] = None,
                 use_karras_sigmas: bool = False, use_exponential_sigmas: bool = False, use_beta_sigmas: bool = False,
                 time_shift_type: str = "exponential", stochastic_sampling: bool = False):
        S.sigma_conversion(self.config)
        check_choice("time_shift_type", time_shift_type, S.TIME_SHIFT_TYPES)
        if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, (int, np.integer)) \
                or num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be a positive int, got {num_train_timesteps!r}")
        if shift_terminal is not None and not 0 <= shift_terminal < 1:
            raise ValueError(f"shift_terminal must be in [0, 1) (the last sigma of the schedule), got {shift_terminal!r}")
        self._reset_engine()
        self._shift = shift
        timesteps = np.linspace(1, num_train_timesteps, num_train_timesteps, dtype=np.float32)[::-1].copy()
        sigmas = torch.from_numpy(timesteps).to(dtype=torch.float32) / num_train_timesteps
        if not use_dynamic_shifting:
            sigmas = S.flow_shift(sigmas, shift)
        # The training schedule (diffusers' state before set_timesteps): what flow-matching training samples from.
        self.train_sigmas = sigmas
        self.train_timesteps = sigmas * num_train_timesteps
        self.sigma_min = sigmas[-1].item()
        self.sigma_max = sigmas[0].item()
        self._set_schedule(sigmas, self.train_timesteps, None, None)

    # ---- the diffusers surface ----------------------------------------------------------------
    @property
    def shift(self) -> float:
        return self._shift

    def set_shift(self, shift: float) -> None:
        """The shift the next set_timesteps applies (as diffusers)."""
        self._shift = shift

    def _sigma_to_t(self, sigma):
        return sigma * self.config.num_train_timesteps

    def time_shift(self, mu: float, sigma: float, t):
        return S.time_shift(mu, sigma, t, self.config.time_shift_type)

    def stretch_shift_to_terminal(self, t):
        return S.stretch_shift_to_terminal(t, self.config.shift_terminal)

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device: str | torch.device | None = None,
                      sigmas: Optional[list[float]] = None, mu: Optional[float] = None,
                      timesteps: Optional[list[float]] = None) -> None:
        """diffusers' schedule (module docstring), then the step table. Flux passes sigmas=linspace(1, 1/N, N)
        and mu (fastdiff.samplers.sigmas.calculate_shift); custom sigmas / timesteps must be descending."""
        config = self.config
        if config.use_dynamic_shifting and mu is None:
            raise ValueError("mu must be passed when use_dynamic_shifting=True (Flux: mu = "
                             "fastdiff.samplers.sigmas.calculate_shift(image_seq_len, ...) from the config's "
                             "base/max_image_seq_len and base/max_shift)")
        if sigmas is not None and timesteps is not None and len(sigmas) != len(timesteps):
            raise ValueError(f"sigmas and timesteps must have the same length, got {len(sigmas)} and {len(timesteps)}")
        if num_inference_steps is not None:
            if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)) \
                    or num_inference_steps < 1:
                raise ValueError(f"num_inference_steps must be an int >= 1, got {num_inference_steps!r}")
            if (sigmas is not None and len(sigmas) != num_inference_steps) or (
                    timesteps is not None and len(timesteps) != num_inference_steps):
                raise ValueError("sigmas and timesteps must have num_inference_steps entries when it is given")
        elif sigmas is None and timesteps is None:
            raise ValueError("pass num_inference_steps, sigmas or timesteps")
        else:
            num_inference_steps = len(sigmas) if sigmas is not None else len(timesteps)
        for name, values in (("sigmas", sigmas), ("timesteps", timesteps)):
            if values is not None:
                S.check_descending(values, name)
        n = int(num_inference_steps)

        is_timesteps_provided = timesteps is not None
        if is_timesteps_provided:
            timesteps = np.array(timesteps).astype(np.float32)
        if sigmas is None:
            if timesteps is None:
                timesteps = np.linspace(self._sigma_to_t(self.sigma_max), self._sigma_to_t(self.sigma_min), n)
            sigmas = timesteps / config.num_train_timesteps
        else:
            sigmas = np.array(sigmas).astype(np.float32)
        if config.use_dynamic_shifting:
            sigmas = self.time_shift(mu, 1.0, sigmas)  # Flux / LTX: resolution-dependent
        else:
            sigmas = S.flow_shift(sigmas, self.shift)  # SD3 eq. 23
        if config.shift_terminal:
            sigmas = self.stretch_shift_to_terminal(sigmas)  # LTX-Video
        conversion = S.sigma_conversion(config)
        sigmas = S.convert_sigmas(conversion, sigmas, n)  # the config has no sigma_min / sigma_max here
        sigmas = torch.from_numpy(np.asarray(sigmas)).to(dtype=torch.float32)
        if is_timesteps_provided:
            timesteps = torch.from_numpy(timesteps).to(dtype=torch.float32)
        else:
            timesteps = sigmas * config.num_train_timesteps
        if config.invert_sigmas:  # Mochi: the model's sigmas run the other way
            sigmas = 1.0 - sigmas
            timesteps = sigmas * config.num_train_timesteps
            sigmas = torch.cat([sigmas, torch.ones(1)])
        else:
            sigmas = torch.cat([sigmas, torch.zeros(1)])
        self._set_schedule(sigmas, timesteps, device, n)

    # ---- the table ----------------------------------------------------------------------------
    def _build_table(self) -> torch.Tensor:
        """One row per step: rectified-flow Euler, or the stochastic re-noising step (module docstring)."""
        sigmas = self.sigmas.to(torch.float32)
        sigma, sigma_next = sigmas[:-1], sigmas[1:]
        x0 = {"x0_x": 1.0, "x0_m": -sigma}  # x0 = x - sigma v
        if self.config.stochastic_sampling:
            return T.step_table(len(sigma), dtype=torch.float32, **x0, out_x0=1.0 - sigma_next, noise_std=sigma_next)
        return T.step_table(len(sigma), dtype=torch.float32, **x0, out_x=1.0, out_m=sigma_next - sigma)

    def scale_noise(self, sample: torch.Tensor, timestep, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The forward process x_sigma = sigma n + (1 - sigma) x (img2img's starting latents), sigma of each
        timestep's schedule index (begin_index / step index when set, as diffusers), one fused pass."""
        index = self._noise_indices(timestep, sample.shape[0], sample.device)
        table = self._forward_table(sample.device, "scale_noise", lambda: q_rows(1.0 - self.sigmas, self.sigmas))
        return self._forward_noise(sample, noise, index, table, "sample")

    # ---- training (fastdiff.diffusion_loss) ---------------------------------------------------
    def training_table(self, device: torch.device) -> torch.Tensor:
        """q-sample rows over the training schedule: x_t = (1 - sigma) x0 + sigma n, target v = n - x0."""
        def make(d):
            sigmas = self.train_sigmas.to(torch.float32)
            return upload(T.q_sample_table(1.0 - sigmas, sigmas, -torch.ones_like(sigmas), torch.ones_like(sigmas)), d)
        return self._on(device, ("flow_training", id(self.train_sigmas)), make)

    # ---- the step -----------------------------------------------------------------------------
    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, s_churn: float = 0.0,
             s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0, generator=None,
             per_token_timesteps: Optional[torch.Tensor] = None, return_dict: bool = True, *,
             variance_noise: Optional[torch.Tensor] = None, seed: Optional[int] = None,
             guidance_scale: Optional[float] = None, skip_layer_output: Optional[torch.Tensor] = None,
             skip_layer_guidance_scale: float = 0.0, sample_offset: int = 0, out: Optional[torch.Tensor] = None):
        """One rectified-flow Euler step in one fused op (`out=`: see BaseSampler)."""
        extra, extra_scale = self._skip_layer_guidance(skip_layer_output, skip_layer_guidance_scale)
        self._check_step_inputs(model_output, sample, guidance_scale, guidance_extra=extra)
        index = self._step_index_tensor(timestep, sample.device)
        # diffusers draws the noise of stochastic sampling in the upcast sample's dtype (float32), every step
        noise, seed = self._noise(sample, _FLOAT32, generator, variance_noise, seed, self.config.stochastic_sampling)
        if per_token_timesteps is not None:
            return self._per_token_step(model_output, sample, per_token_timesteps, index, noise, seed, sample_offset,
                                        guidance_scale, extra, extra_scale, out, return_dict)
        return self._run_step(model_output, sample, self._table(sample.device), index, noise=noise, seed=seed,
                              sample_offset=sample_offset, guidance_scale=guidance_scale, guidance_extra=extra,
                              extra_scale=extra_scale, advance=True, out=out, return_dict=return_dict)

    def _per_token_step(self, model_output, sample, per_token_timesteps, index, noise, seed, sample_offset,
                        guidance_scale, extra, extra_scale, out, return_dict):
        """diffusers' per-token path (LTX-Video conditioning): every token steps from its own sigma to the largest
        schedule sigma below it. Per-element coefficients do not fit a row: plain tensor ops (no sync), unfused."""
        if not isinstance(per_token_timesteps, torch.Tensor) or per_token_timesteps.device != sample.device:
            raise ValueError(f"per_token_timesteps must be a tensor on {sample.device}")
        if sample.ndim != 3 or tuple(per_token_timesteps.shape) != tuple(sample.shape[:2]):
            raise ValueError(f"per_token_timesteps needs a [batch, tokens, channels] sample and one timestep per token "
                             f"([batch, tokens]); got sample {tuple(sample.shape)}, per_token_timesteps "
                             f"{tuple(per_token_timesteps.shape)}")
        m, _ = R.guide(model_output, sample, guidance_scale, extra, extra_scale, torch.float32)
        x = sample.to(torch.float32)
        per_token_sigmas = per_token_timesteps / self.config.num_train_timesteps
        sigmas = self._on(sample.device, "sigmas", lambda d: upload(self.sigmas, d))[:, None, None]
        lower_mask = sigmas < per_token_sigmas[None] - 1e-6
        lower_sigmas, _ = (lower_mask * sigmas).max(dim=0)
        current_sigma, next_sigma = per_token_sigmas[..., None], lower_sigmas[..., None]
        if self.config.stochastic_sampling:
            if noise is None:
                noise = N.randn(sample.shape, seed, counter=index.reshape(()), sample_offset=sample_offset,
                                device=sample.device)
            x0 = x - current_sigma * m
            prev = (1.0 - next_sigma) * x0 + next_sigma * noise.to(torch.float32)
        else:
            prev = x + (current_sigma - next_sigma) * m  # diffusers: dt = current - next here (pipelines pass -v)
        prev = prev.to(sample.dtype) if out is None else out.copy_(prev)
        index.add_(1)
        self._advance_host_index()
        return SamplerOutput(prev_sample=prev) if return_dict else (prev,)
