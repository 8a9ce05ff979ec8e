"""What the samplers on a sigma schedule share (Euler, Euler ancestral, flow-matching Euler; EDM's view,
Karras et al. 2022, of a VP model as a VE ODE with sigma = sqrt((1 - abar) / abar)): rows keyed by
the device step counter, the schedule's device state, integer step indices refused as timesteps,
forward noising keyed by the schedule (img2img), and for the VP ones input scaling by
1 / sqrt(sigma^2 + 1) and their x0 from epsilon / v / sample.
"""
from __future__ import annotations

import numpy as np
import torch

from .. import ops
from .. import tables as T
from .base import BaseSampler, check_choice, table_dtype, upload

TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")
VP_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")  # the ones diffusers' Euler samplers build
VP_PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


def euler_timesteps(num_train_timesteps: int, num_inference_steps: int, spacing: str, steps_offset: int) -> np.ndarray:
    """diffusers' float32 timesteps of Euler / Euler ancestral for the three spacings (Lin et al. 2023, Table 2)."""
    T_, n = num_train_timesteps, num_inference_steps
    if spacing == "linspace":
        return np.linspace(0, T_ - 1, n, dtype=np.float32)[::-1].copy()
    if spacing == "leading":
        step_ratio = T_ // n
        timesteps = (np.arange(0, n) * step_ratio).round()[::-1].copy().astype(np.float32)
        return timesteps + steps_offset
    if spacing == "trailing":
        step_ratio = T_ / n
        return np.arange(T_, 0, -step_ratio).round().copy().astype(np.float32) - 1
    raise ValueError(f"timestep_spacing must be one of {TIMESTEP_SPACINGS}, got {spacing!r}")


class SigmaSampler(BaseSampler):
    """Shared by the counter-keyed sigma samplers: rows keyed by the device step counter."""

    keyed_by_timestep = False

    # ---- schedule state ---------------------------------------------------------------------------
    def _set_schedule(self, sigmas: torch.Tensor, timesteps: torch.Tensor, device, num_inference_steps) -> None:
        """Keep diffusers' schedule (sigmas on the host, timesteps on `device`), reset the counter, build the table."""
        self.sigmas = sigmas.to("cpu")  # as diffusers: the host copy; the step reads its device table
        self.num_inference_steps = num_inference_steps
        self._noisy_rows: dict = {}  # step options -> which rows add noise (host bools, set when a table is built)
        self._install_schedule(timesteps.cpu(), device)

    def _check_timestep(self, timestep) -> None:
        if isinstance(timestep, (bool, int, np.integer)) or (
                isinstance(timestep, torch.Tensor) and not timestep.is_floating_point()):
            raise ValueError(f"{type(self).__name__}.step got an integer timestep {timestep!r}: passing integer "
                             "indices (e.g. from enumerate(timesteps)) is not supported, pass one of sampler.timesteps")

    def _step_index_tensor(self, timestep, device: torch.device) -> torch.Tensor:
        """The device counter (BaseSampler._counter_index), after refusing integer step indices as timesteps."""
        self._check_timestep(timestep)
        return self._counter_index(timestep, device)

    # ---- forward noising (img2img, inpainting, training) ------------------------------------------
    def _noise_indices(self, timesteps, batch: int, device: torch.device, use_begin_index: bool = True):
        """[batch] int64 indices into the schedule, as diffusers' add_noise picks them, without a sync:
        begin_index unset: the index of each timestep (host values checked on the host); else the step
        counter (begin_index before the first step, the step index after)."""
        if use_begin_index and self._begin_index is not None and self._counter is not None:
            return self._counter.to(device).expand(batch)
        t = torch.as_tensor(timesteps).reshape(-1)
        if t.numel() not in (1, batch):
            raise ValueError(f"timesteps must have 1 or batch={batch} entries, got {t.numel()}")
        index = self._schedule_indices(t, missing=len(self.timesteps) + 1)  # no match: a forward table's NaN row
        if t.is_cpu:
            missing = t[index > len(self.timesteps)]
            if missing.numel():
                raise ValueError(f"timesteps {missing.tolist()[:5]} are not in the schedule (sampler.timesteps)")
        return index.to(device).expand(batch)

    def _forward_table(self, device: torch.device, name: str, make) -> torch.Tensor:
        """A q-sample table [len(sigmas) + 1, Q_WIDTH] over the schedule (x_t = a x0 + b n), cached per device."""
        return self._on(device, ("forward", name), lambda d: upload(make(), d))

    def _forward_noise(self, original: torch.Tensor, noise: torch.Tensor, index: torch.Tensor, table: torch.Tensor,
                       names: str) -> torch.Tensor:
        if not isinstance(noise, torch.Tensor) or noise.shape != original.shape:
            raise ValueError(f"noise must be a tensor of {names}'s shape {tuple(original.shape)}, got "
                             + (f"{tuple(noise.shape)}" if isinstance(noise, torch.Tensor) else type(noise).__name__))
        x_t, _, _ = ops.run_q_sample(original, table, index.contiguous(), noise.to(original.device), 0, 0, False, False)
        return x_t


