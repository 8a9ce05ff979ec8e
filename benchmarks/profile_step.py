"""Profile one sampler step (or one whole sampling loop) under torch.profiler.

Prints, per step: kernels launched (GPU kernels on CUDA; leaf aten/fastdiff ops on CPU), the time
per kernel, and host synchronisations (cudaStreamSynchronize / cudaDeviceSynchronize /
device-to-host copies on GPU; aten::item / aten::_local_scalar_dense, the calls that would sync a
GPU, everywhere). Writes a Chrome trace (chrome://tracing, ui.perfetto.dev) to
benchmarks/results/traces/.

    python benchmarks/profile_step.py --sampler ddpm --impl fastdiff            # one step, 1x4x64x64
    python benchmarks/profile_step.py --sampler ddim --impl diffusers --shape 16,4,128,128
    python benchmarks/profile_step.py --sampler ddpm --impl fastdiff --loop --model unet28 --steps 20
    FASTDIFF_BACKEND=reference python benchmarks/profile_step.py ...          # force a backend
"""
from __future__ import annotations

import argparse
import pathlib
import sys

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import common  # noqa: E402
from benchmarks.models import make_model  # noqa: E402
from benchmarks.test_e2e import hand_loop, schedulers  # noqa: E402

TRACE_DIR = ROOT / "benchmarks" / "results" / "traces"
VIEW_OPS = {"aten::view", "aten::reshape", "aten::as_strided", "aten::expand", "aten::select", "aten::slice",
            "aten::unsqueeze", "aten::squeeze", "aten::detach", "aten::alias", "aten::empty", "aten::empty_like",
            "aten::empty_strided", "aten::resolve_conj", "aten::resolve_neg", "aten::lift_fresh", "aten::chunk",
            "aten::split", "aten::t", "aten::transpose", "aten::permute", "aten::contiguous", "aten::_unsafe_view",
            "aten::narrow", "aten::split_with_sizes", "aten::unbind", "aten::to", "aten::_to_copy"}
SYNC_RUNTIME = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
SYNC_OPS = ("aten::item", "aten::_local_scalar_dense")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sampler", choices=("ddpm", "ddim"), default="ddpm")
    parser.add_argument("--impl", choices=("fastdiff", "diffusers"), default="fastdiff",
                        help="fastdiff sampler (backend per FASTDIFF_BACKEND) or the diffusers scheduler")
    parser.add_argument("--shape", default="1,4,64,64", help="sample shape for a single step")
    parser.add_argument("--dtype", choices=tuple(common.DTYPES), default="fp32")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--steps", type=int, default=10, help="steps profiled (single-step mode: repeats)")
    parser.add_argument("--loop", action="store_true", help="profile a whole loop with a small model instead")
    parser.add_argument("--model", choices=("unet28", "mlp2d"), default="unet28")
    return parser.parse_args()


def step_workload(args, device: str):
    """A function running one step on fixed inputs, as a sampling loop calls it."""
    scheduler, sampler = schedulers(args.sampler)
    stepper = sampler if args.impl == "fastdiff" else scheduler
    stepper.set_timesteps(common.DDIM_STEPS if args.sampler == "ddim" else 1000, device=device)
    shape = tuple(int(s) for s in args.shape.split(","))
    dtype = common.DTYPES[args.dtype]
    eps, x = common.randn(shape, dtype, device, 1), common.randn(shape, dtype, device, 2)
    t = stepper.timesteps[len(stepper.timesteps) // 2]  # a mid-schedule timestep, on the device
    extra = {"seed": common.SEED} if args.impl == "fastdiff" and args.sampler == "ddpm" else {}
    return lambda: stepper.step(eps, t, x, **extra).prev_sample


def loop_workload(args, device: str):
    model, shape = make_model(args.model, device)
    scheduler, sampler = schedulers(args.sampler)
    stepper = sampler if args.impl == "fastdiff" else scheduler
    x = torch.randn(shape, device=device)
    extra = {"seed": common.SEED} if args.impl == "fastdiff" else {}
    return lambda: hand_loop(model, stepper, x, args.steps, device, **extra)


def _compute_op(event) -> bool:
    return event.name.startswith(("aten::", "fastdiff")) and event.name not in VIEW_OPS and event.name not in SYNC_OPS


def is_kernel(event, device: str) -> bool:
    """GPU: a device kernel (not a copy/memset). CPU: an op that computes itself, i.e. a compute op
    none of whose children computes (a fused C++ op counts once, a reference step per aten op)."""
    if device == "cuda":
        return event.device_type == torch.autograd.DeviceType.CUDA and "Memcpy" not in event.name \
            and "Memset" not in event.name
    return _compute_op(event) and not any(_compute_op(child) for child in event.cpu_children)


def summarize(prof, device: str, per: int) -> None:
    events = list(prof.events())
    kernels = [e for e in events if is_kernel(e, device)]
    syncs = [e for e in events if e.name in SYNC_RUNTIME or e.name in SYNC_OPS or "DtoH" in e.name]
    print(f"\nper step: {len(kernels) / per:.1f} kernels launched, {len(syncs) / per:.1f} host syncs "
          f"({', '.join(sorted({e.name for e in syncs})) or 'none'})")
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        us = e.device_time_total if device == "cuda" else e.self_cpu_time_total
        by_name.setdefault(e.name, []).append(us)
    print(f"\n{'kernel':70s} {'calls/step':>10s} {'us/call':>10s}")
    for name, times in sorted(by_name.items(), key=lambda kv: -sum(kv[1])):
        print(f"{name[:70]:70s} {len(times) / per:10.1f} {sum(times) / len(times):10.1f}")


def main() -> None:
    args = parse_args()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    work = loop_workload(args, device) if args.loop else step_workload(args, device)
    repeats = 1 if args.loop else args.steps
    with torch.no_grad():
        work()  # warm-up: lazy init, tables on the device
        common.synchronize(device)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(repeats):
                work()
            common.synchronize(device)
    print(f"{args.impl} {args.sampler} {'loop of ' + str(args.steps) + ' steps (' + args.model + ')' if args.loop else 'step ' + args.shape} "
          f"{args.dtype} on {common.device_name(device)}")
    sort = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=15))
    summarize(prof, device, per=args.steps)
    TRACE_DIR.mkdir(parents=True, exist_ok=True)
    kind = f"loop-{args.model}" if args.loop else "step"
    trace = TRACE_DIR / f"{args.impl}-{args.sampler}-{kind}-{device}.json"
    prof.export_chrome_trace(str(trace))
    print(f"\nChrome trace: {trace}")


if __name__ == "__main__":
    main()
