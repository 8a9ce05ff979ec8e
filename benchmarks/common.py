"""Shared helpers of the op benchmarks: providers, sizes, correctness check, bytes/bandwidth math.

Method (DESIGN "Performance: how we measure"):
- Bytes moved = the inputs a fused kernel must read once + the outputs it writes once
  (noise made inside the kernel is not counted). The same number is used for every provider,
  so GB/s is an *effective* bandwidth: a provider that moves more bytes shows a lower figure.
- Copy bandwidth = bytes read + written by `torch.clone` of a buffer larger than the last-level
  cache, measured in the same session; every case reports its GB/s as a fraction of it.
- Every case checks its output against `fastdiff.reference` before it is timed; on a GPU every
  timed call ends with `torch.cuda.synchronize()`.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from fastdiff import backends

# ---- sizes and dtypes -------------------------------------------------------------------------
SIZES: dict[str, tuple[int, ...]] = {
    "sd-latent": (1, 4, 64, 64),  # one Stable Diffusion 1.x latent, 16K elements
    "sdxl-latent": (1, 4, 128, 128),  # one SDXL latent, 64K
    "batch16-sdxl": (16, 4, 128, 128),  # a batch of SDXL latents, 1M
    "video": (1, 16, 16, 256, 256),  # a video latent (B, C, frames, H, W), 16.8M
}
QUICK_SIZES = ("sd-latent",)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# ---- providers --------------------------------------------------------------------------------
PROVIDERS = ("eager", "diffusers", "compile", "triton", "cpp_cuda", "cpp_cpu")
PROVIDER_LABELS = {
    "eager": "eager reference", "diffusers": "diffusers", "compile": "torch.compile(reference)",
    "triton": "fastdiff Triton", "cpp_cuda": "fastdiff C++ CUDA", "cpp_cpu": "fastdiff C++ CPU",
}
FASTDIFF_BACKEND = {"triton": "triton", "cpp_cuda": "cpp", "cpp_cpu": "cpp"}  # FASTDIFF_BACKEND value
FASTDIFF_DEVICE = {"triton": "cuda", "cpp_cuda": "cuda", "cpp_cpu": "cpu"}

SEED = 1234  # torch RNG seed (eager / diffusers / compile noise) and Philox seed (fastdiff)


def skip_reason(provider: str, device: str) -> str | None:
    """None when `provider` can be benchmarked on `device` in this process, else why not."""
    if provider in FASTDIFF_DEVICE:
        if FASTDIFF_DEVICE[provider] != device:
            if provider == "triton":
                return "Triton runs CPU tensors only in the interpreter, which is not a performance path"
            return f"{PROVIDER_LABELS[provider]} runs on {FASTDIFF_DEVICE[provider]}; this run benchmarks {device}"
        reason = backends.unavailable_reason(FASTDIFF_BACKEND[provider], device)
        return reason
    if provider == "compile" and device == "cpu" and shutil.which(os.environ.get("CXX", "g++")) is None:
        return "torch.compile on CPU needs a C++ compiler (none found)"
    if provider == "diffusers":
        try:
            import diffusers  # noqa: F401
        except ImportError as error:
            return f"diffusers is not installed: {error}"
    return None


def forced_backend(provider: str):
    """FASTDIFF_BACKEND set for a fastdiff provider (the public op then runs that backend)."""
    return backends.forced(FASTDIFF_BACKEND.get(provider))


def compiled(fn: Callable) -> Callable:
    """torch.compile of `fn` for one case: static shapes, a fresh dynamo cache (no recompile limit)."""
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False)


# ---- inputs, noise --------------------------------------------------------------------------
def randn(shape, dtype, device, seed: int) -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(dtype)


def torch_noise(shape, dtype, device) -> torch.Tensor:
    """The noise the torch-RNG providers drew, after `torch.manual_seed(SEED)` (see check_case)."""
    torch.manual_seed(SEED)
    return torch.randn(shape, device=device, dtype=dtype)


# ---- timing -----------------------------------------------------------------------------------
def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def synced(call: Callable, device: str) -> Callable:
    """The timed function: the call, then a device synchronisation on GPU."""
    if device != "cuda":
        return call

    def run():
        out = call()
        torch.cuda.synchronize()
        return out

    return run


def seconds_per_call(fn: Callable, repeats: int = 3) -> float:
    fn()  # warm-up (allocator, lazy init)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def plan_rounds(per_call_s: float, quick: bool) -> tuple[int, int]:
    """(rounds, iterations per round): rounds of >= ~2 ms (quick) / 10 ms, ~0.1 s / 1 s in all."""
    round_s, budget_s, min_rounds = (0.002, 0.1, 3) if quick else (0.01, 1.0, 5)
    iterations = max(1, math.ceil(round_s / max(per_call_s, 1e-9)))
    rounds = max(min_rounds, min(50, int(budget_s / (iterations * max(per_call_s, 1e-9)))))
    return rounds, iterations


@functools.cache
def copy_bandwidth(device: str) -> float:
    """Bytes/s of `dst.copy_(src)` over a buffer larger than the last-level cache (read + write
    counted), median of 5; dst is allocated once, so page faults of fresh memory are not timed."""
    nbytes = 512 * 2**20 if device == "cpu" else 2 * 2**30
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src).fill_(0.0)
    fn = synced(lambda: dst.copy_(src), device)
    times = []
    fn()
    for _ in range(5):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 2 * nbytes / sorted(times)[len(times) // 2]


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model} ({os.cpu_count()} cores, torch threads={torch.get_num_threads()})"


# ---- correctness ------------------------------------------------------------------------------
def assert_matches(actual: torch.Tensor, expected32: torch.Tensor, expected_lowp: torch.Tensor | None,
                   what: str) -> None:
    """fp32: atol = rtol = 1e-5 vs the reference. fp16/bf16 (DESIGN): error vs the fp32 reference at
    most 2x the error of the reference computed in that dtype, plus 1e-3."""
    assert actual.shape == expected32.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected32.shape)}"
    if actual.dtype == torch.float32:
        torch.testing.assert_close(actual, expected32, atol=1e-5, rtol=1e-5, msg=lambda m: f"{what}: {m}")
        return
    err = (actual.float() - expected32).abs().max().item()
    bound = 2 * (expected_lowp.float() - expected32).abs().max().item() + 1e-3
    assert err <= bound, f"{what}: max error {err:.3g} vs the fp32 reference exceeds {bound:.3g}"


# ---- one case ---------------------------------------------------------------------------------
@dataclass
class Case:
    """One benchmark case: what is measured and how many bytes it must move."""
    group: str  # q_sample, ddpm_step, ddim_step, cfg, cfg+step
    provider: str
    size: str
    dtype: str
    device: str
    shape: tuple[int, ...]
    bytes_moved: int
    extra: dict = field(default_factory=dict)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


RESULTS: list[dict] = []  # filled by run_case, written by conftest.pytest_sessionfinish
SKIPPED: dict[str, str] = {}  # provider -> why it was not measured (filled at collection)


def run_case(benchmark, case: Case, call: Callable, quick: bool) -> dict:
    """Time `call` (already checked) with pytest-benchmark and record GB/s and % of copy bandwidth."""
    benchmark.group = f"{case.group} {case.size} {case.dtype}"
    fn = synced(call, case.device)
    rounds, iterations = plan_rounds(seconds_per_call(fn), quick)
    benchmark.pedantic(fn, rounds=rounds, iterations=iterations, warmup_rounds=1)
    stats = benchmark.stats.stats
    copy_bps = copy_bandwidth(case.device)
    gbps = case.bytes_moved / stats.median / 1e9
    record = {
        "op": case.group, "provider": case.provider, "size": case.size, "shape": list(case.shape),
        "numel": case.numel, "dtype": case.dtype, "device": case.device, "device_name": device_name(case.device),
        "bytes_moved": case.bytes_moved, "median_s": stats.median, "mean_s": stats.mean, "min_s": stats.min,
        "max_s": stats.max, "stddev_s": stats.stddev, "rounds": stats.rounds, "iterations": iterations,
        "gbps": gbps, "copy_gbps": copy_bps / 1e9, "pct_copy_bw": 100 * gbps / (copy_bps / 1e9), **case.extra,
    }
    benchmark.extra_info.update({k: record[k] for k in ("bytes_moved", "gbps", "copy_gbps", "pct_copy_bw",
                                                        "device_name", "shape", "dtype", "provider")})
    RESULTS.append(record)
    return record


def provider_noise(provider: str, shape, dtype, device, counter: int, stream: int) -> Callable[[], torch.Tensor]:
    """How to rebuild the noise a provider's call drew: torch.randn after torch.manual_seed(SEED)
    (eager, compile, diffusers), or fastdiff's Philox stream for SEED (fused backends)."""
    if provider in FASTDIFF_BACKEND:
        from fastdiff import noise as N
        return lambda: N.randn(shape, SEED, counter=counter, stream=stream, device=device, dtype=dtype)
    return lambda: torch_noise(shape, dtype, device)