class VPSigmaSampler(SigmaSampler):
    """Euler and Euler ancestral: sigmas of a VP schedule (x_t = x0 + sigma n on the EDM scale)."""

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """sample / sqrt(sigma^2 + 1) at the current step (EDM's c_in), read from the device row: no sync."""
        index = self._step_index_tensor(timestep, sample.device)  # diffusers initialises the step index here
        self.is_scale_input_called = True
        # the counter is always a row of the table (the NaN sentinel at worst): one gather, no range clamp
        return sample / self._table(sample.device).index_select(0, index)[:, T.INPUT_DIVISOR]

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """x + sigma n with sigma of each timestep's schedule index (img2img / inpainting), as diffusers."""
        index = self._noise_indices(timesteps, original_samples.shape[0], original_samples.device)
        table = self._forward_table(original_samples.device, "add_noise", lambda: q_rows(
            torch.ones_like(self.sigmas), self.sigmas))
        return self._forward_noise(original_samples, noise, index, table, "original_samples")


def check_vp_sigma_config(config, prediction_types) -> None:
    if config.trained_betas is None:
        check_choice("beta_schedule", config.beta_schedule, VP_BETA_SCHEDULES)
    check_choice("prediction_type", config.prediction_type, prediction_types)
    check_choice("timestep_spacing", config.timestep_spacing, TIMESTEP_SPACINGS)
    table_dtype(config.table_dtype)


def init_vp_sigma_schedule(sampler: BaseSampler) -> None:
    """diffusers' float32 betas / alphas_cumprod; with zero terminal SNR the last abar is 2^-24 (as diffusers:
    the first sigma stays finite)."""
    sampler._init_schedule(sampler.config)
    if sampler.config.rescale_betas_zero_snr:
        sampler.alphas_cumprod[-1] = 2**-24


def vp_x0_columns(prediction_type: str, sigma: torch.Tensor, sigma_hat: torch.Tensor) -> dict[str, torch.Tensor]:
    """x0 = X0_X x + X0_M m for a model output m at noise level sigma (sigma_hat after churn), as diffusers'
    Euler samplers write it: epsilon x - sigma^ m; v (EDM c_skip / c_out) m (-sigma / sqrt(sigma^2 + 1)) +
    x / (sigma^2 + 1); sample m."""
    one = torch.ones_like(sigma)
    if prediction_type == "epsilon":
        return {"x0_x": one, "x0_m": -sigma_hat}
    if prediction_type == "v_prediction":
        return {"x0_x": 1 / (sigma**2 + 1), "x0_m": -sigma / (sigma**2 + 1) ** 0.5}
    if prediction_type == "sample":
        return {"x0_x": 0 * one, "x0_m": one}
    raise ValueError(f"prediction_type must be one of {VP_PREDICTION_TYPES}, got {prediction_type!r}")


def q_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Forward-noise rows x_t = a x0 + b n over the schedule's sigmas (no target), and the NaN row."""
    zero = torch.zeros_like(a)
    return T.q_sample_table(a, b, zero, zero)

