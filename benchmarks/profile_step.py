"""Profile one sampler step (or one whole sampling loop) under torch.profiler, and check for host syncs.

Prints, per step: kernels launched (GPU kernels on CUDA; leaf aten/fastdiff ops on CPU), launch
calls (cudaLaunchKernel / cuLaunchKernel / cudaGraphLaunch), the time per kernel, and host
synchronisations (cudaStreamSynchronize / cudaDeviceSynchronize / cudaEventSynchronize / blocking
copies; aten::item / aten::_local_scalar_dense everywhere). On CUDA it then runs the same work under
`torch.cuda.set_sync_debug_mode("error")` and says whether anything synchronised, and where.
Writes a Chrome trace (chrome://tracing, ui.perfetto.dev) to benchmarks/results/traces/.

    python benchmarks/profile_step.py --sampler ddpm --impl fastdiff            # one step, 1x4x64x64
    python benchmarks/profile_step.py --sampler ddim --impl diffusers --shape 16,4,128,128
    python benchmarks/profile_step.py --sampler ddim --loop --model unet28 --steps 20 [--cuda-graph step|loop]
    FASTDIFF_BACKEND=triton python benchmarks/profile_step.py ...             # force a backend
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import traceback
from typing import Callable, Optional

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import cases, common  # noqa: E402
from benchmarks.models import make_model  # noqa: E402

TRACE_DIR = ROOT / "benchmarks" / "results" / "traces"
VIEW_OPS = {"aten::view", "aten::reshape", "aten::as_strided", "aten::expand", "aten::select", "aten::slice",
            "aten::unsqueeze", "aten::squeeze", "aten::detach", "aten::alias", "aten::empty", "aten::empty_like",
            "aten::empty_strided", "aten::resolve_conj", "aten::resolve_neg", "aten::lift_fresh", "aten::chunk",
            "aten::split", "aten::t", "aten::transpose", "aten::permute", "aten::contiguous", "aten::_unsafe_view",
            "aten::narrow", "aten::split_with_sizes", "aten::unbind", "aten::to", "aten::_to_copy"}
SYNC_RUNTIME = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy",
                "cuStreamSynchronize", "cuCtxSynchronize")
SYNC_OPS = ("aten::item", "aten::_local_scalar_dense")
LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx", "cudaGraphLaunch")


# ---- workloads --------------------------------------------------------------------------------
def step_workload(sampler_kind: str, impl: str, shape, dtype: torch.dtype, device: str) -> Callable[[], object]:
    """One step on fixed inputs as fastdiff.sample() calls it (device timestep, in place, seed=) or as
    a diffusers loop calls its scheduler."""
    import fastdiff
    if impl == "fastdiff":
        stepper = (fastdiff.DDIMSampler if sampler_kind == "ddim" else fastdiff.DDPMSampler)()
    else:
        import diffusers
        stepper = (diffusers.DDIMScheduler if sampler_kind == "ddim" else diffusers.DDPMScheduler)()
    stepper.set_timesteps(cases.DDIM_STEPS if sampler_kind == "ddim" else 1000, device=device)
    eps, x = cases.randn(shape, dtype, device, 1), cases.randn(shape, dtype, device, 2)
    t = stepper.timesteps[len(stepper.timesteps) // 2]  # a mid-schedule timestep, on the device
    if impl == "fastdiff":
        extra = {"seed": cases.SEED} if sampler_kind == "ddpm" else {}
        return lambda: stepper.step(eps, t, x, out=x, **extra)
    return lambda: stepper.step(eps, t, x).prev_sample


def loop_workload(sampler_kind: str, impl: str, model_name: str, steps: int, device: str,
                  cuda_graph=False) -> Callable[[], object]:
    """A whole loop: fastdiff.sample() (optionally graphed) or the hand-written diffusers loop."""
    from benchmarks.test_e2e import hand_loop, schedulers
    model, shape = make_model(model_name, device)
    scheduler, sampler = schedulers(sampler_kind)  # scheduler: None without diffusers
    if impl == "fastdiff":
        from fastdiff import sample
        return lambda: sample(model, sampler, shape, num_inference_steps=steps, seed=cases.SEED, device=device,
                              progress=False, cuda_graph=cuda_graph)
    x = torch.randn(shape, device=device)
    return lambda: hand_loop(model, scheduler, x, steps, device)


# ---- analysis ---------------------------------------------------------------------------------
def _compute_op(event) -> bool:
    return event.name.startswith(("aten::", "fastdiff")) and event.name not in VIEW_OPS and event.name not in SYNC_OPS


def is_kernel(event, device: str) -> bool:
    """GPU: a device kernel (not a copy/memset). CPU: an op that computes itself, i.e. a compute op
    none of whose children computes (a fused C++ op counts once, a reference step per aten op)."""
    if device.startswith("cuda"):
        return event.device_type == torch.autograd.DeviceType.CUDA and "Memcpy" not in event.name \
            and "Memset" not in event.name
    return _compute_op(event) and not any(_compute_op(child) for child in event.cpu_children)


def is_sync(event) -> bool:
    return event.name in SYNC_RUNTIME or event.name in SYNC_OPS or ("DtoH" in event.name and "Memcpy" in event.name)


def summarize(events, device: str, per: int) -> dict:
    """Counts per step (`per` = steps or repeats profiled) and the kernels by total time."""
    events = list(events)
    kernels = [e for e in events if is_kernel(e, device)]
    syncs = [e for e in events if is_sync(e)]
    launches = [e for e in events if e.name in LAUNCHES]
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        us = e.device_time_total if device.startswith("cuda") else e.self_cpu_time_total
        by_name.setdefault(e.name, []).append(us)
    top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:12]
    return {"kernels_per_step": len(kernels) / per, "launch_calls_per_step": len(launches) / per,
            "syncs_per_step": len(syncs) / per, "sync_names": sorted({e.name for e in syncs}),
            "kernel_us_per_step": sum(sum(v) for v in by_name.values()) / per,
            "top_kernels": [{"name": name[:100], "calls_per_step": len(t) / per, "us_per_call": sum(t) / len(t)}
                            for name, t in top]}


def profile_work(work: Callable[[], object], device: str, repeats: int, per: int,
                 trace: Optional[pathlib.Path] = None) -> tuple[dict, object]:
    """Warm up, then profile `repeats` calls of `work`; counts are divided by `per` (steps in all)."""
    with torch.no_grad():
        work()  # warm-up: lazy init, tables on the device, graph capture
        common.synchronize(device)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
        with profile(activities=activities) as prof:
            for _ in range(repeats):
                work()
            common.synchronize(device)
    if trace is not None:
        trace.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(trace))
    return summarize(prof.events(), device, per), prof


def sync_debug(work: Callable[[], object], device: str) -> str:
    """'no host sync' when `work` runs under set_sync_debug_mode("error"), else where it synchronised.
    (Run `work` once before: warm-up work such as a first graph capture is not what is checked.)"""
    if not device.startswith("cuda"):
        return "not checked: torch.cuda.set_sync_debug_mode needs a GPU"
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.no_grad():
            work()
        return "no host sync"
    except RuntimeError as error:
        frames = [f for f in traceback.extract_tb(error.__traceback__) if "fastdiff" in f.filename
                  or "benchmarks" in f.filename or "diffusers" in f.filename]
        where = frames[-1] if frames else None
        return f"synchronised: {str(error).splitlines()[0][:120]}" + (
            f" at {pathlib.Path(where.filename).name}:{where.lineno} ({where.line})" if where else "")
    finally:
        torch.cuda.set_sync_debug_mode(previous)
        torch.cuda.synchronize()


# ---- command line -----------------------------------------------------------------------------
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sampler", choices=("ddpm", "ddim"), default="ddpm")
    parser.add_argument("--impl", choices=("fastdiff", "diffusers"), default="fastdiff",
                        help="fastdiff sampler (backend per FASTDIFF_BACKEND) or the diffusers scheduler")
    parser.add_argument("--shape", default="1,4,64,64", help="sample shape for a single step")
    parser.add_argument("--dtype", choices=tuple(cases.DTYPES), default="fp32")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--steps", type=int, default=10, help="steps profiled (single-step mode: repeats)")
    parser.add_argument("--loop", action="store_true", help="profile a whole loop with a small model instead")
    parser.add_argument("--model", choices=("unet28", "mlp2d"), default="unet28")
    parser.add_argument("--cuda-graph", choices=("off", "step", "loop"), default="off")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    graph = {"off": False, "step": True, "loop": "loop"}[args.cuda_graph]
    if args.loop:
        work = loop_workload(args.sampler, args.impl, args.model, args.steps, device, graph)
        repeats = 1
    else:
        shape = tuple(int(s) for s in args.shape.split(","))
        work = step_workload(args.sampler, args.impl, shape, cases.DTYPES[args.dtype], device)
        repeats = args.steps
    kind = f"loop-{args.model}-{args.cuda_graph}" if args.loop else "step"
    trace = TRACE_DIR / f"{args.impl}-{args.sampler}-{kind}-{device}.json"
    summary, prof = profile_work(work, device, repeats, per=args.steps, trace=trace)
    what = f"loop of {args.steps} steps ({args.model}, graph {args.cuda_graph})" if args.loop else f"step {args.shape}"
    print(f"{args.impl} {args.sampler} {what} {args.dtype} on {common.device_name(device)}")
    sort = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=15))
    print(f"\nper step: {summary['kernels_per_step']:.1f} kernels, {summary['launch_calls_per_step']:.1f} launch "
          f"calls, {summary['syncs_per_step']:.1f} host syncs ({', '.join(summary['sync_names']) or 'none'})")
    print(f"\n{'kernel':70s} {'calls/step':>10s} {'us/call':>10s}")
    for k in summary["top_kernels"]:
        print(f"{k['name'][:70]:70s} {k['calls_per_step']:10.1f} {k['us_per_call']:10.1f}")
    print(f"\nsync debug mode 'error': {sync_debug(work, device)}")
    print(f"\nChrome trace: {trace}")


if __name__ == "__main__":
    main()