def _upcast(inputs: dict) -> dict:
    return {k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in inputs.items()}


def check_case(call: Callable, reference: Callable, inputs: dict, noise: Callable | None, what: str) -> None:
    """Run `call` once (torch RNG seeded) and compare with `reference(inputs, noise)` (see assert_matches)."""
    torch.manual_seed(SEED)
    actual = call()
    drawn = noise() if noise is not None else None
    expected32 = reference(_upcast(inputs), None if drawn is None else drawn.float())
    lowp = None if actual.dtype == torch.float32 else reference(inputs, drawn)
    assert_matches(actual, expected32, lowp, what)


def make_case(group: str, provider: str, size: str, dtype: str, device: str, bytes_per_element: float,
              shape: tuple[int, ...] | None = None) -> Case:
    """A case whose bytes moved = bytes_per_element x numel(sample) x element size."""
    shape = shape or SIZES[size]
    element = torch.empty((), dtype=DTYPES[dtype]).element_size()
    return Case(group, provider, size, dtype, device, shape, int(bytes_per_element * math.prod(shape) * element))


# ---- schedule rows (the coefficient row a sampler passes to a fused step) ------------------
NUM_TRAIN_TIMESTEPS = 1000
STEP_T = 500  # the timestep every step case runs at (mid-schedule: noise and clipping active)
DDIM_STEPS = 50


def _alphas_cumprod() -> torch.Tensor:
    from fastdiff import DDPMSampler
    return DDPMSampler().alphas_cumprod  # diffusers' float32 table (linear betas)


def ddpm_row(device: str) -> torch.Tensor:
    """Row STEP_T of the 1000-step DDPM table (fixed_small), as DDPMScheduler() steps it."""
    from fastdiff import tables as T
    table = T.ddpm_table(_alphas_cumprod(), list(range(NUM_TRAIN_TIMESTEPS - 1, -1, -1)), "fixed_small")
    return table[STEP_T].clone().to(device)  # a standalone row, not a view of the table


def ddim_row(device: str) -> torch.Tensor:
    """Row STEP_T of the DDIM table for 50 inference steps (set_alpha_to_one=True)."""
    from fastdiff import tables as T
    table = T.ddim_table(_alphas_cumprod(), NUM_TRAIN_TIMESTEPS // DDIM_STEPS, 1.0)
    return table[STEP_T].clone().to(device)


def alphas_cumprod(device: str) -> torch.Tensor:
    return _alphas_cumprod().to(device)
