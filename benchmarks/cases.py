"""The op cases every benchmark runs: the generic step (four kinds of row), q_sample and cfg_combine.

A case = one op variant at one shape and dtype on one device. It builds its inputs, knows how many
bytes a fused kernel must move, makes each provider's zero-argument call (on any input set: sets
are rotated past the L2 on a GPU), and checks a provider's output against `fastdiff.reference`
before anything is timed. The pytest suites (benchmarks/test_ops.py) and `make gpu-check`
(benchmarks/gpu_check.py) both use these.

Variants (rows from the samplers' own tables, so they are the rows a real loop reads):
- step/ddpm       DDPMScheduler defaults (epsilon, fixed_small, clip 1.0), t = 500 of 1000, noise
- step/ddim       DDIMScheduler defaults, 50 steps, eta = 0, t = 500 (no noise)
- step/cfg+ddpm   the DDPM row with classifier-free guidance 7.5 fused ([uncond; cond] batch)
- step/multistep  a DPM-Solver++(2M) row (t = 500 -> 480, r = 1): reads one history slot (the
                  previous x0) and writes x0 into another
- step/unipc      a row of Wan 2.x's sampler (UniPCMultistepSampler, flow prediction, flow_shift 3.0,
                  order 2, 50 steps, step 25): corrector + predictor in one row, reads three history slots
                  (the last corrected sample, two model outputs), writes the new corrected sample and x0
- q_sample        training noising with per-sample t: x_t and the epsilon target, in-kernel noise
- cfg             u + w (c - u)
Bytes moved = each input read once + each output written once (in-kernel noise is not counted).

Providers: `eager` (the reference math in plain torch ops, noise from torch.randn: what one writes
by hand), `compile` (torch.compile of that function; noise drawn by torch.randn outside it, so its
output can be checked), `diffusers` (the scheduler's own step / add_noise / the pipelines' CFG
line, fp32 only: diffusers computes in the model's dtype), and fastdiff's fused backends through
the eager fast path (`fastdiff.ops.run_step(..., out=)`, `run_q_sample`, the backend's
`cfg_combine`) with in-kernel Philox noise: `triton`, `cpp_cuda`, `cpp_cpu`.
"""
from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from fastdiff import backends
from fastdiff import noise as N
from fastdiff import ops
from fastdiff import reference as R
from fastdiff import tables as T
from fastdiff.eager import history_slots

# ---- sizes, dtypes, providers ----------------------------------------------------------------------
SIZES: dict[str, tuple[int, ...]] = {
    "sd-latent": (1, 4, 64, 64),  # one Stable Diffusion 1.x latent, 16K elements
    "sdxl-latent": (1, 4, 128, 128),  # one SDXL latent, 64K
    "batch16-sdxl": (16, 4, 128, 128),  # a batch of SDXL latents, 1M
    "video": (1, 16, 16, 256, 256),  # a video latent (B, C, frames, H, W), 16.8M
    "wan-latent": (1, 16, 21, 60, 104),  # a Wan 2.x 480p video latent (81 frames), 2.1M
}
GPU_SIZES = ("sd-latent", "batch16-sdxl", "wan-latent", "video")  # 16K, 1M, 2M, 16M elements
QUICK_SIZES = ("sd-latent",)
SIZE_CLASS = {"sd-latent": "latent (16K)", "sdxl-latent": "latent (64K)", "batch16-sdxl": "1M", "wan-latent": "2M",
              "video": "16M"}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

PROVIDERS = ("eager", "diffusers", "compile", "reference", "triton", "cpp_cuda", "cpp_cpu")
PROVIDER_LABELS = {
    "eager": "eager reference", "diffusers": "diffusers", "compile": "torch.compile(reference)",
    "reference": "fastdiff reference backend", "triton": "fastdiff Triton", "cpp_cuda": "fastdiff C++ CUDA",
    "cpp_cpu": "fastdiff C++ CPU",
}
# provider -> FASTDIFF_BACKEND of the fastdiff providers (called through the eager fast path)
FUSED = {"reference": "reference", "triton": "triton", "cpp_cuda": "cpp", "cpp_cpu": "cpp"}
FUSED_DEVICE = {"triton": "cuda", "cpp_cuda": "cuda", "cpp_cpu": "cpu"}  # the reference backend runs anywhere

