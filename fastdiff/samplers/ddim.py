"""DDIMSampler: a drop-in for diffusers' DDIMScheduler (Song et al. 2021), stepping with one fused op."""
from __future__ import annotations

import numpy as np
import torch

from .. import ops
from .. import tables as T
from .base import BaseSampler, spaced_timesteps
from .config import register_to_config
from .output import SamplerOutput


class DDIMSampler(BaseSampler):
    """Same constructor, config keys and defaults as `diffusers.DDIMScheduler`.

    As diffusers, the previous timestep of t is t - num_train_timesteps // num_inference_steps,
    so any t in [0, num_train_timesteps) can be stepped. Extras as in DDPMSampler (`seed=`,
    `guidance_scale=`, `sample_offset=`), no host synchronisation in `step`.
    """

    diffusers_class_name = "DDIMScheduler"

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, clip_sample: bool = True,
                 set_alpha_to_one: bool = True, steps_offset: int = 0, prediction_type: str = "epsilon",
                 thresholding: bool = False, dynamic_thresholding_ratio: float = 0.995,
                 clip_sample_range: float = 1.0, sample_max_value: float = 1.0, timestep_spacing: str = "leading",
                 rescale_betas_zero_snr: bool = False):
        self._init_schedule(self.config)
        # DDIM eq. 16 at the last step: abar_prev = 1 (a clean sample) unless set_alpha_to_one=False.
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self.timesteps = torch.from_numpy(np.arange(0, num_train_timesteps)[::-1].copy())

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        T_ = self.config.num_train_timesteps
        if not isinstance(num_inference_steps, (int, np.integer)) or not 1 <= num_inference_steps <= T_:
            raise ValueError(f"num_inference_steps must be an int in [1, num_train_timesteps={T_}], "
                             f"got {num_inference_steps!r}")
        self.num_inference_steps = int(num_inference_steps)
        steps = spaced_timesteps(T_, self.num_inference_steps, self.config.timestep_spacing, self.config.steps_offset)
        self.timesteps = torch.from_numpy(steps).to(device)
        self._set_table(T.ddim_table(self.alphas_cumprod, T_ // self.num_inference_steps,
                                     float(self.final_alpha_cumprod)), device)

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
             use_clipped_model_output: bool = False, generator=None, variance_noise: torch.Tensor | None = None,
             return_dict: bool = True, *, seed: int | None = None, guidance_scale: float | None = None,
             sample_offset: int = 0):
        """One DDIM step (DDIM eq. 12; sigma_t = eta * eq. 16) in one fused op."""
        self._steps()
        if not isinstance(eta, (int, float)) or eta < 0:
            raise ValueError(f"eta must be a float >= 0, got {eta!r}")
        self._check_step_inputs(model_output, sample, guidance_scale, learned_variance=False)
        coefs = self._row(timestep, sample.device)
        noise, seed = self._noise_args(sample, model_output, generator, variance_noise, seed, eta > 0)
        threshold = self._threshold(model_output, sample, coefs, guidance_scale)
        prev, x0 = ops.ddim_step(model_output, sample, coefs, noise, seed, sample_offset, self.config.prediction_type,
                                 float(eta), bool(use_clipped_model_output), self._clip_range(), threshold,
                                 guidance_scale, True)
        return SamplerOutput(prev, x0) if return_dict else (prev, x0)
