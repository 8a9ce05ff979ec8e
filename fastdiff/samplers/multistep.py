"""What the multistep solvers (DPM-Solver++, UniPC) share: their updates written as linear combinations
of a step's per-element inputs (`Lin`, turned into table rows), diffusers' per-sigma scalars, and
the engine plumbing of a sampler with a history ring and warm-up stages (`MultistepSampler`).
"""
from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np
import torch

from .. import tables as T
from . import sigmas as S
from .base import BaseSampler, check_choice, randn_like_diffusers, table_dtype, upload

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction", "flow_prediction")
MULTISTEP_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
SOLVER_ORDERS = (1, 2, 3)


# ---- linear combinations of a step's per-element inputs --------------------------------------------------
class Lin(dict):
    """A linear combination {input: coefficient} of a step's per-element inputs, written like the paper.

    Inputs: "x" (the sample), "m" (the guided model output), "x0" (its clipped / thresholded x0
    prediction) and "h1" .. "h4" (the history values the row reads). Coefficients are Python floats
    (float64; a 0-d tensor coefficient is taken at its value: diffusers' float32 scalar, exactly), so a
    row's combined coefficients are rounded once, when the table is stored in float32. Division by
    0 gives inf / NaN as IEEE does (the table check then names the step).
    """

    @classmethod
    def of(cls, name: str) -> "Lin":
        return cls({name: 1.0})

    def __add__(self, other: "Lin") -> "Lin":
        out = Lin(self)
        for key, value in other.items():
            out[key] = out.get(key, 0.0) + value
        return out

    def __neg__(self) -> "Lin":
        return Lin({key: -value for key, value in self.items()})

    def __sub__(self, other: "Lin") -> "Lin":
        return self + (-other)

    def __mul__(self, c) -> "Lin":
        c = float(c)
        return Lin({key: value * c for key, value in self.items()})

    __rmul__ = __mul__

    def __truediv__(self, c) -> "Lin":
        c = float(c)
        return Lin({key: _divide(value, c) for key, value in self.items()})


def _divide(a: float, b: float) -> float:
    """a / b with IEEE semantics (Python raises ZeroDivisionError for b = 0)."""
    if b != 0.0:
        return a / b
    return math.nan if a == 0.0 or math.isnan(a) else math.copysign(math.inf, a) * math.copysign(1.0, b)


ZERO = Lin()
X, M, X0 = Lin.of("x"), Lin.of("m"), Lin.of("x0")
HISTORY = tuple(Lin.of(f"h{k + 1}") for k in range(T.MAX_HISTORY_READS))


def row_columns(out: Lin, *, hist: Optional[Lin] = None, out2: Optional[Lin] = None,
                reads: tuple[int, ...] = (), hist_slot: int = 0, out2_slot: int = 0, **columns) -> dict[str, Any]:
    """The step-table columns of one row (fastdiff.tables) from the linear combinations it computes."""
    row = dict(columns)
    for prefix, combination in (("out", out), ("hist", hist), ("out2", out2)):
        for key, value in (combination or {}).items():  # x, m, x0 and (out, out2) h1 .. h4
            if prefix == "hist" and key.startswith("h"):
                raise AssertionError("the history entry is a combination of x, m and x0 only")
            row[f"{prefix}_{key}"] = value
    for k, slot in enumerate(reads):
        row[f"read_slot{k + 1}"] = slot
    row["hist_slot"], row["out2_slot"] = hist_slot, out2_slot
    return row


def table_from_rows(rows: list[dict[str, Any]], what: str) -> torch.Tensor:
    """float32 [len(rows) + 1, WIDTH] table (NaN sentinel last) from per-row column dicts; every
    coefficient must be finite (a non-finite one is the schedule's fault: a named error, not NaN samples)."""
    n = len(rows)
    names = sorted({name for row in rows for name in row})
    columns = {}
    for name in names:
        default = T.DEFAULTS.get(name, 0.0)
        columns[name] = torch.tensor([float(row.get(name, default)) for row in rows], dtype=torch.float64)
    table = T.step_table(n, dtype=torch.float64, **columns)
    bad = ~torch.isfinite(table[:n])
    if bad.any():
        step = int(bad.any(1).nonzero()[0])
        cols = [name for name, c in T.COLUMNS.items() if bad[step, c]]
        raise ValueError(f"{what}: step {step} of {n} has non-finite coefficients ({', '.join(cols)}); "
                         "this schedule cannot be sampled (diffusers returns inf / NaN samples for it)")
    return table


