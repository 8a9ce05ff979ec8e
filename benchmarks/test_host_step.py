"""Host time per sampler step at a tiny size, where a step is all Python and dispatch (issue 10, item 4).

At 1x4x8x8 on the CPU with one thread (torch.set_num_threads(1)), in one run: fastdiff's
DDPMSampler.step and DDIMSampler.step (as a diffusers loop calls them, and with `out=` as
fastdiff.sample() calls them), diffusers' DDPMScheduler.step and DDIMScheduler.step, the other
samplers next to their diffusers twins (stepping through a 500-step schedule, started again at its
end), and two floors: the backend launcher alone (fastdiff.ops.run_step) and one torch add. Providers are timed
in alternating windows (timing.interleaved_host_times), so a shared machine's load hits them alike;
each is reported as a ratio to diffusers' DDIMScheduler.step. Target (issue 10): <= 0.2x for
DDPM and DDIM. A measurement, not an assert.
"""
from __future__ import annotations

import os

import pytest
import torch

from benchmarks import cases, common
from benchmarks import timing as TM

SHAPE = (1, 4, 8, 8)
TARGET = 0.2
BASELINE = "diffusers DDIMScheduler.step"


def step_calls(device: str = "cpu") -> tuple[dict, dict]:
    """{name: zero-argument call} and {name: note} for every provider of the host-time table."""
    import fastdiff
    from fastdiff import ops
    from fastdiff import tables as T

    g = torch.Generator().manual_seed(0)
    m = torch.randn(SHAPE, generator=g).to(device)
    x = torch.randn(SHAPE, generator=g).to(device)
    out = torch.empty_like(x)
    calls, notes = {}, {}
    ddpm, ddim = fastdiff.DDPMSampler(), fastdiff.DDIMSampler()
    ddpm.set_timesteps(1000, device=device)
    ddim.set_timesteps(cases.DDIM_STEPS, device=device)
    t_ddpm, t_ddim = ddpm.timesteps[500], ddim.timesteps[25]  # 0-d tensors, as a loop over .timesteps gives
    backend = _backend_name(x)
    calls["fastdiff DDPMSampler.step"] = lambda: ddpm.step(m, t_ddpm, x, seed=cases.SEED)
    calls["fastdiff DDPMSampler.step(out=)"] = lambda: ddpm.step(m, t_ddpm, x, seed=cases.SEED, out=out)
    calls["fastdiff DDIMSampler.step"] = lambda: ddim.step(m, t_ddim, x)
    calls["fastdiff DDIMSampler.step(out=)"] = lambda: ddim.step(m, t_ddim, x, out=out)
    for name in calls:
        notes[name] = f"backend {backend}" + ("; seed= (in-kernel Philox noise)" if "DDPM" in name else "")
    try:
        import diffusers
    except ImportError as error:
        pytest.skip(f"diffusers is not installed ({error}): the ratios need its schedulers in the same run")
    d_ddpm, d_ddim = diffusers.DDPMScheduler(), diffusers.DDIMScheduler()
    d_ddpm.set_timesteps(1000, device=device)
    d_ddim.set_timesteps(cases.DDIM_STEPS, device=device)
    dt_ddpm, dt_ddim = d_ddpm.timesteps[500], d_ddim.timesteps[25]
    calls["diffusers DDPMScheduler.step"] = lambda: d_ddpm.step(m, dt_ddpm, x)
    calls[BASELINE] = lambda: d_ddim.step(m, dt_ddim, x)
    notes["diffusers DDPMScheduler.step"] = "torch.randn noise"
    for ours, theirs, kwargs, note in SIGMA_SAMPLERS:
        for sampler, extra in ((getattr(fastdiff, ours)(**kwargs), {"seed": cases.SEED}),
                               (getattr(diffusers, theirs)(**kwargs), {"generator": torch.Generator()})):
            name = f"{'fastdiff' if sampler.__module__.startswith('fastdiff') else 'diffusers'} " \
                   f"{type(sampler).__name__}.step"
            calls[name] = cyclic_steps(sampler, m, x, extra if "noise" in note else {}, device)
            notes[name] = note
    table, index = ddim._table(x.device, eta=0.0, use_clipped_model_output=False), torch.tensor([500], device=device)
    history = torch.empty(0, device=device)
    calls["floor: fastdiff.ops.run_step"] = lambda: ops.run_step(
        m, x, table, index, history, None, None, 0, None, None, 0.0, T.VAR_FIXED, 1.0, None, 0, False, False, False,
        False, out=out)
    notes["floor: fastdiff.ops.run_step"] = f"the eager fast path alone (DDIM row, backend {backend})"
    calls["floor: one torch.add"] = lambda: torch.add(m, x, out=out)
    return calls, notes


