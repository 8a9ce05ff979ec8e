"""DPMSolverMultistepSampler: a drop-in for diffusers' DPMSolverMultistepScheduler, a table builder on the
fused step (DPM-Solver, Lu et al. 2022, arXiv:2206.00927; DPM-Solver++, Lu et al. 2022, arXiv:2211.01095).

With lambda = log(alpha / sigma), h = lambda_t - lambda_s0, r0 = h_0 / h, r1 = h_1 / h (the previous
step sizes) and m0, m1, m2 the data predictions x0 of this and the two previous steps, DPM-Solver++
multistep reads (DPM-Solver++ eq. 8 and Algorithm 2; the third order as in DPM-Solver's code):

    order 1 (DDIM):  x_t = (sigma_t / sigma_s0) x - alpha_t (e^-h - 1) m0
    order 2:         D1 = (m0 - m1) / r0
                     midpoint: x_t = ... - 1/2 alpha_t (e^-h - 1) D1;  heun: ... + alpha_t ((e^-h - 1) / h + 1) D1
    order 3:         D1_0 = (m0 - m1) / r0,  D1_1 = (m1 - m2) / r1,  D2 = (D1_0 - D1_1) / (r0 + r1)
                     D1 = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1)
                     x_t = ... + alpha_t ((e^-h - 1) / h + 1) D1 - alpha_t ((e^-h - 1 + h) / h^2 - 1/2) D2

sde-dpmsolver++ solves the reverse SDE instead (x_t keeps e^-h of x, the data terms weigh 1 - e^-2h, and
sigma_t sqrt(1 - e^-2h) n is added); the deprecated dpmsolver / sde-dpmsolver integrate the noise
prediction eps instead of x0 (DPM-Solver eq. 3.7). Every term is linear in (x, m, x0, the history)
with coefficients that depend only on the schedule, so `set_timesteps` computes one table row per
step and order in force, and a step is one fused op (fastdiff.tables):

    x0 = (X0_X x + X0_M m) X0_SCALE  (then thresholding)        the prediction type as numbers
    hist  = this step's history quantity: x0 (dpmsolver++ kinds) or eps (dpmsolver kinds, re-derived
            from the thresholded x0 when thresholding, as diffusers does), written to slot i mod K
    out   = OUT_X x + OUT_M m + OUT_X0 x0 + OUT_H1 m1 + OUT_H2 m2 + NOISE_STD n
    h1, h2 = slots (i - 1) mod K and (i - 2) mod K: the ring of K = solver_order history slots

The order in force is part of the row: warm-up (the first solver_order - 1 steps after the loop's
first step), `lower_order_final` (fewer than 15 steps), `euler_at_final`, a final sigma of 0. Rows
for each warm-up stage are built once; the first step of a loop picks, on the device, the rows for
its first index (diffusers counts warm-up from the first step taken, img2img included), so no step
synchronises with the host and one captured step replays a whole loop.

The third-order SDE update (sde-dpmsolver++, solver_order=3). diffusers 0.42 weighs D2 with
alpha_t ((1 - e^-2h - 2h) / (2h)^2 - 1/2), which tends to -alpha_t as h -> 0; the DPM-Solver
derivation (the integral of 2 e^-2(lambda_t - lambda) x0(lambda) over the step, the same phi_3 as
the ODE's third order) gives alpha_t ((1 - e^-2h - 2h) / (2h)^2 + 1/2) = -alpha_t phi_3(2h), which
tends to 0 like h / 3, and is what k-diffusion's `sample_dpmpp_3m_sde` uses. diffusers' sign is a
bug, not a choice: integrating a smooth x0(lambda) with exact history, its third-order SDE step
converges with order 1.0 (global error halves when h halves) while k-diffusion's and the second-order
step converge with order 2 (tests/test_dpm_solver.py, `test_sde_third_order_convergence`). So the default,
`sde_third_order="k-diffusion"`, uses the +1/2; `sde_third_order="diffusers"` reproduces diffusers
bit for bit in its operation order. (Aside, documented not changed: with D2 = (D1_0 - D1_1) / (r0 + r1)
~ h^2 x0'' / 2, a Taylor-exact third order would weigh D2 twice as much, -2 phi_3; every reference
implementation -- DPM-Solver's multistep code, diffusers' ODE third order, k-diffusion -- uses
-phi_3, so the "3M" updates converge with order 2, with a smaller constant than 2M.)

Other differences from diffusers, all on purpose: `step` never synchronises with the device and takes
`seed=` (in-kernel Philox noise for the SDE kinds, counter = the step index), `guidance_scale=`
(CFG fused, model_output = [uncond; cond]), `skip_layer_output=` / `skip_layer_guidance_scale=`
(SD3-style skip-layer guidance, fused), `sample_offset=` and `out=`; learned-variance outputs keep
their first C channels for any C (diffusers slices `[:, :3]`); flow_prediction without use_flow_sigmas,
custom `timesteps` with use_flow_sigmas and a third order for sde-dpmsolver (all of which diffusers
accepts and then computes garbage or crashes on) are named errors; `set_timesteps(mu=)` replaces the
config with one whose flow_shift is e^mu (diffusers writes the same into its config).
`table_dtype="float64"` derives the coefficients in float64 instead of diffusers' float32.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np
import torch

from .. import tables as T
from . import sigmas as S
from .base import BaseSampler, check_choice, randn_like_diffusers, table_dtype
from .config import register_to_config

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction", "flow_prediction")
MULTISTEP_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
ALGORITHM_TYPES = ("dpmsolver++", "sde-dpmsolver++", "dpmsolver", "sde-dpmsolver")
SOLVER_TYPES = ("midpoint", "heun")
SDE_THIRD_ORDER = ("k-diffusion", "diffusers")
VARIANCE_TYPES = (None, "learned", "learned_range")
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
        sigmas = self.sigmas.to(device=device, dtype=dtype)
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


class DPMSolverMultistepSampler(MultistepSampler):
    """Same constructor, config keys and defaults as `diffusers.DPMSolverMultistepScheduler`, plus
    `sde_third_order` and `table_dtype` (module docstring). A step is one fused op with the history
    of data (or noise) predictions in a device ring buffer; no host synchronisation anywhere."""

    diffusers_class_name = "DPMSolverMultistepScheduler"

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, solver_order: int = 2,
                 prediction_type: str = "epsilon", thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, sample_max_value: float = 1.0,
                 algorithm_type: str = "dpmsolver++", solver_type: str = "midpoint", lower_order_final: bool = True,
                 euler_at_final: bool = False, use_karras_sigmas: bool = False, use_exponential_sigmas: bool = False,
                 use_beta_sigmas: bool = False, use_lu_lambdas: bool = False, use_flow_sigmas: bool = False,
                 flow_shift: float = 1.0, final_sigmas_type: str = "zero", lambda_min_clipped: float = -float("inf"),
                 variance_type: Optional[str] = None, timestep_spacing: str = "linspace", steps_offset: int = 0,
                 rescale_betas_zero_snr: bool = False, use_dynamic_shifting: bool = False,
                 time_shift_type: str = "exponential", sde_third_order: str = "k-diffusion",
                 table_dtype: str = "float32"):
        # diffusers maps the names of its other solvers onto these (a config switched with from_config)
        renamed = {}
        if algorithm_type == "deis":
            renamed["algorithm_type"] = "dpmsolver++"
        if solver_type in ("logrho", "bh1", "bh2"):
            renamed["solver_type"] = "midpoint"
        if renamed:
            self.register_to_config(**renamed)
        config = self.config
        check_choice("algorithm_type", config.algorithm_type, ALGORITHM_TYPES)
        check_choice("solver_type", config.solver_type, SOLVER_TYPES)
        check_choice("variance_type", variance_type, VARIANCE_TYPES)
        check_choice("sde_third_order", sde_third_order, SDE_THIRD_ORDER)
        check_choice("time_shift_type", time_shift_type, ("exponential",))
        if config.algorithm_type in ("dpmsolver", "sde-dpmsolver") and final_sigmas_type == "zero":
            raise ValueError(f"final_sigmas_type='zero' is not supported for algorithm_type={config.algorithm_type!r} "
                             "(its noise-prediction update divides by sigma = 0): use final_sigmas_type='sigma_min'")
        if config.algorithm_type == "sde-dpmsolver" and solver_order == 3:
            raise ValueError("algorithm_type='sde-dpmsolver' has no third-order update (diffusers crashes at its third "
                             "step): use solver_order 1 or 2, or algorithm_type='sde-dpmsolver++'")
        if config.algorithm_type in ("dpmsolver", "sde-dpmsolver") and prediction_type == "flow_prediction":
            raise ValueError(f"algorithm_type={config.algorithm_type!r} integrates the noise prediction, which a "
                             "flow_prediction model does not give: use dpmsolver++ or sde-dpmsolver++")
        if use_lu_lambdas and (use_karras_sigmas or use_exponential_sigmas or use_beta_sigmas or use_flow_sigmas):
            raise ValueError("use_lu_lambdas cannot be combined with karras / exponential / beta / flow sigmas")
        self._init_multistep()

    # ---- configuration-derived properties -------------------------------------------------------
    @property
    def noisy(self) -> bool:
        return self.config.algorithm_type in ("sde-dpmsolver++", "sde-dpmsolver")

    @property
    def variance_channels(self) -> bool:
        return self.config.variance_type in ("learned", "learned_range")

    @property
    def _data_prediction(self) -> bool:  # DPM-Solver++ kinds integrate x0, the deprecated kinds eps
        return self.config.algorithm_type in ("dpmsolver++", "sde-dpmsolver++")

    @property
    def warmup_stages(self) -> int:
        return self.config.solver_order

    @property
    def history_slots(self) -> int:
        return self.config.solver_order if self.config.solver_order > 1 else 0

    @property
    def history_reads(self) -> int:
        return self.config.solver_order - 1

    @property
    def writes_history(self) -> bool:
        return self.config.solver_order > 1

    # ---- timesteps ----------------------------------------------------------------------------
    def set_timesteps(self, num_inference_steps: Optional[int] = None, device: str | torch.device | None = None,
                      mu: Optional[float] = None, timesteps: Optional[list[int]] = None) -> None:
        """diffusers' schedule: spacing (or custom `timesteps`), then Karras / Lu / exponential / beta /
        flow sigmas; `mu` (dynamic shifting) sets flow_shift = e^mu in the config, as diffusers."""
        if mu is not None:
            if not (self.config.use_dynamic_shifting and self.config.time_shift_type == "exponential"):
                raise ValueError("mu needs use_dynamic_shifting=True (and time_shift_type='exponential')")
            self.register_to_config(flow_shift=float(np.exp(mu)))  # a new config object: tables rebuild
        config = self.config
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("pass exactly one of num_inference_steps and timesteps")
        T_ = config.num_train_timesteps
        if timesteps is not None:
            for key in ("use_karras_sigmas", "use_lu_lambdas", "use_exponential_sigmas", "use_beta_sigmas",
                        "use_flow_sigmas"):
                if config[key]:
                    raise ValueError(f"custom timesteps cannot be used with {key}=True")
            steps = np.array(list(timesteps)).astype(np.int64)
            if steps.ndim != 1 or len(steps) == 0 or np.any(np.diff(steps) >= 0) or steps[0] >= T_ or steps[-1] < 0:
                raise ValueError(f"timesteps must be a non-empty strictly descending list in [0, {T_}), "
                                 f"got {list(timesteps)}")
            n = len(steps)
        else:
            n = self._check_steps(num_inference_steps)
            last = S.lambda_clipped_last_timestep(self.lambda_t, config.lambda_min_clipped, T_)
            steps = S.multistep_timesteps(n, config.timestep_spacing, config.steps_offset, T_, last)
            if steps.min() < 0 or steps.max() >= T_:
                raise ValueError(f"steps_offset={config.steps_offset} moves timesteps outside [0, {T_}): "
                                 f"{steps.tolist()}")
        sigmas = S.vp_sigmas(self.alphas_cumprod)
        log_sigmas = np.log(sigmas)
        conversion = S.sigma_conversion(config)
        if conversion is not None:
            sigmas = S.convert_sigmas(conversion, np.flip(sigmas).copy(), n)
            steps = S.sigmas_to_timesteps(sigmas, log_sigmas)
            if conversion == "use_karras_sigmas" and config.beta_schedule != "squaredcos_cap_v2":
                steps = steps.round()
        elif config.use_lu_lambdas:
            lambdas = S.lu_lambdas(np.flip(log_sigmas.copy()), n)
            sigmas = np.exp(lambdas)
            steps = S.sigmas_to_timesteps(sigmas, log_sigmas)
            if config.beta_schedule != "squaredcos_cap_v2":
                steps = steps.round()
        elif config.use_flow_sigmas:
            sigmas = S.flow_sigmas(T_, n, config.flow_shift)
            steps = (sigmas * T_).copy()
        else:
            sigmas = np.interp(steps, np.arange(0, len(sigmas)), sigmas)
        sigmas = np.concatenate([sigmas, [self._final_sigma(True, 0.0)]]).astype(np.float32)
        self._set_schedule(sigmas, steps, device)

    # ---- the rows ---------------------------------------------------------------------------------
    def _order(self, i: int, stage: int) -> int:
        """The order diffusers uses at step i after `stage` steps taken (its lower_order_nums)."""
        config, n = self.config, self.num_inference_steps
        lower_final = i == n - 1 and (config.euler_at_final or (config.lower_order_final and n < 15)
                                      or config.final_sigmas_type == "zero")
        lower_second = i == n - 2 and config.lower_order_final and n < 15
        if config.solver_order == 1 or stage < 1 or lower_final:
            order = 1
        elif config.solver_order == 2 or stage < 2 or lower_second:
            order = 2
        else:
            order = 3
        return min(order, i + 1)  # rows before the loop's first index are never read; keep them well-formed

    def _stage_table(self, stage: int) -> torch.Tensor:
        rows = [self._row(i, self._order(i, stage)) for i in range(self.num_inference_steps)]
        return table_from_rows(rows, f"{type(self).__name__}({self.config.algorithm_type}, order "
                                     f"{self.config.solver_order})")

    def _make_row(self, i: int, order: int) -> dict[str, Any]:
        """Row i: diffusers' update of this order, term by term, on the step's inputs (Lin)."""
        config, K = self.config, self.config.solver_order
        thresholded = bool(config.thresholding)
        # this step's history quantity: x0 (DPM-Solver++) or eps (DPM-Solver), after thresholding
        model_output = X0 if self._data_prediction else self._eps(i, thresholded)
        history = (model_output, HISTORY[0], HISTORY[1])  # m0, m1, m2 (previous steps: slots (i-1), (i-2) mod K)
        update = (self._first_order, self._second_order, self._third_order)[order - 1]
        out, noise_std = update(i, history)
        reads = tuple((i - k) % K for k in range(1, K)) if K > 1 else ()
        return row_columns(out, hist=model_output if K > 1 else None, reads=reads, hist_slot=i % K if K > 1 else 0,
                           noise_std=noise_std, **self._x0_columns(i))

    def _lambdas(self, i: int, back: int):
        """(alpha_t, sigma_t) of the target sigma and (alpha, sigma, lambda) of sigmas i, i-1, ..., i-back."""
        s = self._scalars()
        target = (s.alpha[i + 1], s.sig[i + 1], s.lam[i + 1])
        return target, [(s.alpha[i - j], s.sig[i - j], s.lam[i - j]) for j in range(back + 1)]

    def _first_order(self, i: int, m):
        """DPM-Solver(++)-1 (equivalent to DDIM): diffusers' dpm_solver_first_order_update."""
        (alpha_t, sigma_t, lambda_t), [(alpha_s, sigma_s, lambda_s)] = self._lambdas(i, 0)
        h = lambda_t - lambda_s
        algorithm, x0, noise = self.config.algorithm_type, m[0], 0.0
        if algorithm == "dpmsolver++":
            x_t = (sigma_t / sigma_s) * X - (alpha_t * (torch.exp(-h) - 1.0)) * x0
        elif algorithm == "dpmsolver":
            x_t = (alpha_t / alpha_s) * X - (sigma_t * (torch.exp(h) - 1.0)) * x0
        elif algorithm == "sde-dpmsolver++":
            x_t = (sigma_t / sigma_s * torch.exp(-h)) * X + (alpha_t * (1 - torch.exp(-2.0 * h))) * x0
            noise = sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h))
        else:  # sde-dpmsolver
            x_t = (alpha_t / alpha_s) * X - 2.0 * (sigma_t * (torch.exp(h) - 1.0)) * x0
            noise = sigma_t * torch.sqrt(torch.exp(2 * h) - 1.0)
        return x_t, noise

    def _second_order(self, i: int, m):
        """Multistep DPM-Solver(++)-2M: diffusers' multistep_dpm_solver_second_order_update."""
        (alpha_t, sigma_t, lambda_t), [(alpha_s0, sigma_s0, lambda_s0), (_, _, lambda_s1)] = self._lambdas(i, 1)
        m0, m1 = m[0], m[1]
        h, h_0 = lambda_t - lambda_s0, lambda_s0 - lambda_s1
        r0 = h_0 / h
        D0, D1 = m0, (1.0 / r0) * (m0 - m1)
        algorithm, midpoint, noise = self.config.algorithm_type, self.config.solver_type == "midpoint", 0.0
        if algorithm == "dpmsolver++":  # DPM-Solver++ eq. 8 / Algorithm 2
            x_t = (sigma_t / sigma_s0) * X - (alpha_t * (torch.exp(-h) - 1.0)) * D0
            if midpoint:
                x_t = x_t - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * D1
            else:
                x_t = x_t + (alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0)) * D1
        elif algorithm == "dpmsolver":
            x_t = (alpha_t / alpha_s0) * X - (sigma_t * (torch.exp(h) - 1.0)) * D0
            if midpoint:
                x_t = x_t - 0.5 * (sigma_t * (torch.exp(h) - 1.0)) * D1
            else:
                x_t = x_t - (sigma_t * ((torch.exp(h) - 1.0) / h - 1.0)) * D1
        elif algorithm == "sde-dpmsolver++":
            x_t = (sigma_t / sigma_s0 * torch.exp(-h)) * X + (alpha_t * (1 - torch.exp(-2.0 * h))) * D0
            if midpoint:
                x_t = x_t + 0.5 * (alpha_t * (1 - torch.exp(-2.0 * h))) * D1
            else:
                x_t = x_t + (alpha_t * ((1.0 - torch.exp(-2.0 * h)) / (-2.0 * h) + 1.0)) * D1
            noise = sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h))
        else:  # sde-dpmsolver
            x_t = (alpha_t / alpha_s0) * X - 2.0 * (sigma_t * (torch.exp(h) - 1.0)) * D0
            if midpoint:
                x_t = x_t - (sigma_t * (torch.exp(h) - 1.0)) * D1
            else:
                x_t = x_t - 2.0 * (sigma_t * ((torch.exp(h) - 1.0) / h - 1.0)) * D1
            noise = sigma_t * torch.sqrt(torch.exp(2 * h) - 1.0)
        return x_t, noise

    def _third_order(self, i: int, m):
        """Multistep DPM-Solver(++)-3M: diffusers' multistep_dpm_solver_third_order_update (the SDE's D2
        weight per `sde_third_order`, module docstring)."""
        (alpha_t, sigma_t, lambda_t), [(alpha_s0, sigma_s0, lambda_s0), (_, _, lambda_s1), (_, _, lambda_s2)] = \
            self._lambdas(i, 2)
        m0, m1, m2 = m
        h, h_0, h_1 = lambda_t - lambda_s0, lambda_s0 - lambda_s1, lambda_s1 - lambda_s2
        r0, r1 = h_0 / h, h_1 / h
        D0 = m0
        D1_0, D1_1 = (1.0 / r0) * (m0 - m1), (1.0 / r1) * (m1 - m2)
        D1 = D1_0 + (r0 / (r0 + r1)) * (D1_0 - D1_1)
        D2 = (1.0 / (r0 + r1)) * (D1_0 - D1_1)
        algorithm, noise = self.config.algorithm_type, 0.0
        if algorithm == "dpmsolver++":
            x_t = ((sigma_t / sigma_s0) * X - (alpha_t * (torch.exp(-h) - 1.0)) * D0
                   + (alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0)) * D1
                   - (alpha_t * ((torch.exp(-h) - 1.0 + h) / h**2 - 0.5)) * D2)
        elif algorithm == "dpmsolver":
            x_t = ((alpha_t / alpha_s0) * X - (sigma_t * (torch.exp(h) - 1.0)) * D0
                   - (sigma_t * ((torch.exp(h) - 1.0) / h - 1.0)) * D1
                   - (sigma_t * ((torch.exp(h) - 1.0 - h) / h**2 - 0.5)) * D2)
        else:  # sde-dpmsolver++ (sde-dpmsolver has no third order: rejected in __init__)
            half = 0.5 if self.config.sde_third_order == "k-diffusion" else -0.5  # -phi_3(2h) vs diffusers' sign
            x_t = ((sigma_t / sigma_s0 * torch.exp(-h)) * X + (alpha_t * (1.0 - torch.exp(-2.0 * h))) * D0
                   + (alpha_t * ((1.0 - torch.exp(-2.0 * h)) / (-2.0 * h) + 1.0)) * D1
                   + (alpha_t * ((1.0 - torch.exp(-2.0 * h) - 2.0 * h) / (2.0 * h) ** 2 + half)) * D2)
            noise = sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h))
        return x_t, noise

    # ---- the step -----------------------------------------------------------------------------
    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             variance_noise: Optional[torch.Tensor] = None, return_dict: bool = True, *, seed: Optional[int] = None,
             guidance_scale: Optional[float] = None, skip_layer_output: Optional[torch.Tensor] = None,
             skip_layer_guidance_scale: float = 0.0, sample_offset: int = 0, out: Optional[torch.Tensor] = None):
        """One multistep DPM-Solver(++) step in one fused op: converts the model output, writes it into
        the history ring and takes the update of the order in force (`out=`: see BaseSampler).

        SDE kinds: noise from `generator` (drawn as diffusers draws it, every step), `variance_noise`,
        or `seed` (in-kernel Philox, counter = the step index); none: a seed from torch's CPU generator.
        """
        return self._step(model_output, timestep, sample, generator, variance_noise, return_dict, seed,
                          guidance_scale, skip_layer_output, skip_layer_guidance_scale, sample_offset, out)
