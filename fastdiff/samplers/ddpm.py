"""DDPMSampler: a drop-in for diffusers' DDPMScheduler (Ho et al. 2020), stepping with one fused op."""
from __future__ import annotations

import numpy as np
import torch

from .. import ops
from .. import tables as T
from .base import BaseSampler, _check_choice, spaced_timesteps
from .config import register_to_config
from .output import SamplerOutput


class DDPMSampler(BaseSampler):
    """Same constructor, config keys and defaults as `diffusers.DDPMScheduler`.

    Differences, all on purpose: `step` never synchronises with the device; it also takes
    `variance_noise=`, `seed=` (in-kernel Philox noise), `guidance_scale=` (CFG fused into the
    step, model_output = [uncond; cond]) and `sample_offset=` (global index of sample 0, for
    noise that does not depend on how a batch is split); NaN cases of diffusers are finite
    (see fastdiff.reference); a timestep outside the schedule raises instead of an IndexError.
    """

    diffusers_class_name = "DDPMScheduler"

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, variance_type: str = "fixed_small",
                 clip_sample: bool = True, prediction_type: str = "epsilon", thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, clip_sample_range: float = 1.0,
                 sample_max_value: float = 1.0, timestep_spacing: str = "leading", steps_offset: int = 0,
                 rescale_betas_zero_snr: bool = False):
        _check_choice("variance_type", variance_type, T.VARIANCE_TYPES)
        self._init_schedule(self.config)
        self.variance_type = variance_type
        self._set_schedule(np.arange(0, num_train_timesteps)[::-1].copy(), device=None)

    def _set_schedule(self, timesteps: np.ndarray, device) -> None:
        self.timesteps = torch.from_numpy(timesteps).to(device)
        self._schedule = set(timesteps.tolist())
        self._previous = dict(zip(timesteps.tolist(), timesteps[1:].tolist() + [-1]))
        self._set_table(T.ddpm_table(self.alphas_cumprod, timesteps.tolist(), self.variance_type), device)

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      timesteps: list[int] | None = None) -> None:
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

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True, *, variance_noise: torch.Tensor | None = None, seed: int | None = None,
             guidance_scale: float | None = None, sample_offset: int = 0):
        """One reverse step x_t -> x_{t-1} (DDPM Algorithm 2 / eq. 7) in one fused op."""
        learned = self.variance_type in T.LEARNED_VARIANCE_TYPES
        self._check_step_inputs(model_output, sample, guidance_scale, learned)
        if self.variance_type == "learned" and model_output.shape[1] != 2 * sample.shape[1]:
            raise ValueError(f"variance_type='learned' needs model_output with 2 x {sample.shape[1]} channels, "
                             f"got {model_output.shape[1]}")
        coefs = self._row(timestep, sample.device)
        host_last = not isinstance(timestep, torch.Tensor) and int(timestep) == 0  # diffusers draws no noise at t=0
        noise, seed = self._noise_args(sample, model_output, generator, variance_noise, seed, not host_last)
        threshold = self._threshold(model_output, sample, coefs, guidance_scale, self.variance_type)
        prev, x0 = ops.ddpm_step(model_output, sample, coefs, noise, seed, sample_offset, self.config.prediction_type,
                                 self.variance_type, self._clip_range(), threshold, guidance_scale, True)
        return SamplerOutput(prev, x0) if return_dict else (prev, x0)