# (fastdiff sampler, its diffusers twin, config, what the step does): stepped through a schedule in order
SIGMA_SAMPLERS = [
    ("EulerDiscreteSampler", "EulerDiscreteScheduler", {}, "SDXL's default"),
    ("EulerAncestralDiscreteSampler", "EulerAncestralDiscreteScheduler", {}, "noise every step"),
    ("FlowMatchEulerDiscreteSampler", "FlowMatchEulerDiscreteScheduler", {"shift": 3.0}, "SD3's default"),
    ("DPMSolverMultistepSampler", "DPMSolverMultistepScheduler", {}, "DPM-Solver++ 2M: one history read"),
    ("UniPCMultistepSampler", "UniPCMultistepScheduler", {}, "order 2: corrector + predictor, 3 history reads"),
]
CYCLE = 500  # steps of the schedule the cyclic calls walk through


def cyclic_steps(sampler, m: torch.Tensor, x: torch.Tensor, kwargs: dict, device: str):
    """One call = the next step of a CYCLE-step schedule (set again, from index 0, at its end): counter
    samplers (and their diffusers twins) step in order, as in a loop."""
    state = {"left": 0, "timesteps": None}

    def call():
        if state["left"] == 0:
            sampler.set_timesteps(CYCLE, device=device)
            sampler.set_begin_index(0)
            sampler.is_scale_input_called = True  # the Euler schedulers warn (a log line per step) otherwise
            state["left"], state["timesteps"] = CYCLE, iter(list(sampler.timesteps))
        state["left"] -= 1
        return sampler.step(m, next(state["timesteps"]), x, **kwargs)
    return call


def _backend_name(x: torch.Tensor) -> str:
    from fastdiff import backends
    module = backends.select("step", x).__name__
    return {"fastdiff.kernels": "triton", "fastdiff._cpp": "cpp", "fastdiff.eager": "reference"}.get(module, module)


def measure(quick: bool) -> list[dict]:
    """The host-time rows (one thread), ratios to diffusers' DDIMScheduler.step from the same run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        calls, notes = step_calls()
        with torch.no_grad():
            timings = TM.interleaved_host_times(calls, calls_per_window=50 if quick else 200,
                                                rounds=5 if quick else 15)
    finally:
        torch.set_num_threads(threads)
    base = timings[BASELINE].median_s
    load = os.getloadavg()[0]
    return [{"op": "host_step", "provider": name, "shape": list(SHAPE), "device": "cpu", "dtype": "fp32",
             "threads": 1, "median_s": t.median_s, "min_s": t.min_s, "spread": t.spread,
             "calls_per_window": t.calls_per_window, "windows": len(t.per_call_s), "ratio_to_baseline": t.median_s / base,
             "baseline": BASELINE, "target_ratio": TARGET if name.startswith("fastdiff D") else None,
             "note": notes.get(name, ""), "load_average_1min": load,
             "device_name": common.device_name("cpu")} for name, t in timings.items()]


def test_host_time_per_step(benchmark, device, quick):
    if device != "cpu":
        pytest.skip("host time per step is measured on the CPU (issue 10); on a GPU gpu_check reports host "
                    "time per call next to each kernel time")
    rows = measure(quick)
    common.RESULTS.extend(rows)
    calls, _ = step_calls()
    benchmark.group = "host time per step, 1x4x8x8, 1 thread"
    benchmark.pedantic(calls["fastdiff DDIMSampler.step"], rounds=5, iterations=50, warmup_rounds=1)
    benchmark.extra_info.update({r["provider"]: f"{r['median_s'] * 1e6:.1f} us ({r['ratio_to_baseline']:.2f}x)"
                                 for r in rows})