SEED = 1234  # torch RNG seed (eager / compile / diffusers noise) and Philox seed (fastdiff)
GUIDANCE = 7.5
NUM_TRAIN_TIMESTEPS = 1000
STEP_T = 500
DDIM_STEPS = 50


@dataclass(frozen=True)
class OpSpec:
    name: str
    op: str  # the fastdiff op: step, q_sample, cfg_combine
    reads: int  # inputs read, in units of numel(sample) x element size
    writes: int
    bytes_note: str
    diffusers: Optional[str]  # what the diffusers provider runs (None: why it has none is `no_diffusers`)
    no_diffusers: str = ""


SPECS = {s.name: s for s in (
    OpSpec("step/ddpm", "step", 2, 1, "read eps, x_t; write x_{t-1}: 3 x numel", "DDPMScheduler.step"),
    OpSpec("step/ddim", "step", 2, 1, "read eps, x_t; write x_{t-1}: 3 x numel", "DDIMScheduler.step"),
    OpSpec("step/cfg+ddpm", "step", 3, 1, "read [uncond; cond] (2 x numel), x_t; write x_{t-1}: 4 x numel",
           "the pipelines' CFG line + DDPMScheduler.step"),
    OpSpec("step/multistep", "step", 3, 2, "read eps, x_t, h_1; write x_{t-1}, history: 5 x numel", None,
           "a hand-built DPM-Solver++(2M) row has no one-call diffusers twin"),
    OpSpec("step/unipc", "step", 5, 3, "read m, x_t, h_1..h_3; write x_{t+1}, corrected x, x0: 8 x numel", None,
           "diffusers' UniPC step reads host state (a whole loop is compared in the e2e and parity tests)"),
    OpSpec("q_sample", "q_sample", 1, 2, "read x0; write x_t, target (the noise): 3 x numel",
           "DDPMScheduler.add_noise (+ torch.randn)"),
    OpSpec("cfg", "cfg_combine", 2, 1, "read uncond, cond; write guided: 3 x numel", "the pipelines' CFG line"),
)}
OP_ORDER = tuple(SPECS)


def element_size(dtype: str) -> int:
    return torch.empty((), dtype=DTYPES[dtype]).element_size()


def bytes_moved(spec: OpSpec, shape: tuple[int, ...], dtype: str) -> int:
    return (spec.reads + spec.writes) * math.prod(shape) * element_size(dtype)


def skip_reason(provider: str, device: str, spec: Optional[OpSpec] = None, dtype: str = "fp32") -> Optional[str]:
    """None when `provider` can run this case here, else why not (every skip is reported with it)."""
    if provider in FUSED:
        if FUSED_DEVICE.get(provider, device) != device:
            if provider == "triton":
                return "Triton runs CPU tensors only in the interpreter, which is not a performance path"
            return f"{PROVIDER_LABELS[provider]} runs on {FUSED_DEVICE[provider]}; this run measures {device}"
        name = FUSED[provider]
        reason = backends.unavailable_reason(name, device, DTYPES[dtype])
        if reason is None and spec is not None:
            reason = engine_signature_reason(name, spec.op)
        return reason
    if provider == "compile" and device == "cpu" and shutil.which(os.environ.get("CXX", "g++")) is None:
        return "torch.compile on CPU needs a C++ compiler (none found)"
    if provider == "diffusers":
        if spec is not None and spec.diffusers is None:
            return spec.no_diffusers
        if dtype != "fp32":
            return "diffusers computes in the model's dtype: compared in fp32 only"
        try:
            import diffusers  # noqa: F401
        except ImportError as error:
            return f"diffusers is not installed ({error})"
    return None


def engine_signature_reason(backend: str, op: str) -> Optional[str]:
    """None when backend `backend` implements `op` with the engine's signature (fastdiff/ops.py, the
    reference backend's parameter names), else why not (not written yet, or an older signature)."""
    import inspect
    module = backends.load(backend)
    fn = getattr(module, op, None)
    if fn is None:
        return f"the {backend} backend does not implement {op} yet"
    want = list(inspect.signature(getattr(backends.load("reference"), op)).parameters)
    try:
        have = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):  # a builtin without a signature: trust it
        return None
    if have != want:
        return (f"the {backend} backend's {op}({', '.join(have)}) is not the engine signature "
                f"{op}({', '.join(want)}) yet")
    return None


