"""What every sampler shares: the engine state a step reads and the one fused call every `step` makes.

A sampler is a table builder (fastdiff.tables). `set_timesteps` builds its step table; `step`
validates its inputs once per call signature, finds the row index without a host sync, picks
the noise, and calls the generic fused op (`fastdiff.ops.run_step`). The state lives on the
sample's device (gpt-fast style): the tables, a step counter (int64 [1]) the op advances, and
the history ring buffer the op reads and writes.

Two ways to find a row, as diffusers has them:
- by timestep (DDPM, DDIM: `step(t)` works for any t of the schedule, in any order): the table
  has one row per training timestep, and the row index is t itself (a view of a cached device
  arange for a host t; the device tensor for a device t: no sync either way);
- by step index (every sampler whose diffusers twin keeps `step_index`): the device counter,
  set on the first step from `begin_index` or the first timestep, advanced by the op.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional, Sequence

import numpy as np
import torch

from .. import noise as N
from .. import ops
from .. import reference as R
from .. import schedules
from .. import tables as T
from .config import ConfigMixin
from .output import SamplerOutput

TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")
TABLE_DTYPES = ("float32", "float64")


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


def upload(tensor: torch.Tensor, device) -> torch.Tensor:
    """A host tensor on `device` without a host sync: on CUDA through pinned memory and a non-blocking copy
    (a pageable copy would wait for the device; diffusers' set_timesteps does)."""
    device = torch.device(device if device is not None else "cpu")
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def check_choice(name: str, value, allowed: Sequence) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")


def check_vp_config(config, prediction_types: Sequence[str]) -> None:
    """The options every beta-schedule sampler shares (diffusers' names)."""
    check_choice("prediction_type", config["prediction_type"], prediction_types)
    check_choice("timestep_spacing", config["timestep_spacing"], TIMESTEP_SPACINGS)
    table_dtype(config["table_dtype"])
    ratio = config.get("dynamic_thresholding_ratio", 0.995)
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"dynamic_thresholding_ratio must be in (0, 1], got {ratio!r}")


def table_dtype(name: str) -> torch.dtype:
    """The dtype coefficients are derived in: float32 (diffusers' values, in its operation order) or float64."""
    check_choice("table_dtype", name, TABLE_DTYPES)
    return torch.float32 if name == "float32" else torch.float64


class StepPlan(NamedTuple):
    """The config-derived options of a step (BaseSampler._plan)."""
    clip_range: Optional[float]  # clip_sample_range when clip_sample (and not thresholding), else None
    thresholding: bool  # dynamic thresholding of x0 (Imagen sec. 2.3)
    variance_mode: int  # tables.VAR_*: how the noise std is formed