class ScalarSchedule:
    """Per-sigma 0-d tensors computed exactly as diffusers computes them inside a step (0-d ops, so the
    same float32 roundings, transcendental functions included): sigma, alpha_t, sigma_t, lambda_t."""

    def __init__(self, sigmas: torch.Tensor, flow: bool, dtype: torch.dtype):
        self.sigma = [s.to(dtype) for s in sigmas.to(dtype).unbind()]
        pairs = [S.sigma_to_alpha_sigma_t(s, flow) for s in self.sigma]
        self.alpha = [a for a, _ in pairs]
        self.sig = [s for _, s in pairs]
        self.lam = [torch.log(a) - torch.log(s) for a, s in pairs]


# ---- what the multistep samplers share -------------------------------------------------------------------
class MultistepSampler(BaseSampler):
    """Engine plumbing of the multistep solvers (DPM-Solver++, UniPC): the VP schedule, the history ring,
    the warm-up stages and the step (subclasses build rows).

    Warm-up: diffusers lowers the order for the first steps *taken* (its `lower_order_nums`), not
    for the first indices, so the rows depend on the loop's first index b. `_build_table()` stacks
    one table per warm-up stage k (k = steps taken, the last one for every later step); the first
    step of a loop gathers, on the device, row i of stage clamp(i - b, 0, last) for every i (b a
    host int or the device index found from the timestep), and the loop steps on that table.
    """

    returns_x0 = False  # diffusers' multistep schedulers return prev_sample only
    warmup_stages = 1  # tables for steps taken = 0 .. warmup_stages - 1 (the last for all later steps)

    # ---- the schedule -------------------------------------------------------------------------
    def _init_multistep(self) -> None:
        config = self.config
        check_choice("solver_order", config.solver_order, SOLVER_ORDERS)
        check_choice("prediction_type", config.prediction_type, PREDICTION_TYPES)
        check_choice("timestep_spacing", config.timestep_spacing, ("linspace", "leading", "trailing"))
        check_choice("final_sigmas_type", config.final_sigmas_type, S.FINAL_SIGMAS_TYPES)
        table_dtype(config.table_dtype)
        if config.trained_betas is None:
            check_choice("beta_schedule", config.beta_schedule, MULTISTEP_BETA_SCHEDULES)
        if config.prediction_type == "flow_prediction" and not config.use_flow_sigmas:
            raise ValueError("prediction_type='flow_prediction' needs use_flow_sigmas=True (a flow model's sigmas "
                             "are the noise fraction t, not a VP schedule's; diffusers accepts it and samples garbage)")
        if not 0.0 < config.dynamic_thresholding_ratio <= 1.0:
            raise ValueError(f"dynamic_thresholding_ratio must be in (0, 1], got {config.dynamic_thresholding_ratio!r}")
        S.sigma_conversion(config)  # at most one of karras / exponential / beta
        self._init_schedule(config)  # diffusers' float32 betas / alphas_cumprod
        if config.rescale_betas_zero_snr:
            self.alphas_cumprod[-1] = 2**-24  # as diffusers: close to 0, so the first sigma is finite
        abar = self.alphas_cumprod
        self.alpha_t, self.sigma_t = torch.sqrt(abar), torch.sqrt(1 - abar)
        self.lambda_t = torch.log(self.alpha_t) - torch.log(self.sigma_t)
        self.sigmas = ((1 - abar) / abar) ** 0.5
        T_ = config.num_train_timesteps
        self.timesteps = torch.from_numpy(np.linspace(0, T_ - 1, T_, dtype=np.float32)[::-1].copy())
        self._active = None

    def _check_steps(self, num_inference_steps) -> int:
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)) \
                or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be an int >= 1, got {num_inference_steps!r}")
        return int(num_inference_steps)

    def _final_sigma(self, vp_sigma_min: bool, last: float) -> float:
        """The sigma after the last step: 0, or sigma_min (the training schedule's first VP sigma for
        DPM-Solver and UniPC's VP sigmas, the schedule's last sigma for UniPC's converted ones)."""
        if self.config.final_sigmas_type == "zero":
            return 0.0
        if vp_sigma_min:
            return float(((1 - self.alphas_cumprod[0]) / self.alphas_cumprod[0]) ** 0.5)
        return float(last)

    def _set_schedule(self, sigmas: np.ndarray, timesteps: np.ndarray, device) -> None:
        """Store sigmas (float32, CPU, as diffusers) and timesteps (int64 on `device`), reset the engine."""
        self.sigmas = torch.from_numpy(np.asarray(sigmas, dtype=np.float32))
        self.num_inference_steps = len(timesteps)
        self._active = None
        self._install_schedule(torch.from_numpy(np.asarray(timesteps)).to(dtype=torch.int64), device)

    def _scalars(self) -> ScalarSchedule:
        """The schedule's per-sigma scalars (cached per sigmas and config object)."""
        cached = getattr(self, "_scalar_cache", None)
        if cached is None or cached[0] is not self.sigmas or cached[1] is not self.config:
            scalars = ScalarSchedule(self.sigmas, bool(self.config.use_flow_sigmas), table_dtype(self.config.table_dtype))
            cached = self._scalar_cache = (self.sigmas, self.config, scalars)
        return cached[2]

    def _x0_columns(self, i: int) -> dict[str, Any]:
        """x0 = (x0_x x + x0_m m) x0_scale at step i, as diffusers' convert_model_output."""
        s = self._scalars()
        alpha_t, sigma_t = s.alpha[i], s.sig[i]
        prediction = self.config.prediction_type
        if prediction == "epsilon":  # (x - sigma_t eps) / alpha_t
            return {"x0_x": 1.0, "x0_m": -sigma_t.item(), "x0_scale": (1 / alpha_t).item()}
        if prediction == "sample":
            return {"x0_x": 0.0, "x0_m": 1.0, "x0_scale": 1.0}
        if prediction == "v_prediction":  # alpha_t x - sigma_t v (Salimans & Ho 2022, sec. 4)
            return {"x0_x": alpha_t.item(), "x0_m": -sigma_t.item(), "x0_scale": 1.0}
        return {"x0_x": 1.0, "x0_m": -s.sigma[i].item(), "x0_scale": 1.0}  # flow: x - sigma v

    def _eps(self, i: int, thresholded: bool) -> Lin:
        """The noise prediction eps at step i as a combination of (x, m, x0), as diffusers derives it."""
        s = self._scalars()
        alpha_t, sigma_t = s.alpha[i], s.sig[i]
        if thresholded:  # re-derived from the thresholded x0: (x - alpha_t x0) / sigma_t
            return (X - alpha_t * X0) / sigma_t
        prediction = self.config.prediction_type
        if prediction == "epsilon":
            return M
        if prediction == "sample":
            return (X - alpha_t * M) / sigma_t
        if prediction == "v_prediction":
            return alpha_t * M + sigma_t * X
        raise ValueError(f"prediction_type={prediction!r} has no noise prediction for {self._eps_user()}")

    def _eps_user(self) -> str:
        return type(self).__name__

    # ---- tables -------------------------------------------------------------------------------
    def _stage_table(self, stage: int) -> torch.Tensor:
        raise NotImplementedError

    def _build_table(self) -> torch.Tensor:
        """[warmup_stages, N + 1, WIDTH]: one table per warm-up stage (steps taken; the last: all later).
        Stages share most rows: each distinct row is derived once (`_row`)."""
        self._rows_memo: dict = {}
        try:
            return torch.stack([self._stage_table(k) for k in range(self.warmup_stages)])
        finally:
            self._rows_memo = {}

    def _row(self, i: int, *orders) -> dict[str, Any]:
        key = (i, *orders)
        row = self._rows_memo.get(key)
        if row is None:
            row = self._rows_memo[key] = self._make_row(i, *orders)
        return row

    def _make_row(self, i: int, *orders) -> dict[str, Any]:
        raise NotImplementedError

    def _loop_table(self, device: torch.device, index: torch.Tensor) -> torch.Tensor:
        """The table of this loop: row i from stage clamp(i - b, 0, last), b = the loop's first index.

        Built on the device at the first step after set_timesteps / set_begin_index (b a host int
        or the device index: no sync), then reused by every step (and read by a captured graph).
        """
        stages = self._table(device)
        active = self._active
        if active is not None and active[0] is stages:
            return active[1]
        rows = stages.shape[1]
        positions = self._on(device, ("rows", rows), lambda d: torch.arange(rows, device=d))
        first = self._step_index if self._step_index is not None else index  # host int, else the device index
        stage = (positions - first).clamp(0, stages.shape[0] - 1)
        table = stages[stage, positions]
        self._active = (stages, table)
        return table

    def set_begin_index(self, begin_index: int = 0) -> None:
        super().set_begin_index(begin_index)
        self._active = None  # the warm-up rows start at the new first index

    def _restart(self) -> None:
        super()._restart()
        if self._begin_index is None:
            self._active = None  # the first step finds its index (and rows) again

    def _engine_state(self) -> tuple:
        return super()._engine_state() + (None if self._active is None else self._active[1],)

    # ---- the step -----------------------------------------------------------------------------
    variance_channels = False  # whether model_output may carry [prediction; variance] channels
    noisy = False  # whether the step adds noise (the SDE kinds)

    def _step(self, model_output, timestep, sample, generator, variance_noise, return_dict, seed, guidance_scale,
              skip_layer_output, skip_layer_guidance_scale, sample_offset, out):
        if self.num_inference_steps is None:
            raise ValueError("num_inference_steps is None: call set_timesteps(num_inference_steps) before step()")
        extra, extra_scale = self._skip_layer_guidance(skip_layer_output, skip_layer_guidance_scale)
        self._check_step_inputs(model_output, sample, guidance_scale, self.variance_channels, extra)
        index = self._counter_index(timestep, sample.device)
        table = self._loop_table(sample.device, index)
        noise = None
        if self.noisy:
            if generator is not None and (variance_noise is not None or seed is not None):
                raise ValueError("pass at most one of generator, variance_noise and seed")
            if generator is not None:  # diffusers: randn_tensor(shape, generator, float32), every step
                noise = randn_like_diffusers(sample.shape, generator, sample.device, torch.float32)
            else:
                noise, seed = self._noise(sample, model_output, None, variance_noise, seed, True)
        else:
            seed = None
        return self._run_step(model_output, sample, table, index, noise=noise, seed=seed,
                              sample_offset=sample_offset, guidance_scale=guidance_scale,
                              guidance_extra=extra, extra_scale=extra_scale,
                              advance=True, out=out, return_dict=return_dict)

    # ---- the rest of diffusers' surface -------------------------------------------------------
    def scale_model_input(self, sample: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return sample  # init_noise_sigma = 1: model inputs need no scaling

    def _sigma_to_alpha_sigma_t(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return S.sigma_to_alpha_sigma_t(sigma, bool(self.config.use_flow_sigmas))

    def index_for_timestep(self, timestep, schedule_timesteps: Optional[torch.Tensor] = None) -> int:
        """diffusers' index_for_timestep (a host value; the second match when a timestep repeats, the last
        index when there is none)."""
        if schedule_timesteps is not None:
            matches = (schedule_timesteps.cpu() == torch.as_tensor(timestep).cpu()).nonzero()
            return int(matches[1 if len(matches) > 1 else 0]) if len(matches) else len(schedule_timesteps) - 1
        return int(self._schedule_indices(torch.as_tensor(timestep).cpu(), missing=len(self.timesteps) - 1)[0])

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """alpha_t x0 + sigma_t noise at the schedule's sigma of each timestep (diffusers' add_noise: the
        step index from begin_index / step_index when set, else each timestep's index), without a sync."""
        if self.num_inference_steps is None:
            raise ValueError("add_noise needs the inference schedule: call set_timesteps first")
        if noise.shape != original_samples.shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)} but original_samples has shape "
                             f"{tuple(original_samples.shape)}")
        device, dtype = original_samples.device, original_samples.dtype
        sigmas = self._on(device, ("sigmas", dtype), lambda d: upload(self.sigmas.to(dtype), d))  # no sync
        timesteps = torch.as_tensor(timesteps).reshape(-1).to(device)
        if self._begin_index is None:  # diffusers' index_for_timestep: the last index when there is no match
            index = self._schedule_indices(timesteps, missing=len(self.timesteps) - 1)
        elif self._counter is not None and not self._index_pending and self._active is not None:
            index = self._counter.to(device).expand(timesteps.shape[0])  # after the first step (inpainting)
        else:
            index = torch.full((timesteps.shape[0],), self._begin_index, device=device)
        sigma = sigmas.index_select(0, index).reshape(-1, *([1] * (original_samples.ndim - 1)))
        alpha_t, sigma_t = self._sigma_to_alpha_sigma_t(sigma)
        return alpha_t * original_samples + sigma_t * noise
