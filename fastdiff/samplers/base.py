"""What DDPMSampler and DDIMSampler share: schedule tables, timestep lookup, noise, validation,
add_noise / get_velocity. Subclasses build their coefficient table and call their fused op."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .. import noise as N
from .. import ops
from .. import reference as R
from .. import schedules
from .. import tables as T
from .config import ConfigMixin

TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")


def spaced_timesteps(num_train_timesteps: int, num_inference_steps: int, spacing: str, steps_offset: int) -> np.ndarray:
    """diffusers' three spacings (Lin et al. 2023, Table 2), descending int64."""
    T_, n = num_train_timesteps, num_inference_steps
    if spacing == "linspace":
        return np.linspace(0, T_ - 1, n).round()[::-1].copy().astype(np.int64)
    if spacing == "leading":
        return (np.arange(0, n) * (T_ // n)).round()[::-1].copy().astype(np.int64) + steps_offset
    if spacing == "trailing":
        return np.round(np.arange(T_, 0, -T_ / n)).astype(np.int64) - 1
    raise ValueError(f"timestep_spacing must be one of {TIMESTEP_SPACINGS}, got {spacing!r}")


def _check_choice(name: str, value, allowed: Sequence) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")


class BaseSampler(ConfigMixin):
    order = 1
    init_noise_sigma = 1.0

    def _init_schedule(self, config) -> None:
        """Validate the shared options and build diffusers' float32 beta / alpha tables."""
        _check_choice("prediction_type", config.prediction_type, T.PREDICTION_TYPES)
        _check_choice("timestep_spacing", config.timestep_spacing, TIMESTEP_SPACINGS)
        if config.trained_betas is None:
            _check_choice("beta_schedule", config.beta_schedule, schedules.BETA_SCHEDULES)
        for name in ("dynamic_thresholding_ratio",):
            if not 0.0 < config[name] <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {config[name]!r}")
        self.betas = schedules.make_betas(config.num_train_timesteps, config.beta_start, config.beta_end,
                                          config.beta_schedule, config.trained_betas, config.rescale_betas_zero_snr)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = schedules.alphas_cumprod_from_betas(self.betas)
        self.num_inference_steps: int | None = None
        self.custom_timesteps = False
        self._tables: dict[torch.device, torch.Tensor] = {}
        self._abar_tables: dict[torch.device, torch.Tensor] = {}

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def scale_model_input(self, sample: torch.Tensor, timestep: int | None = None) -> torch.Tensor:
        return sample  # DDPM/DDIM inputs need no scaling (init_noise_sigma = 1)

    # ---- the coefficient table -------------------------------------------------------------
    def _set_table(self, table: torch.Tensor, device) -> None:
        self._tables = {torch.device(device or "cpu"): table.to(device)}

    def _table_on(self, device: torch.device) -> torch.Tensor:
        """The table on `device` (copied once per device, then cached)."""
        table = self._tables.get(device)
        if table is None:
            table = self._tables[device] = next(iter(self._tables.values())).to(device)
        return table

    def _check_host_timestep(self, t: int) -> None:
        raise NotImplementedError

    def _row(self, timestep, device: torch.device) -> torch.Tensor:
        """The coefficient row of `timestep`: a host lookup (a view) or a device gather; never a sync."""
        table = self._table_on(device)
        if isinstance(timestep, torch.Tensor):
            if timestep.numel() != 1:
                raise ValueError(f"timestep must be a single value, got a tensor of shape {tuple(timestep.shape)}")
            if timestep.device.type != "cpu" or torch.compiler.is_compiling():
                return T.gather_row(table, timestep.to(device))
        elif isinstance(timestep, bool) or not isinstance(timestep, (int, np.integer)):
            raise TypeError(f"timestep must be an int or a 1-element tensor, got {type(timestep).__name__}")
        t = int(timestep)
        self._check_host_timestep(t)
        return table[t]

    # ---- inputs -----------------------------------------------------------------------------
    def _check_step_inputs(self, model_output, sample, guidance_scale, learned_variance: bool) -> None:
        for name, x in (("model_output", model_output), ("sample", sample)):
            if not isinstance(x, torch.Tensor) or not x.is_floating_point():
                raise TypeError(f"{name} must be a floating-point tensor, got {type(x).__name__}"
                                + (f" of dtype {x.dtype}" if isinstance(x, torch.Tensor) else ""))
        if model_output.device != sample.device:
            raise ValueError(f"model_output is on {model_output.device} but sample is on {sample.device}; "
                             "they must be on the same device")
        batch = sample.shape[0] * (2 if guidance_scale is not None else 1)
        channels = (sample.shape[1], 2 * sample.shape[1]) if learned_variance and sample.ndim > 1 else (sample.shape[1:2] or (None,))
        ok = (model_output.ndim == sample.ndim and model_output.shape[0] == batch
              and (sample.ndim < 2 or model_output.shape[1] in channels) and model_output.shape[2:] == sample.shape[2:])
        if not ok:
            want = f"[{batch}, {' or '.join(map(str, channels))}, {', '.join(map(str, sample.shape[2:]))}]"
            cfg = " ([uncond; cond] batch for guidance_scale)" if guidance_scale is not None else ""
            raise ValueError(f"model_output has shape {tuple(model_output.shape)} but a sample of shape "
                             f"{tuple(sample.shape)} needs {want}{cfg}")

    def _noise_args(self, sample, model_output, generator, variance_noise, seed, needs_noise: bool):
        """(noise tensor or None, seed) for the fused op, per DESIGN "Noise"."""
        given = [name for name, v in (("generator", generator), ("variance_noise", variance_noise), ("seed", seed))
                 if v is not None]
        if len(given) > 1:
            raise ValueError(f"pass at most one of generator, variance_noise and seed; got {' and '.join(given)}")
        if variance_noise is not None:
            if variance_noise.shape != sample.shape or variance_noise.device != sample.device:
                raise ValueError(f"variance_noise must match sample ({tuple(sample.shape)} on {sample.device}), "
                                 f"got {tuple(variance_noise.shape)} on {variance_noise.device}")
            return variance_noise, 0
        if not needs_noise:
            return None, 0
        if generator is not None:
            return randn_like_diffusers(sample.shape, generator, sample.device, model_output.dtype), 0
        return None, N.check_seed(seed) if seed is not None else N.draw_seed()

    def _threshold(self, model_output, sample, coefs, guidance_scale, variance_type="fixed_small"):
        """Per-sample s of dynamic thresholding, from the reference x0 (a separate reduction)."""
        if not self.config.thresholding:
            return None
        m, _ = R.split_model_output(model_output, sample, variance_type, guidance_scale)
        dt = R.compute_dtype(sample)
        c = coefs.to(dt)
        x0 = R.predict_x0(m.to(dt), sample.to(dt), c[T.SQRT_ABAR], c[T.SQRT_1M_ABAR], self.config.prediction_type)
        return R.dynamic_threshold_scale(x0, self.config.dynamic_thresholding_ratio, self.config.sample_max_value)

    def _clip_range(self) -> float | None:
        return float(self.config.clip_sample_range) if self.config.clip_sample and not self.config.thresholding else None

    # ---- training-side helpers --------------------------------------------------------------
    def _alphas_cumprod_on(self, device: torch.device) -> torch.Tensor:
        table = self._abar_tables.get(device)
        if table is None:  # float32 abar plus a NaN sentinel row for out-of-range device timesteps
            table = torch.cat([self.alphas_cumprod, torch.tensor([float("nan")])]).to(device)
            self._abar_tables[device] = table
        return table

    def _training_timesteps(self, timesteps, like: torch.Tensor) -> torch.Tensor:
        T_ = self.config.num_train_timesteps
        t = torch.as_tensor(timesteps)
        if t.dtype.is_floating_point or t.dtype == torch.bool:
            raise TypeError(f"timesteps must be integers, got dtype {t.dtype}")
        t = t.reshape(-1)
        if t.numel() not in (1, like.shape[0]):
            raise ValueError(f"timesteps must have 1 or batch={like.shape[0]} entries, got {t.numel()}")
        if t.device.type == "cpu":
            bad = t[(t < 0) | (t >= T_)]
            if bad.numel():
                raise ValueError(f"timesteps must be in [0, {T_}), got {bad.tolist()[:5]}")
            t = t.to(like.device)
        else:  # no sync: out-of-range device timesteps read the NaN row
            t = torch.where((t >= 0) & (t < T_), t, torch.full_like(t, T_)).to(like.device)
        return t.to(torch.int64).expand(like.shape[0]).contiguous()

    def _q_sample(self, x0: torch.Tensor, noise: torch.Tensor, timesteps, names: str, write_v: bool):
        if noise.shape != x0.shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)} but {names} has shape {tuple(x0.shape)}")
        t = self._training_timesteps(timesteps, x0)
        abar = self._alphas_cumprod_on(x0.device)
        return ops.q_sample(x0, t, abar, noise.to(x0.device), 0, 0, False, write_v)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise (DDPM eq. 4), per-sample timesteps."""
        return self._q_sample(original_samples, noise, timesteps, "original_samples", write_v=False)[0]

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """v = sqrt(abar_t) noise - sqrt(1 - abar_t) sample (Salimans & Ho 2022, sec. 4)."""
        return self._q_sample(sample, noise, timesteps, "sample", write_v=True)[2]


def randn_like_diffusers(shape, generator, device, dtype) -> torch.Tensor:
    """torch.randn exactly as diffusers' randn_tensor draws it (CPU generators draw on CPU, lists per sample)."""
    generators = generator if isinstance(generator, (list, tuple)) else [generator]
    gen_device = generators[0].device
    if gen_device.type != "cpu" and gen_device.type != torch.device(device).type:
        raise ValueError(f"generator is on {gen_device} but the sample is on {device}: use a CPU generator "
                         "or one on the sample's device")
    rand_device = gen_device if gen_device.type == "cpu" else device
    if len(generators) > 1:
        if len(generators) != shape[0]:
            raise ValueError(f"a list of generators needs one per sample ({shape[0]}), got {len(generators)}")
        draws = [torch.randn((1, *shape[1:]), generator=g, device=rand_device, dtype=dtype) for g in generators]
        return torch.cat(draws).to(device)
    return torch.randn(tuple(shape), generator=generators[0], device=rand_device, dtype=dtype).to(device)