class BaseSampler(ConfigMixin):
    order = 1
    init_noise_sigma = 1.0
    # How a step finds its row: by the timestep value (DDPM, DDIM) or by the device step counter.
    keyed_by_timestep = False
    # Whether `step` returns pred_original_sample (as the diffusers twin's output does).
    returns_x0 = True

    # ---- the schedule -------------------------------------------------------------------------
    def _init_schedule(self, config) -> None:
        """Validate the shared options and build diffusers' float32 beta / alpha tables."""
        if config.trained_betas is None:
            check_choice("beta_schedule", config.beta_schedule, schedules.BETA_SCHEDULES)
        self.betas = schedules.make_betas(config.num_train_timesteps, config.beta_start, config.beta_end,
                                          config.beta_schedule, config.trained_betas, config.rescale_betas_zero_snr)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = schedules.alphas_cumprod_from_betas(self.betas)
        self._reset_engine()

    def _reset_engine(self) -> None:
        """Forget tables, counter and history (set_timesteps builds them again)."""
        self.num_inference_steps: Optional[int] = None
        self._tables: dict[Any, torch.Tensor] = {}  # (options, device) -> step table on that device
        self._table_config = None  # the config object the tables were built from
        self._counter: Optional[torch.Tensor] = None
        self._history: Optional[torch.Tensor] = None
        self._step_index: Optional[int] = None
        self._begin_index: Optional[int] = None
        self._index_pending = True  # counter samplers: the first step still has to find its index
        self._checked: set = set()
        self._device_cache: dict = {}
        self._index_views: dict = {}  # (host timestep, device) -> its index view (valid for one schedule)
        self._plan_of: tuple = (None, None)  # (config object, StepPlan derived from it)

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample  # DDPM / DDIM inputs need no scaling (init_noise_sigma = 1)

    # ---- tables -------------------------------------------------------------------------------
    def _build_table(self, **options) -> torch.Tensor:
        """The float32 step table for the current schedule and these step options (subclasses)."""
        raise NotImplementedError

    def _table(self, device: torch.device, **options) -> torch.Tensor:
        """The step table for `options` on `device`: built once per schedule and options, copied once per device.

        A pipeline may replace the config (diffusers' `_internal_dict`) after set_timesteps: tables
        built from another config object are rebuilt.
        """
        if self.config is not self._table_config:
            self._tables, self._table_config = {}, self.config
        key = (tuple(options.items()), device)  # callers pass options in a fixed order
        table = self._tables.get(key)
        if table is None:
            host = self._tables.get((key[0], None))
            if host is None:
                host = self._tables[(key[0], None)] = self._remembered_table(key[0], options)
            table = self._tables[key] = upload(host, device)
        return table

    _REMEMBERED_TABLES = 4

    def _remembered_table(self, options_key: tuple, options: dict) -> torch.Tensor:
        """The host table of the current config, schedule and options: built, or the one built the last time
        set_timesteps gave this schedule (a sampling loop calls set_timesteps every run; the multistep
        solvers take tens of milliseconds to build theirs)."""
        sigmas = getattr(self, "sigmas", None)
        schedule = (getattr(self, "_timesteps_host", np.empty(0)).tobytes(),
                    sigmas.numpy().tobytes() if isinstance(sigmas, torch.Tensor) and sigmas.is_cpu else None)
        memory = self.__dict__.setdefault("_table_memory", [])
        for config, remembered_schedule, remembered_options, table in memory:
            if config is self.config and remembered_schedule == schedule and remembered_options == options_key:
                return table
        table = self._build_table(**options)
        memory.insert(0, (self.config, schedule, options_key, table))
        del memory[self._REMEMBERED_TABLES:]
        return table

    # ---- row index ------------------------------------------------------------------------------
    def _on(self, device: torch.device, name: str, make):
        """A small per-device constant (cached; traced by torch.compile it is a graph constant instead)."""
        if torch.compiler.is_compiling():
            return make(device)
        value = self._device_cache.get((name, device))
        if value is None:
            value = self._device_cache[(name, device)] = make(device)
        return value

    def _timestep_index(self, timestep, device: torch.device) -> tuple[torch.Tensor, Optional[int]]:
        """(row index, host timestep or None) of a timestep-keyed table: t itself, as an int64 [1] tensor on
        `device`, no sync.

        A host timestep (an int, or a CPU tensor outside torch.compile) is checked against the
        schedule once and served as a cached view of a device arange; a device timestep is used as
        it is (out of range: the kernel reads the NaN row).
        """
        if isinstance(timestep, torch.Tensor):
            if timestep.numel() != 1:
                raise ValueError(f"timestep must be a single value, got a tensor of shape {tuple(timestep.shape)}")
            if not timestep.is_cpu or torch.compiler.is_compiling():
                return timestep.reshape(1).to(device=device, dtype=torch.int64), None
        elif isinstance(timestep, bool) or not isinstance(timestep, (int, np.integer)):
            raise TypeError(f"timestep must be an int or a 1-element tensor, got {type(timestep).__name__}")
        t = int(timestep)
        view = self._index_views.get((t, device))
        if view is None:
            self._check_host_timestep(t)
            arange = self._on(device, "arange", lambda d: torch.arange(self.config.num_train_timesteps + 1, device=d))
            view = self._index_views[(t, device)] = arange[t:t + 1]  # a view: no kernel
        return view, t

    def _check_host_timestep(self, t: int) -> None:
        raise NotImplementedError

    @property
    def step_index(self) -> Optional[int]:
        """The index of the next step (diffusers' `step_index`): None before the first step."""
        if self._step_index is None and not self._index_pending and self._counter is not None:
            self._step_index = int(self._counter)  # found on the device: one read, when asked
        return self._step_index

    @property
    def begin_index(self) -> Optional[int]:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """The index of the first step (pipelines call this before the loop, as in diffusers)."""
        if isinstance(begin_index, bool) or not isinstance(begin_index, (int, np.integer)) or begin_index < 0:
            raise ValueError(f"begin_index must be an int >= 0, got {begin_index!r}")
        self._begin_index = int(begin_index)
        if self._counter is not None:
            self._counter.fill_(self._begin_index)
            self._index_pending, self._step_index = False, self._begin_index

    def _install_schedule(self, timesteps: torch.Tensor, device, **table_options) -> None:
        """set_timesteps' common end, once the sampler has set its schedule (sigmas, ...): the host copy of the
        timesteps (never read back from the device), the device copy (uploaded without a sync), a fresh
        engine, and the table of the default step options built now (a step only looks it up)."""
        self._timesteps_host = timesteps.numpy()
        self.timesteps = upload(timesteps, device)
        self._new_schedule(device)
        self._table(torch.device(device) if device is not None else torch.device("cpu"), **table_options)

    def _new_schedule(self, device) -> None:
        """Forget the last schedule's tables, index views and device constants; counter samplers get a fresh
        counter on `device` and no history yet (built at the next first step)."""
        self._tables, self._table_config, self._index_views, self._device_cache = {}, None, {}, {}
        if not self.keyed_by_timestep:
            self._start_counter(device)

    def _start_counter(self, device) -> None:
        self._counter = torch.zeros(1, dtype=torch.int64, device=device)
        self._history = None
        self._step_index, self._begin_index, self._index_pending = None, None, True

    def _counter_index(self, timestep, device: torch.device) -> torch.Tensor:
        """The device step counter, found on the first step from begin_index or the timestep (diffusers'
        `_init_step_index`: the second match when a timestep repeats, for img2img)."""
        if self._counter is None:
            raise ValueError("num_inference_steps is None: call set_timesteps(num_inference_steps) before step()")
        if self._counter.device != device:
            raise ValueError(f"the sampler's state is on {self._counter.device} but the sample is on {device}: "
                             f"call set_timesteps(..., device={str(device)!r})")
        if self._index_pending:
            if isinstance(timestep, torch.Tensor) and not timestep.is_cpu:
                self._counter.copy_(self._device_index_for_timestep(timestep))
                self._step_index = None  # known on the device only
            else:
                self._step_index = self._host_index_for_timestep(timestep)  # raises for an unknown timestep
                self._counter.fill_(self._step_index)
            self._index_pending = False
        steps = len(self._timesteps_host)  # (len of a tensor costs microseconds)
        if self._step_index is not None and self._step_index >= steps and not torch.compiler.is_compiling():
            raise IndexError(f"step index {self._step_index} is past the end of the schedule ({steps} steps): "
                             "call set_timesteps to start a new loop")  # diffusers: an IndexError too
        return self._counter

    def _host_index_for_timestep(self, timestep) -> int:
        t = timestep.item() if isinstance(timestep, torch.Tensor) else timestep
        index = int(self._schedule_indices(torch.tensor([t]), missing=-1)[0])
        if index < 0:
            raise ValueError(f"timestep {t!r} is not in the schedule set by set_timesteps")
        return index

    def _device_index_for_timestep(self, timestep: torch.Tensor) -> torch.Tensor:
        """Index of a device timestep in the device schedule, without a sync (no match: past the end, a NaN row)."""
        return self._schedule_indices(timestep.reshape(1), missing=len(self.timesteps))

    def _schedule_indices(self, timesteps: torch.Tensor, missing: int) -> torch.Tensor:
        """[N] int64: where each of `timesteps` stands in self.timesteps, as diffusers' index_for_timestep
        picks it (the second match when a timestep repeats: img2img starting mid-schedule on Karras
        sigmas), `missing` where it is not there. On the timesteps' device, no sync; a host schedule is
        used for CPU timesteps."""
        schedule = torch.from_numpy(self._timesteps_host) if timesteps.is_cpu else self.timesteps
        schedule = schedule.to(timesteps.device)
        matches = schedule[None, :] == timesteps.reshape(-1, 1).to(schedule.dtype)
        rank = torch.cumsum(matches.to(torch.int64), 1)
        hit = matches & (rank == torch.where(rank[:, -1:] > 1, 2, 1))
        return torch.where(hit.any(1), hit.to(torch.int64).argmax(1), missing)

    def _restart(self) -> None:
        """Rewind to the first step in place (a captured CUDA graph keeps reading the same tensors)."""
        if self._counter is not None:
            self._counter.fill_(self._begin_index or 0)
            self._index_pending, self._step_index = self._begin_index is None, self._begin_index
        if self._history is not None:
            self._history.zero_()

    def _engine_state(self) -> tuple:
        """The objects a captured step reads: tables, counter, history, timesteps."""
        return (self._tables, self._counter, self._history, self.timesteps)

    def _advance_host_index(self) -> None:
        if self._step_index is not None and not torch.compiler.is_compiling():
            self._step_index += 1

    # ---- history ----------------------------------------------------------------------------
    history_slots = 0  # slots of the history buffer (0: the sampler keeps none)
    history_reads = 0  # how many of a row's READ_SLOT columns the step reads
    writes_history = False
    writes_out2 = False

    def _history_for(self, sample: torch.Tensor) -> torch.Tensor:
        """The history buffer [slots, *sample.shape], allocated (zeros) on the first step after set_timesteps."""
        if self.history_slots == 0:
            return ops.empty_of(sample)
        history = self._history
        if history is None:
            history = self._history = sample.new_zeros((self.history_slots, *sample.shape))  # contiguous
        elif history.shape[1:] != sample.shape or history.dtype != sample.dtype or history.device != sample.device:
            raise ValueError(f"sample has shape {tuple(sample.shape)} ({sample.dtype}, {sample.device}) but this "
                             f"loop's history holds {tuple(history.shape[1:])} ({history.dtype}, {history.device}): "
                             "a multistep sampler's samples keep one shape per loop; call set_timesteps to start a new one")
        return history

    # ---- inputs -----------------------------------------------------------------------------
    def _check_step_inputs(self, model_output, sample, guidance_scale, variance_channels: bool = False,
                           guidance_extra=None) -> None:
        """Shapes, dtypes and devices of a step's tensors; checked once per call signature."""
        compiling = torch.compiler.is_compiling()  # traced checks cost nothing per step; a cache would add guards
        try:
            key = None if compiling else (
                model_output.shape, model_output.dtype, model_output.device, sample.shape, sample.dtype,
                sample.device, guidance_scale is None, variance_channels,
                None if guidance_extra is None else (guidance_extra.shape, guidance_extra.device))
        except AttributeError:  # not tensors: the checks below say what is wrong
            key = None
        if key is not None and key in self._checked:
            return
        for name, x in (("model_output", model_output), ("sample", sample)):
            if not isinstance(x, torch.Tensor) or not x.is_floating_point():
                raise TypeError(f"{name} must be a floating-point tensor, got {type(x).__name__}"
                                + (f" of dtype {x.dtype}" if isinstance(x, torch.Tensor) else ""))
        if model_output.device != sample.device:
            raise ValueError(f"model_output is on {model_output.device} but sample is on {sample.device}; "
                             "they must be on the same device")
        batch = sample.shape[0] * (2 if guidance_scale is not None else 1)
        channels = (sample.shape[1], 2 * sample.shape[1]) if variance_channels and sample.ndim > 1 \
            else (sample.shape[1:2] or (None,))
        ok = (model_output.ndim == sample.ndim and model_output.shape[0] == batch
              and (sample.ndim < 2 or model_output.shape[1] in channels) and model_output.shape[2:] == sample.shape[2:])
        if ok and self._plan().variance_mode != T.VAR_FIXED and model_output.shape[1:2] != (2 * sample.shape[1],):
            raise ValueError(f"variance_type={self.config.get('variance_type')!r} needs model_output with "
                             f"2 x {sample.shape[1]} channels ([prediction; variance]), got {model_output.shape[1]}")
        if not ok:
            want = f"[{batch}, {' or '.join(map(str, channels))}, {', '.join(map(str, sample.shape[2:]))}]"
            cfg = " ([uncond; cond] batch for guidance_scale)" if guidance_scale is not None else ""
            raise ValueError(f"model_output has shape {tuple(model_output.shape)} but a sample of shape "
                             f"{tuple(sample.shape)} needs {want}{cfg}")
        if guidance_extra is not None:
            if guidance_scale is None:
                raise ValueError("skip_layer_output needs guidance_scale: skip-layer guidance is applied after the fused "
                                 "CFG (model_output = [uncond; cond])")
            want = (sample.shape[0], *model_output.shape[1:])
            if tuple(guidance_extra.shape) != want or guidance_extra.device != sample.device:
                raise ValueError(f"guidance_extra must have shape {want} on {sample.device} (the conditional half of "
                                 f"model_output), got {tuple(guidance_extra.shape)} on {guidance_extra.device}")
        if key is not None:
            self._checked.add(key)

    @staticmethod
    def _skip_layer_guidance(skip_layer_output, skip_layer_guidance_scale) -> tuple[Optional[torch.Tensor], float]:
        """SD3's skip-layer guidance (guided = cfg + s (cond - skip), after CFG) as the engine's extra guidance
        term: (guidance_extra, extra_scale)."""
        if isinstance(skip_layer_guidance_scale, bool) or not isinstance(skip_layer_guidance_scale, (int, float)):
            raise TypeError(f"skip_layer_guidance_scale must be a float, got {skip_layer_guidance_scale!r}")
        if skip_layer_output is None:
            if skip_layer_guidance_scale:
                raise ValueError("skip_layer_guidance_scale needs skip_layer_output (the skip-layer prediction)")
            return None, 0.0
        return skip_layer_output, float(skip_layer_guidance_scale)

    def _noise(self, sample, model_output, generator, variance_noise, seed, needs_noise: bool):
        """(noise tensor or None, seed or None) for the fused op, per DESIGN "Noise"."""
        if generator is not None and (variance_noise is not None or seed is not None) or (
                variance_noise is not None and seed is not None):
            given = [n for n, v in (("generator", generator), ("variance_noise", variance_noise), ("seed", seed))
                     if v is not None]
            raise ValueError(f"pass at most one of generator, variance_noise and seed; got {' and '.join(given)}")
        if variance_noise is not None:
            if variance_noise.shape != sample.shape or variance_noise.device != sample.device:
                raise ValueError(f"variance_noise must match sample ({tuple(sample.shape)} on {sample.device}), "
                                 f"got {tuple(variance_noise.shape)} on {variance_noise.device}")
            return variance_noise, None
        if not needs_noise:
            return None, None
        if generator is not None:
            return randn_like_diffusers(sample.shape, generator, sample.device, model_output.dtype), None
        return None, N.check_seed(seed) if seed is not None else N.draw_seed()

    def _threshold(self, model_output, sample, table, index, guidance_scale, guidance_extra=None,
                   extra_scale=0.0) -> torch.Tensor:
        """Per-sample s of dynamic thresholding, from x0 of the row (a reduction before the fused step)."""
        dt = R.compute_dtype(sample)
        row = T.gather_row(table, index).to(dt)
        m, _ = R.guide(model_output, sample, guidance_scale, guidance_extra, extra_scale, dt)
        x0 = (row[T.X0_X] * sample.to(dt) + row[T.X0_M] * m) * row[T.X0_SCALE]
        return R.dynamic_threshold(x0, self.config.dynamic_thresholding_ratio, self.config.sample_max_value)

    def _plan(self) -> "StepPlan":
        """What a step derives from the config, computed once per config object (a pipeline may swap it)."""
        if torch.compiler.is_compiling():  # traced, the plan is a constant; reading a cache would add guards
            return self._make_plan(self.config)
        config, plan = self._plan_of
        if config is not self.config:
            config, plan = self.config, self._make_plan(self.config)
            self._plan_of = (config, plan)
        return plan

    def _make_plan(self, config) -> "StepPlan":
        thresholding = bool(config.get("thresholding", False))
        clip = float(config.clip_sample_range) if config.get("clip_sample", False) and not thresholding else None
        return StepPlan(clip, thresholding, self.variance_mode)

    # ---- the fused step ---------------------------------------------------------------------
    variance_mode = T.VAR_FIXED  # how the step's noise std is formed (fastdiff.tables)

    def _run_step(self, model_output: torch.Tensor, sample: torch.Tensor, table: torch.Tensor, index: torch.Tensor, *,
                  noise: Optional[torch.Tensor], seed: Optional[int], sample_offset: int,
                  guidance_scale: Optional[float], guidance_extra: Optional[torch.Tensor] = None,
                  extra_scale: float = 0.0, advance: bool, out: Optional[torch.Tensor] = None,
                  return_dict: bool = True):
        """One generic fused step on `table` row `index`; returns diffusers' output (or tuple).

        Every sampler's `step` takes `out=`: prev_sample is written into that buffer (it may be
        `sample` itself: an in-place step) and pred_original_sample is not computed (the loop's
        fast path, fastdiff.sample).
        """
        if isinstance(sample_offset, bool) or not isinstance(sample_offset, (int, np.integer)) or sample_offset < 0:
            raise ValueError(f"sample_offset must be an int >= 0, got {sample_offset!r}")
        if out is not None and (not isinstance(out, torch.Tensor) or out.shape != sample.shape
                                or out.dtype != sample.dtype or out.device != sample.device):
            raise ValueError(f"out must be a tensor like sample ({tuple(sample.shape)}, {sample.dtype}, "
                             f"{sample.device}), got " + (f"{tuple(out.shape)}, {out.dtype}, {out.device}"
                                                          if isinstance(out, torch.Tensor) else type(out).__name__))
        plan = self._plan()
        threshold = self._threshold(model_output, sample, table, index, guidance_scale, guidance_extra,
                                    extra_scale) if plan.thresholding else None
        write_x0 = self.returns_x0 and out is None
        prev, x0 = ops.run_step(model_output, sample, table, index, self._history_for(sample), noise, seed,
                                int(sample_offset), guidance_scale, guidance_extra, float(extra_scale),
                                plan.variance_mode, plan.clip_range, threshold, self.history_reads,
                                self.writes_history, self.writes_out2, advance, write_x0, out=out)
        if advance:
            self._advance_host_index()
        x0 = x0 if write_x0 else None
        if not return_dict:
            return (prev, x0) if self.returns_x0 else (prev,)
        return SamplerOutput(prev_sample=prev, pred_original_sample=x0)

    # ---- training-side helpers --------------------------------------------------------------
    def _q_sample_table(self, device: torch.device, target: str) -> torch.Tensor:
        """[T + 1, Q_WIDTH] rows: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) n (DDPM eq. 4, float32 as diffusers
        computes add_noise) and `target` = p x0 + q n for `target` in epsilon / sample / v_prediction."""
        def make(d):
            abar = self.alphas_cumprod.to(torch.float32)
            a, b = abar ** 0.5, (1 - abar) ** 0.5
            p, q = {"epsilon": (0 * a, 1 + 0 * a), "sample": (1 + 0 * a, 0 * a),
                    "v_prediction": (-b, a)}[target]  # v = sqrt(abar) n - sqrt(1 - abar) x0 (Salimans & Ho 2022)
            return upload(T.q_sample_table(a, b, p, q), d)
        return self._on(device, ("q_sample", target, id(self.alphas_cumprod)), make)

    def training_table(self, device: torch.device) -> torch.Tensor:
        """The q-sample table of training: x_t and this sampler's regression target, per timestep."""
        return self._q_sample_table(device, self.config.prediction_type)

    def training_timesteps(self, timesteps, like: torch.Tensor) -> torch.Tensor:
        """[batch] int64 training timesteps on like's device (host values checked; device ones unchecked:
        out of range reads the NaN row)."""
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
        return t.to(device=like.device, dtype=torch.int64).expand(like.shape[0]).contiguous()

class TrainingTimestepNoising:
    """add_noise / get_velocity at training timesteps, as DDPM and DDIM have them (the sigma samplers'
    diffusers twins noise at the inference schedule's sigmas instead: their own add_noise)."""

    def _q_sample(self: BaseSampler, x0: torch.Tensor, noise: torch.Tensor, timesteps, names: str, target: str) -> torch.Tensor:
        if noise.shape != x0.shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)} but {names} has shape {tuple(x0.shape)}")
        x_t, velocity, _ = ops.run_q_sample(x0, self._q_sample_table(x0.device, target),
                                            self.training_timesteps(timesteps, x0), noise.to(x0.device), 0, 0,
                                            target == "v_prediction", False)
        return velocity if target == "v_prediction" else x_t

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise (DDPM eq. 4), per-sample timesteps."""
        return self._q_sample(original_samples, noise, timesteps, "original_samples", "epsilon")

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """v = sqrt(abar_t) noise - sqrt(1 - abar_t) sample (Salimans & Ho 2022, sec. 4)."""
        return self._q_sample(sample, noise, timesteps, "sample", "v_prediction")


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
