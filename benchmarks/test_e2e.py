"""End-to-end sampling loops with a small denoiser, where the sampler's share of the time shows.

Loops (same model, same number of steps):
- diffusers: the hand-written diffusers loop (model call + DDIMScheduler/DDPMScheduler.step).
- fastdiff-sampler: the same loop with the scheduler swapped for the fastdiff sampler (drop-in),
  noise from the in-kernel Philox stream (seed=).
- fastdiff-loop: `fastdiff.loop.sample(...)` (device timesteps, no host sync).
- fastdiff-graph: `fastdiff.loop.sample(..., cuda_graph=True)` (GPU only).
Model only: the same loop with the sampler step removed (the model still runs every step);
sampler share = 1 - model_only / loop time, both measured in the same case.
Correctness first: every fastdiff loop must match the diffusers loop for the same generator.
"""
from __future__ import annotations

import time

import pytest
import torch

from benchmarks import common
from benchmarks.models import make_model

LOOPS = ("diffusers", "fastdiff-sampler", "fastdiff-loop", "fastdiff-graph")
SAMPLERS = {"ddim": 50, "ddpm": 1000}  # full-run steps
QUICK_STEPS = {"ddim": 5, "ddpm": 20}
LOOP_ATOL = 1e-4  # DESIGN: full loops vs diffusers, fp32


def schedulers(kind: str):
    """(diffusers scheduler, fastdiff sampler) with the same config."""
    import diffusers

    import fastdiff
    cls = diffusers.DDIMScheduler if kind == "ddim" else diffusers.DDPMScheduler
    scheduler = cls()
    sampler = (fastdiff.DDIMSampler if kind == "ddim" else fastdiff.DDPMSampler).from_config(scheduler.config)
    return scheduler, sampler


def hand_loop(model, scheduler, x, steps: int, device: str, **step_kwargs) -> torch.Tensor:
    """The loop a diffusers user writes; works for a diffusers scheduler and a fastdiff sampler."""
    scheduler.set_timesteps(steps, device=device)  # as diffusers' pipelines do
    for t in scheduler.timesteps:
        eps = model(x, t)
        x = scheduler.step(eps, t, x, **step_kwargs).prev_sample
    return x


def model_only_loop(model, scheduler, x, steps: int, device: str) -> torch.Tensor:
    scheduler.set_timesteps(steps, device=device)
    for t in scheduler.timesteps:
        eps = model(x, t)
    return eps


def loop_reason(loop: str, device: str) -> str | None:
    if loop == "fastdiff-graph" and device != "cuda":
        return "CUDA graphs need a GPU"
    if loop.startswith("fastdiff-loop") or loop == "fastdiff-graph":
        try:
            import fastdiff.loop  # noqa: F401
        except ImportError as error:
            return f"fastdiff.loop is not available: {error}"
    return common.skip_reason("diffusers", device)


def make_run(loop: str, model, kind: str, shape, steps: int, device: str, generator=None):
    """A zero-argument function running one full loop (initial noise included)."""
    scheduler, sampler = schedulers(kind)

    def initial():
        gen = generator() if generator else None
        return torch.randn(shape, generator=gen, device="cpu").to(device), gen

    if loop == "diffusers":
        def run():
            x, gen = initial()
            return hand_loop(model, scheduler, x, steps, device, generator=gen) if gen else \
                hand_loop(model, scheduler, x, steps, device)
    elif loop == "fastdiff-sampler":
        def run():
            x, gen = initial()
            if gen is not None:
                return hand_loop(model, sampler, x, steps, device, generator=gen)
            return hand_loop(model, sampler, x, steps, device, seed=common.SEED)
    else:
        from fastdiff.loop import sample

        def run():
            noise = {"generator": generator()} if generator else {"seed": common.SEED}
            return sample(model, sampler, shape, num_inference_steps=steps, progress=False, device=device,
                          cuda_graph=(loop == "fastdiff-graph"), **noise)
    return run


def check_loop(loop: str, model, kind: str, shape, steps: int, device: str) -> None:
    """A fastdiff loop with the same generator gives the diffusers result; the CUDA-graph loop (which
    needs seed=) gives the eager fastdiff loop's result for the same seed."""
    if loop == "diffusers":
        return
    if loop == "fastdiff-graph":
        expected = make_run("fastdiff-loop", model, kind, shape, steps, device)()
        actual = make_run(loop, model, kind, shape, steps, device)()
    else:
        gen = lambda: torch.Generator().manual_seed(common.SEED)  # noqa: E731
        expected = make_run("diffusers", model, kind, shape, steps, device, gen)()
        actual = make_run(loop, model, kind, shape, steps, device, gen)()
    torch.testing.assert_close(actual, expected, atol=LOOP_ATOL, rtol=0, msg=lambda m: f"{loop}: {m}")


def median_time(fn, device: str, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        common.synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


_MODEL_ONLY: dict[tuple, float] = {}


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("kind", tuple(SAMPLERS))
@pytest.mark.parametrize("model_name", ("unet28", "mlp2d"))
@torch.no_grad()
def test_e2e(benchmark, model_name, kind, loop, device, quick):
    reason = loop_reason(loop, device)
    if reason:
        pytest.skip(reason)
    steps = (QUICK_STEPS if quick else SAMPLERS)[kind]
    model, shape = make_model(model_name, device)
    rounds = 1 if quick else 3

    check_loop(loop, model, kind, shape, steps, device)

    run = make_run(loop, model, kind, shape, steps, device)
    benchmark.group = f"e2e {model_name} {kind}{steps}"
    warmup = 0 if loop != "diffusers" else 1  # check_loop already ran the fastdiff loops once
    benchmark.pedantic(common.synced(run, device), rounds=rounds, iterations=1, warmup_rounds=warmup)
    key = (model_name, kind, steps)
    if key not in _MODEL_ONLY:
        scheduler, _ = schedulers(kind)
        x = torch.randn(shape, device=device)
        _MODEL_ONLY[key] = median_time(lambda: model_only_loop(model, scheduler, x, steps, device), device, rounds)
    record_e2e(benchmark, model_name, kind, loop, steps, shape, device)


def record_e2e(benchmark, model_name, kind, loop, steps, shape, device) -> None:
    median = benchmark.stats.stats.median
    model_only = _MODEL_ONLY[(model_name, kind, steps)]
    record = {"op": "e2e", "provider": loop, "model": model_name, "sampler": f"{kind}{steps}", "steps": steps,
              "shape": list(shape), "device": device, "device_name": common.device_name(device), "dtype": "fp32",
              "median_s": median, "mean_s": benchmark.stats.stats.mean, "rounds": benchmark.stats.stats.rounds,
              "model_only_s": model_only, "sampler_share": max(0.0, 1 - model_only / median),
              "per_step_overhead_s": max(0.0, median - model_only) / steps}
    benchmark.extra_info.update({k: record[k] for k in ("model_only_s", "sampler_share", "per_step_overhead_s",
                                                        "device_name")})
    common.RESULTS.append(record)