def forced(provider: str):
    """FASTDIFF_BACKEND set for a fused provider (the eager fast path then runs that backend)."""
    return backends.forced(FUSED.get(provider))


def randn(shape, dtype: torch.dtype, device: str, seed: int) -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(dtype)


def torch_noise(shape, dtype: torch.dtype, device: str) -> torch.Tensor:
    """The noise a torch-RNG provider drew first after `torch.manual_seed(SEED)`."""
    torch.manual_seed(SEED)
    return torch.randn(shape, device=device, dtype=dtype)


# ---- correctness -------------------------------------------------------------------------------------
def assert_matches(actual: torch.Tensor, expected32: torch.Tensor, expected_lowp: Optional[torch.Tensor],
                   what: str) -> None:
    """fp32: atol = rtol = 1e-5 vs the reference. fp16/bf16 (DESIGN): error vs the fp32 reference at
    most 2x the error of the reference computed in that dtype, plus 1e-3, plus one rounding of the value
    to that dtype: an output the reference copies exactly (q_sample's noise target) is a float32 normal
    that the GPU kernels make within a few float32 ulp (approximate sqrt, FMA contraction), and a value
    that close to a rounding boundary lands one bf16 ulp away (seen on an H200: 0.0078 at |noise| in [1, 2))."""
    assert actual.shape == expected32.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected32.shape)}"
    if actual.dtype in (torch.float32, torch.float64):
        torch.testing.assert_close(actual.float(), expected32.float(), atol=1e-5, rtol=1e-5,
                                   msg=lambda m: f"{what}: {m}")
        return
    diff = (actual.float() - expected32.float()).abs()
    one_rounding = torch.finfo(actual.dtype).eps * expected32.float().abs()  # >= one ulp of the value
    err = (diff - one_rounding).max().item()
    bound = 2 * (expected_lowp.float() - expected32.float()).abs().max().item() + 1e-3
    assert err <= bound, (f"{what}: max error {diff.max().item():.3g} vs the fp32 reference exceeds {bound:.3g} "
                          f"plus one {actual.dtype} rounding of the value")


def _upcast(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t


# ---- rows ------------------------------------------------------------------------------------------
def _alphas_cumprod() -> torch.Tensor:
    from fastdiff import DDPMSampler
    return DDPMSampler().alphas_cumprod  # diffusers' float32 table (linear betas)


def multistep_table() -> torch.Tensor:
    """One DPM-Solver++(2M) row (Lu et al. 2022, Alg. 2 with r = 1) from t = 500 to s = 480, data
    prediction from eps: x_s = (sigma_s / sigma_t) x - alpha_s (e^-h - 1) (1.5 x0 - 0.5 x0_prev).
    Reads slot 0 (x0_prev), writes x0 into slot 1."""
    abar = _alphas_cumprod().double()
    a_t, s_t = abar[STEP_T].sqrt(), (1 - abar[STEP_T]).sqrt()
    a_s, s_s = abar[STEP_T - 20].sqrt(), (1 - abar[STEP_T - 20]).sqrt()
    h = torch.log(a_s / s_s) - torch.log(a_t / s_t)
    phi = torch.expm1(-h)
    return T.step_table(1, dtype=torch.float64, x0_x=1.0, x0_m=-s_t, x0_scale=1 / a_t, out_x=s_s / s_t,
                        out_x0=-a_s * phi * 1.5, out_h1=a_s * phi * 0.5, read_slot1=0.0, hist_slot=1.0, hist_x0=1.0,
                        noise_counter=float(STEP_T))


@dataclass
class StepOptions:
    guidance_scale: Optional[float] = None
    clip_range: Optional[float] = None
    history_reads: int = 0
    write_history: bool = False
    write_out2: bool = False
    noise: bool = False


def unipc_setup(device: str) -> tuple[torch.Tensor, torch.Tensor, StepOptions, int]:
    """Wan 2.x's sampler at step 25 of 50 (a steady-state row: order 2, corrector on)."""
    from fastdiff import UniPCMultistepSampler
    sampler = UniPCMultistepSampler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                                    solver_order=2)
    sampler.set_timesteps(DDIM_STEPS)
    table = sampler._table(torch.device(device))[-1]  # the stage of every step after the warm-up
    options = StepOptions(history_reads=sampler.history_reads, write_history=True, write_out2=True)
    return table, torch.tensor([DDIM_STEPS // 2], device=device), options, sampler.history_slots


def step_setup(name: str, device: str) -> tuple[torch.Tensor, torch.Tensor, StepOptions, int]:
    """(table on device, int64 [1] index on device, options, history slots) of a step variant."""
    from fastdiff import DDIMSampler, DDPMSampler
    dev = torch.device(device)
    if name in ("step/ddpm", "step/cfg+ddpm"):
        table = DDPMSampler()._table(dev)
        guidance = GUIDANCE if name == "step/cfg+ddpm" else None
        return table, torch.tensor([STEP_T], device=device), StepOptions(guidance, 1.0, noise=True), 0
    if name == "step/ddim":
        sampler = DDIMSampler()
        sampler.set_timesteps(DDIM_STEPS)
        table = sampler._table(dev, eta=0.0, use_clipped_model_output=False)
        return table, torch.tensor([STEP_T], device=device), StepOptions(None, 1.0), 0
    if name == "step/multistep":
        return multistep_table().to(device), torch.tensor([0], device=device), \
            StepOptions(history_reads=1, write_history=True), 2
    if name == "step/unipc":
        return unipc_setup(device)
    raise ValueError(f"unknown step variant {name!r}")


# ---- a case -----------------------------------------------------------------------------------------
@dataclass
class InputSet:
    """The tensors one call reads and writes (one per rotation slot)."""
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.tensors[key]


class OpCase:
    """One op variant at one size and dtype on one device (see the module docstring)."""

    def __init__(self, name: str, size: str, dtype: str, device: str, shape: Optional[tuple[int, ...]] = None):
        self.spec = SPECS[name]
        self.name, self.size, self.dtype_name, self.device = name, size, dtype, device
        self.dtype = DTYPES[dtype]
        self.shape = tuple(shape or SIZES[size])
        self.numel = math.prod(self.shape)
        self.bytes_moved = bytes_moved(self.spec, self.shape, dtype)
        self.bytes_per_set = self.bytes_moved  # what one call streams through memory
        self.options = StepOptions()
        self.history_slots = 0
        if self.spec.op == "step":
            self.table, self.index, self.options, self.history_slots = step_setup(name, device)
            self.row = T.gather_row(self.table, self.index)
            # the slots the row writes (hist, then out2), read once here, outside any timing
            self.written_slots = [int(self.row[column]) for column, written in
                                  ((T.HIST_SLOT, self.options.write_history), (T.OUT2_SLOT, self.options.write_out2))
                                  if written]
        elif self.spec.op == "q_sample":
            from fastdiff import DDPMSampler
            self.table = DDPMSampler()._q_sample_table(torch.device(device), "epsilon")
            self.index = torch.linspace(0, NUM_TRAIN_TIMESTEPS - 1, self.shape[0]).long().to(device)
        self.base = self._make_set()
        self._schedulers: dict = {}

    # inputs
    def _make_set(self) -> InputSet:
        shape, dt, dev = self.shape, self.dtype, self.device
        doubled = (2 * shape[0], *shape[1:])
        if self.spec.op == "step":
            model_shape = doubled if self.options.guidance_scale is not None else shape
            tensors = {"model_output": randn(model_shape, dt, dev, 1), "sample": randn(shape, dt, dev, 2),
                       "out": torch.empty(shape, dtype=dt, device=dev)}
            tensors["history"] = randn((self.history_slots, *shape), dt, dev, 3)
        elif self.spec.op == "q_sample":
            tensors = {"x0": randn(shape, dt, dev, 1)}
        else:
            tensors = {"model_output": randn(doubled, dt, dev, 1)}
        return InputSet(tensors)

    def input_sets(self, count: int) -> list[InputSet]:
        """`count` independent sets (the first is the checked one): clones, so every call moves its bytes."""
        sets = [self.base]
        for _ in range(count - 1):
            sets.append(InputSet({k: v.clone() for k, v in self.base.tensors.items()}))
        return sets

    # provider calls: zero-argument functions returning the outputs that are checked
    def call(self, provider: str, inputs: Optional[InputSet] = None) -> Callable[[], tuple]:
        """`provider`'s call on `inputs` (default: the checked set). Compiled functions and diffusers
        schedulers are made once per case and shared by every input set."""
        s = inputs or self.base
        if provider in FUSED:
            return self._fused(s)
        if provider == "eager":
            fn = self._eager_fn()
            return lambda: fn(s, self._torch_randn())
        if provider == "compile":
            fn = self._compiled_fn()
            return lambda: fn(s, self._torch_randn())
        if provider == "diffusers":
            return self._diffusers(s)
        raise ValueError(f"unknown provider {provider!r}")

    def _torch_randn(self) -> Optional[torch.Tensor]:
        if self.spec.op == "cfg_combine" or (self.spec.op == "step" and not self.options.noise):
            return None
        return torch.randn(self.shape, device=self.device, dtype=self.dtype)

    def _fused(self, s: InputSet) -> Callable[[], tuple]:
        o = self.options
        if self.spec.op == "step":
            def run():
                prev, _ = ops.run_step(s["model_output"], s["sample"], self.table, self.index, s["history"], None,
                                       SEED if o.noise else None, 0, o.guidance_scale, None, 0.0, T.VAR_FIXED,
                                       o.clip_range, None, o.history_reads, o.write_history, o.write_out2, False,
                                       False, out=s["out"])
                return (prev, *(s["history"][slot] for slot in self.written_slots))
            return run
        if self.spec.op == "q_sample":
            def run():
                x_t, target, _ = ops.run_q_sample(s["x0"], self.table, self.index, None, SEED, 0, True, False)
                return x_t, target
            return run
        uncond, cond = s["model_output"].chunk(2)
        return lambda: (backends.select("cfg_combine", cond).cfg_combine(uncond, cond, GUIDANCE),)

    def _eager_fn(self) -> Callable:
        """The op in plain torch ops (fastdiff.reference), noise given: what eager and compile run."""
        return self._with_inputs(EAGER[self.spec.op])

    def _compiled_fn(self) -> Callable:
        return self._with_inputs(compiled(self.spec.op))

    def _with_inputs(self, fn: Callable) -> Callable:
        """`fn` (the op's reference signature) called on an input set and the noise."""
        o = self.options
        if self.spec.op == "step":
            return lambda s, noise: fn(s["model_output"], s["sample"], s["history"], self.table, self.index, noise,
                                       o.guidance_scale, o.clip_range, o.history_reads, o.write_history, o.write_out2)
        if self.spec.op == "q_sample":
            return lambda s, noise: fn(s["x0"], self.table, self.index, noise)
        return lambda s, noise: fn(s["model_output"], GUIDANCE)

    def _scheduler(self, name: str, steps: Optional[int] = None):
        if name not in self._schedulers:
            import diffusers
            scheduler = getattr(diffusers, name)()
            if steps is not None:
                scheduler.set_timesteps(steps)
            self._schedulers[name] = scheduler
        return self._schedulers[name]

    def _diffusers(self, s: InputSet) -> Callable[[], tuple]:
        if self.name in ("step/ddpm", "step/cfg+ddpm"):
            scheduler = self._scheduler("DDPMScheduler")  # clip_sample=True, fixed_small, epsilon: the fastdiff row
            m, x = s["model_output"], s["sample"]
            if self.name == "step/ddpm":
                return lambda: (scheduler.step(m, STEP_T, x).prev_sample,)

            def pipeline_step():
                uncond, cond = m.chunk(2)
                return (scheduler.step(uncond + GUIDANCE * (cond - uncond), STEP_T, x).prev_sample,)
            return pipeline_step
        if self.name == "step/ddim":
            scheduler = self._scheduler("DDIMScheduler", DDIM_STEPS)
            return lambda: (scheduler.step(s["model_output"], STEP_T, s["sample"]).prev_sample,)
        if self.name == "q_sample":
            scheduler = self._scheduler("DDPMScheduler")

            def add_noise():
                noise = torch.randn(self.shape, device=self.device, dtype=self.dtype)
                return scheduler.add_noise(s["x0"], noise, self.index), noise
            return add_noise
        if self.name == "cfg":
            uncond, cond = s["model_output"].chunk(2)
            return lambda: (uncond + GUIDANCE * (cond - uncond),)  # diffusers' pipelines, in the model's dtype
        raise ValueError(f"{self.name} has no diffusers provider: {self.spec.no_diffusers}")

    # correctness
    def provider_noise(self, provider: str) -> Optional[torch.Tensor]:
        """The noise `provider`'s checked call drew (rebuilt), or None for a case without noise."""
        if self.spec.op == "cfg_combine" or (self.spec.op == "step" and not self.options.noise):
            return None
        if provider in FUSED:
            if self.spec.op == "q_sample":  # the backends round q_sample noise to x0's dtype
                return N.randn(self.shape, SEED, counter=0, stream=N.STREAM_Q_SAMPLE, device=self.device,
                               dtype=self.dtype)
            counter = int(self.row[T.NOISE_COUNTER])
            return N.randn(self.shape, SEED, counter=counter, stream=N.STREAM_STEP, device=self.device)
        return torch_noise(self.shape, self.dtype, self.device)

    def reference(self, noise: Optional[torch.Tensor], upcast: bool) -> tuple:
        fn = self._eager_fn()
        s = self.base
        if upcast:
            s = InputSet({k: _upcast(v) for k, v in s.tensors.items()})
            noise = _upcast(noise)
        with torch.no_grad():
            return tuple(fn(s, noise))

    def check(self, provider: str, call: Optional[Callable[[], tuple]] = None) -> None:
        """Run the provider once (torch RNG seeded) and compare every output with the reference."""
        call = call or self.call(provider)
        torch.manual_seed(SEED)
        with torch.no_grad():
            actual = call()
        noise = self.provider_noise(provider)
        expected32 = self.reference(noise, upcast=True)
        lowp = None if self.dtype in (torch.float32, torch.float64) else self.reference(
            None if noise is None else noise.to(self.dtype) if provider not in FUSED else noise, upcast=False)
        assert len(actual) == len(expected32), f"{self.name}/{provider}: {len(actual)} outputs, want {len(expected32)}"
        for k, (a, e) in enumerate(zip(actual, expected32)):
            assert_matches(a, e, None if lowp is None else lowp[k],
                           f"{self.name}/{provider}/{self.size}/{self.dtype_name} output {k}")

    def describe(self) -> str:
        return f"{self.name} {self.size} ({'x'.join(map(str, self.shape))}) {self.dtype_name} on {self.device}"


# ---- the eager ops (pure functions of their arguments: torch.compile shares one per op) --------------
def eager_step(model_output, sample, history, table, index, noise, guidance_scale, clip_range, history_reads,
               write_history, write_out2):
    """The step in plain torch ops: (prev, hist if written, out2 if written), history read at the row's slots."""
    row = T.gather_row(table, index)
    reads = tuple(history.index_select(0, history_slots(row, T.READ_SLOT[:history_reads], history.shape[0]))) \
        if history_reads else ()
    result = R.step(model_output, sample, row, reads, noise, guidance_scale=guidance_scale, clip_range=clip_range,
                    write_history=write_history, write_out2=write_out2)
    written = (result.hist,) * write_history + (result.out2,) * write_out2
    return (result.prev, *(value.to(sample.dtype) for value in written))


def eager_q_sample(x0, table, index, noise):
    return R.q_sample(x0, table.index_select(0, index), noise)


def eager_cfg(model_output, guidance_scale):
    uncond, cond = model_output.chunk(2)
    return (R.cfg_combine(uncond, cond, guidance_scale),)


EAGER = {"step": eager_step, "q_sample": eager_q_sample, "cfg_combine": eager_cfg}
_COMPILED: dict[str, Callable] = {}


def compiled(op: str) -> Callable:
    """torch.compile of the eager op, one per op for the whole run: static shapes (each new shape or
    dtype compiles once; the recompile limit is raised so none falls back to eager silently)."""
    if op not in _COMPILED:
        torch._dynamo.config.recompile_limit = max(64, torch._dynamo.config.recompile_limit)
        _COMPILED[op] = torch.compile(EAGER[op], dynamic=False)
    return _COMPILED[op]
