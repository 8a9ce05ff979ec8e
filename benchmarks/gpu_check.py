"""`make gpu-check`: every GPU check of fastdiff in one command, with committed-ready results (issue 9).

On a machine with an NVIDIA GPU and a preinstalled torch + triton (no network, possibly no
diffusers), from the source tree, in this order and each within its time budget:

  build    `python setup.py build_ext --inplace` with FASTDIFF_REQUIRE_CPP=1, for this GPU's arch
  tests    the `cuda`-marked tests (FASTDIFF_REQUIRE_CUDA_EXT=1), junit XML + log
  ops      op groups (benchmarks/cases.py) at 1x4x64x64, 1M and 16M elements, fp32 and bf16:
           Triton vs C++ CUDA vs eager reference vs torch.compile(reference) (+ diffusers, fp32):
           kernel time (CUDA-graph replays), stream time (eager launches between CUDA events),
           host time per call, GB/s and % of the device-to-device copy bandwidth measured here;
           inputs rotated past 2x L2 (benchmarks/timing.py, benchmarks/measure.py)
  e2e      sampling loops (benchmarks/test_e2e.py): diffusers, drop-in sampler, fastdiff.sample()
           per backend, with CUDA graphs (one-step and whole-loop capture)
  profile  one step and one loop under torch.profiler (kernels and launches per step, host syncs)
           and under torch.cuda.set_sync_debug_mode("error")

then writes benchmarks/results/<device>-<gpu>-<date>.{json,md}, updates BENCHMARKS.md's GPU
section (device, date, commit, versions) and prints a short summary table last. The whole run
stays under 9 minutes on one H100 (BUDGETS; a part that runs out of time or cannot run says why).
Without a GPU it says so in one line and exits with status 2 at once.

    make gpu-check                                   # = python benchmarks/gpu_check.py
    python benchmarks/gpu_check.py --out "$OUT"      # also copy the result files there (device tool)
    python benchmarks/gpu_check.py --import DIR      # here, after a device run: results -> benchmarks/results
                                                     #   and BENCHMARKS.md's GPU section
    python benchmarks/gpu_check.py --device cpu --smoke --out /tmp/x --doc /tmp/B.md   # CPU dry run (tests)

Missing wheels (diffusers has no GPU-machine install) travel in `.whl/`: they are installed into
build/site with `pip --no-index --no-deps` and put on the path before anything runs.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Callable, Optional

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TOTAL_BUDGET_S = 525.0  # < 9 min with Python start-up and the copy of results
BUDGETS = {"build": 200.0, "tests": 110.0, "ops": 135.0, "e2e": 55.0, "profile": 25.0}  # sum <= TOTAL_BUDGET_S
PARTS = tuple(BUDGETS)
OUT_ENV = "FASTDIFF_GPU_CHECK_OUT"
NO_GPU_EXIT = 2
FUSED_FIRST = ("triton", "cpp_cuda", "eager")  # the ops pass order: what decides the backend order first
SMOKE_SHAPE = (2, 4, 8, 8)


# ---- log + parts --------------------------------------------------------------------------------
class Log:
    """print() that also keeps every line for gpu-check.log (the device returns only the output's tail)."""

    def __init__(self):
        self.lines: list[str] = []

    def __call__(self, *parts) -> None:
        line = " ".join(str(p) for p in parts)
        self.lines.append(line)
        print(line, flush=True)


@dataclass
class Part:
    name: str
    status: str = "not run"  # ok | partial | failed | skipped | not run
    seconds: float = 0.0
    note: str = ""
    data: dict = field(default_factory=dict)


class Clock:
    """Budgets: a part may use its own budget plus whatever earlier parts left, never the later parts'."""

    def __init__(self, total: float, budgets: dict[str, float], now: Callable[[], float] = time.monotonic):
        self.now, self.start, self.total, self.budgets = now, now(), total, dict(budgets)

    def elapsed(self) -> float:
        return self.now() - self.start

    def allowed(self, part: str) -> float:
        later = list(self.budgets)[list(self.budgets).index(part) + 1:]
        return max(0.0, self.total - self.elapsed() - sum(self.budgets[p] for p in later))

    def deadline(self, part: str) -> float:
        return self.now() + self.allowed(part)


# ---- preflight ----------------------------------------------------------------------------------
DEVICE_NODES = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/dxg")  # Linux driver nodes; /dev/dxg: WSL


def no_gpu_reason(nodes=DEVICE_NODES) -> Optional[str]:
    """None when an NVIDIA GPU is usable through torch, else the one-line reason. Without any NVIDIA
    device node the answer comes before torch is imported (an instant refusal on CPU machines)."""
    if not any(os.path.exists(node) for node in nodes) and shutil.which("nvidia-smi") is None:
        return f"no NVIDIA device node ({', '.join(nodes)}) and no nvidia-smi"
    try:
        import torch
    except ImportError as error:
        return f"torch is not importable ({error})"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is built without CUDA (torch.cuda.is_available() is False)"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} sees no CUDA device (torch.cuda.is_available() is False)"
    if torch.version.hip is not None:
        return "this is a ROCm build of torch; gpu-check measures NVIDIA GPUs"
    return None


def install_wheels(wheels: pathlib.Path, target: pathlib.Path, log: Log) -> Optional[str]:
    """pip-install every wheel of `wheels` into `target` (no network, no deps) and put it on the path."""
    found = sorted(wheels.glob("*.whl")) if wheels.is_dir() else []
    if not found:
        return None
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
           "--upgrade", "--target", str(target), *map(str, found)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        return f"installing {len(found)} wheels from {wheels} failed: {result.stderr.strip()[-300:]}"
    sys.path.insert(0, str(target))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(target), str(ROOT), os.environ.get("PYTHONPATH", "")]).strip(
        os.pathsep)
    log(f"[wheels] installed {', '.join(p.name.split('-')[0] for p in found)} into {target}")
    return None


def environment(device: str) -> dict:
    import torch
    env = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
           "cpu_count": os.cpu_count()}
    for module in ("triton", "diffusers", "numpy"):
        try:
            env[module] = __import__(module).__version__
        except Exception as error:  # noqa: BLE001
            env[module] = f"not available ({type(error).__name__})"
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, capability=f"sm_{props.major}{props.minor}", sms=props.multi_processor_count,
                   memory_gib=round(props.total_memory / 2**30, 1),
                   l2_mib=round(getattr(props, "L2_cache_size", 0) / 2**20, 1), device_count=torch.cuda.device_count())
        env["nvcc"] = _run_text(["nvcc", "--version"]).splitlines()[-1:] or ["nvcc not found"]
        env["driver"] = _run_text(["nvidia-smi", "--query-gpu=driver_version,clocks.sm,clocks.mem,power.limit",
                                   "--format=csv,noheader"]).strip() or "nvidia-smi not available"
    return env


def _run_text(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


# ---- build --------------------------------------------------------------------------------------
def run_build(part: Part, deadline: float, out: pathlib.Path, log: Log) -> None:
    import torch
    env = dict(os.environ, FASTDIFF_REQUIRE_CPP="1", MAX_JOBS=str(os.cpu_count() or 8))
    if "TORCH_CUDA_ARCH_LIST" not in env:
        major, minor = torch.cuda.get_device_capability(0)
        env["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"  # this GPU only: a third of the nvcc time of three archs
    cmd = [sys.executable, "setup.py", "build_ext", "--inplace"]
    log(f"[build] {' '.join(cmd)} (FASTDIFF_REQUIRE_CPP=1, TORCH_CUDA_ARCH_LIST={env['TORCH_CUDA_ARCH_LIST']}, "
        f"MAX_JOBS={env['MAX_JOBS']}; budget {deadline - time.monotonic():.0f} s)")
    code, seconds, timed_out = run_logged(cmd, env, deadline, out / "build.log")
    if timed_out:
        part.status, part.note = "failed", f"the build ran past its budget ({seconds:.0f} s): see build.log"
        return
    check = subprocess.run([sys.executable, "-c", "from fastdiff import _cpp; print(_cpp.unavailable_reason('cuda') "
                            "or 'available')"], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    status = (check.stdout.strip().splitlines() or [check.stderr.strip()[-300:]])[-1]
    part.data.update(returncode=code, cuda_extension=status)
    if code == 0 and status == "available":
        part.status, part.note = "ok", f"fastdiff._C with CUDA ({env['TORCH_CUDA_ARCH_LIST']}) in {seconds:.0f} s"
    else:
        part.status = "failed"
        part.note = f"exit {code}; C++ CUDA backend: {status[:200]} (build.log)"


def run_logged(cmd: list[str], env: dict, deadline: float, log_path: pathlib.Path) -> tuple[int, float, bool]:
    """Run `cmd` in the repository root, output to `log_path`, killed (its process group) at `deadline`."""
    start = time.monotonic()
    with open(log_path, "w") as handle:
        handle.write(f"$ {' '.join(cmd)}\n")
        handle.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            return code, time.monotonic() - start, False
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)
            proc.wait()
            handle.write(f"\n[gpu-check] killed at its budget after {time.monotonic() - start:.0f} s\n")
            return -9, time.monotonic() - start, True


# ---- cuda tests ---------------------------------------------------------------------------------
def pytest_command(junit: pathlib.Path, per_test_timeout: int = 120) -> list[str]:
    # --continue-on-collection-errors: a test module that cannot import (diffusers missing, a file mid-
    # rewrite) is reported as an error without stopping every other module's cuda tests
    cmd = [sys.executable, "-m", "pytest", "tests/", "-m", "cuda", "-q", "-rfE", "-p", "no:cacheprovider",
           "--continue-on-collection-errors", f"--junitxml={junit}"]
    if _importable("xdist"):
        # 4 workers: Triton JIT compiles in parallel; the >2^31-element tests of two files (~25 GB each)
        # may meet on one GPU, more would not fit
        cmd += ["-n", str(max(2, min(4, (os.cpu_count() or 4) // 2))), "--dist", "loadfile"]
    if _importable("pytest_timeout"):
        cmd += [f"--timeout={per_test_timeout}"]
    return cmd


def _importable(module: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(module) is not None


def parse_junit(path: pathlib.Path) -> dict:
    """Counts, failed tests (with the first line of why) and skip reasons of a pytest junit XML."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed, skips = [], {}
    for suite in suites:
        for key in counts:
            counts[key] += int(suite.get(key, 0))
        for case in suite.iter("testcase"):
            name = f"{case.get('classname', '')}::{case.get('name', '')}"
            for tag in ("failure", "error"):
                node = case.find(tag)
                if node is not None:
                    failed.append(f"{name}: {(node.get('message') or '').splitlines()[0][:160] if node.get('message') else tag}")
            skip = case.find("skipped")
            if skip is not None:
                reason = (skip.get("message") or "").splitlines()[0][:160] if skip.get("message") else "skipped"
                skips[reason] = skips.get(reason, 0) + 1
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {"counts": counts, "failed": failed, "skip_reasons": skips}


PROGRESS = re.compile(r"^([.sFExX]+)\s*(\[\s*\d+%\])?$")


def progress_counts(log_text: str) -> dict:
    """Counts from pytest's -q progress characters (what is left when a run is killed before its report)."""
    chars = "".join(m.group(1) for m in map(PROGRESS.match, log_text.splitlines()) if m)
    return {"passed": chars.count("."), "failed": chars.count("F"), "errors": chars.count("E"),
            "skipped": chars.count("s"), "xfailed": chars.count("x") + chars.count("X")}


def run_tests(part: Part, deadline: float, out: pathlib.Path, log: Log) -> None:
    junit = out / "cuda-tests.xml"
    cmd = pytest_command(junit)
    env = dict(os.environ, FASTDIFF_REQUIRE_CUDA_EXT="1", PYTHONUNBUFFERED="1")
    log(f"[tests] {' '.join(cmd[2:])} (FASTDIFF_REQUIRE_CUDA_EXT=1; budget {deadline - time.monotonic():.0f} s)")
    code, seconds, timed_out = run_logged(cmd, env, deadline, out / "cuda-tests.log")
    if not junit.exists():
        part.status = "failed"
        so_far = progress_counts((out / "cuda-tests.log").read_text(errors="replace"))
        part.data["counts_so_far"] = so_far
        counted = ", ".join(f"{n} {k}" for k, n in so_far.items() if n)
        part.note = (f"killed at its budget after {seconds:.0f} s; so far: {counted or 'nothing reported'}"
                     if timed_out else f"pytest exit {code} without a report ({counted}): see cuda-tests.log")
        return
    result = parse_junit(junit)
    part.data.update(result, returncode=code)
    c = result["counts"]
    part.note = (f"{c['passed']} passed, {c['failures']} failed, {c['errors']} errors, {c['skipped']} skipped "
                 f"in {seconds:.0f} s")
    part.status = "ok" if code == 0 and not result["failed"] else "failed"
    for line in result["failed"][:20]:
        log(f"[tests] FAILED {line}")


# ---- op benchmarks ------------------------------------------------------------------------------
def op_plan(ops, sizes, dtypes, providers, device: str) -> list[tuple[str, str, str, str]]:
    """(provider, op, dtype, size) in the order they are measured: the fused backends and eager first (they
    decide the backend order), then torch.compile (one compile per op and dtype and shape), then diffusers."""
    plan = []
    first = [p for p in FUSED_FIRST if p in providers]
    for op in ops:
        for dtype in dtypes:
            for size in sizes:
                plan += [(p, op, dtype, size) for p in first]
    rest = [p for p in providers if p not in first]
    for provider in rest:
        for op in ops:
            for dtype in dtypes:
                for size in sizes:
                    plan.append((provider, op, dtype, size))
    return plan


def run_ops(part: Part, deadline: float, args, info, log: Log, results: list, skipped: dict) -> None:
    from benchmarks import cases as C
    from benchmarks import measure as M
    import torch
    plan = op_plan(args.ops, args.sizes, args.dtypes, args.providers, info.device)
    done = failed = 0
    log(f"[ops] {len(plan)} cases (copy bandwidth {info.copy_gbps:.1f} GB/s, L2 {info.l2_bytes / 2**20:.0f} MiB; "
        f"budget {deadline - time.monotonic():.0f} s)")
    for i, (provider, op, dtype, size) in enumerate(plan):
        spec = C.SPECS[op]
        reason = C.skip_reason(provider, info.device.split(":")[0], spec, dtype)
        if reason:
            skipped[f"{provider} {op} {dtype}"] = reason
            continue
        if time.monotonic() > deadline:
            left = [p for p in plan[i:] if not C.skip_reason(p[0], info.device.split(":")[0], C.SPECS[p[1]], p[2])]
            for p in left:
                skipped[f"{p[0]} {p[1]} {p[2]} {p[3]}"] = "the ops part ran out of its time budget"
            part.data["out_of_time"] = len(left)
            log(f"[ops] out of time: {len(left)} cases not measured (listed under 'Not measured')")
            break
        shape = SMOKE_SHAPE if args.smoke else None
        start = time.monotonic()
        try:
            case = C.OpCase(op, size, dtype, info.device, shape=shape)
            record = M.measure(case, provider, info, quick=args.smoke)
            done += 1
        except Exception as error:  # noqa: BLE001 - a failing case is a result, the run goes on
            failed += 1
            record = {"op": op, "provider": provider, "size": size, "dtype": dtype, "device": info.device,
                      "shape": list(shape or C.SIZES[size]), "numel": 0, "device_name": info.name,
                      "error": f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"}
            log(f"[ops] FAILED {provider} {op} {size} {dtype}: {record['error']}")
            if args.verbose:
                traceback.print_exc()
        finally:
            if info.device.startswith("cuda"):
                torch.cuda.empty_cache()
        results.append(record)
        if not record.get("error"):
            log(f"[ops] {provider:9s} {op:15s} {size:13s} {dtype}: kernel {_us(record.get('kernel_s'))} "
                f"stream {_us(record['stream_s'])} host {_us(record['host_s'])} "
                f"{record['pct_copy_bw']:.0f}% copy ({time.monotonic() - start:.1f} s)")
    part.data.update(measured=done, failed=failed)
    part.status = "failed" if failed and not done else ("partial" if failed or part.data.get("out_of_time") else "ok")
    part.note = f"{done} cases measured, {failed} failed" + (
        f", {part.data['out_of_time']} out of time" if part.data.get("out_of_time") else "")


def _us(seconds: Optional[float]) -> str:
    return "-" if not seconds else (f"{seconds * 1e6:.1f}us" if seconds < 1e-2 else f"{seconds * 1e3:.1f}ms")


# ---- end to end ---------------------------------------------------------------------------------
E2E_SETUPS = (("mlp2d", "ddpm", 1000), ("unet28", "ddim", 50))  # issue 10's two targets
E2E_LOOPS = ("diffusers", "fastdiff-sampler", "fastdiff-loop", "fastdiff-graph", "fastdiff-graph-loop")
SMOKE_E2E_LOOPS = ("diffusers", "fastdiff-loop", "fastdiff-graph")  # the CPU dry run: the graph loop says why not


def run_e2e(part: Part, deadline: float, args, device: str, log: Log, results: list, skipped: dict) -> None:
    from benchmarks import cases as C
    from benchmarks import test_e2e as E
    from fastdiff import backends
    done = failed = 0
    fused = [b for b in ("triton", "cpp") if backends.unavailable_reason(b, device) is None
             and C.engine_signature_reason(b, "step") is None] if device.startswith("cuda") else [None]
    for model_name, kind, steps in E2E_SETUPS:
        steps = min(steps, 3) if args.smoke else steps
        loops = []
        for loop in (SMOKE_E2E_LOOPS if args.smoke else E2E_LOOPS):
            reason = E.loop_reason(loop, device)
            if reason:
                skipped[f"e2e {loop} {model_name} {kind}"] = reason
            else:
                loops.append(loop)
        if time.monotonic() > deadline:
            skipped[f"e2e {model_name} {kind}{steps}"] = "the e2e part ran out of its time budget"
            part.data["out_of_time"] = part.data.get("out_of_time", 0) + 1
            continue
        try:
            records = E.measure_setup(model_name, kind, steps, device, loops, rounds=1 if args.smoke else 3,
                                      fused_backends=fused or [None], log=log)
            for record in records:
                if record.get("error"):
                    failed += 1
                    log(f"[e2e] FAILED {model_name} {kind}{steps} {record['provider']}: {record['error']}")
                    continue
                record["backend"] = record["provider"].partition("[")[2].rstrip("]") or _default_backend(device)
                log(f"[e2e] {model_name} {kind}{steps} {record['provider']:28s} {record['median_s'] * 1e3:9.2f} ms "
                    f"(host {record['host_per_step_s'] * 1e6:.1f} us/step, sampler share "
                    f"{100 * record['sampler_share']:.0f}%)")
            results.extend(records)
            done += sum(not r.get("error") for r in records)
        except Exception as error:  # noqa: BLE001
            failed += 1
            results.append({"op": "e2e", "provider": "all loops", "model": model_name, "sampler": f"{kind}{steps}",
                            "steps": steps, "device": device, "error": f"{type(error).__name__}: {error}"[:300]})
            log(f"[e2e] FAILED {model_name} {kind}{steps}: {type(error).__name__}: {error}")
            if args.verbose:
                traceback.print_exc()
    part.data.update(measured=done, failed=failed)
    part.status = "failed" if failed and not done else ("partial" if failed or part.data.get("out_of_time") else "ok")
    part.note = f"{done} loops measured, {failed} failed" + (
        f", {part.data['out_of_time']} out of time" if part.data.get("out_of_time") else "")


def _default_backend(device: str) -> str:
    import torch

    from fastdiff import backends
    try:
        name = backends.select("step", torch.empty(0, device=device)).__name__
    except Exception as error:  # noqa: BLE001
        return f"none ({error})"
    return {"fastdiff.kernels": "triton", "fastdiff._cpp": "cpp", "fastdiff.eager": "reference"}.get(name, name)


# ---- profile ------------------------------------------------------------------------------------
def run_profile(part: Part, deadline: float, args, device: str, log: Log) -> None:
    import torch

    from benchmarks import cases as C
    from benchmarks import profile_step as P
    from fastdiff import backends
    shape = SMOKE_SHAPE if args.smoke else (1, 4, 64, 64)
    steps = 4 if args.smoke else 10
    rows, problems = [], []

    def add(what: str, work, per: int, repeats: int, backend=None, check_sync=True) -> None:
        if time.monotonic() > deadline:
            rows.append({"what": what, "error": "the profile part ran out of its time budget"})
            return
        try:
            with backends.forced(backend):
                summary, _ = P.profile_work(work, device, repeats=repeats, per=per)
                summary["sync_debug"] = P.sync_debug(work, device) if check_sync else "not checked"
            summary["what"] = what
            rows.append(summary)
            log(f"[profile] {what}: {summary['kernels_per_step']:.1f} kernels/step, "
                f"{summary['launch_calls_per_step']:.1f} launches/step, {summary['syncs_per_step']:.1f} syncs/step "
                f"({', '.join(summary['sync_names']) or 'none'}); sync debug: {summary['sync_debug']}")
        except Exception as error:  # noqa: BLE001
            rows.append({"what": what, "error": f"{type(error).__name__}: {error}"[:300]})
            problems.append(what)
            log(f"[profile] FAILED {what}: {type(error).__name__}: {error}")

    fused = [b for b in ("triton", "cpp") if backends.unavailable_reason(b, device) is None
             and C.engine_signature_reason(b, "step") is None] if device.startswith("cuda") else []
    for backend in fused or [None]:
        add(f"DDPMSampler.step {'x'.join(map(str, shape))} fp32, seed, out= [{backend or _default_backend(device)}]",
            P.step_workload("ddpm", "fastdiff", shape, torch.float32, device), per=20, repeats=20, backend=backend)
    for graph in ((False, True, "loop") if device.startswith("cuda") else (False,)):
        add(f"fastdiff.sample unet28 ddim{steps}, cuda_graph={graph!r}",
            P.loop_workload("ddim", "fastdiff", "unet28", steps, device, graph), per=steps, repeats=1)
    if C.skip_reason("diffusers", "cpu") is None:
        add(f"diffusers DDPMScheduler.step {'x'.join(map(str, shape))} fp32",
            P.step_workload("ddpm", "diffusers", shape, torch.float32, device), per=20, repeats=20)
        add(f"diffusers loop unet28 ddim{steps}", P.loop_workload("ddim", "diffusers", "unet28", steps, device),
            per=steps, repeats=1)
    else:
        rows.append({"what": "diffusers step and loop", "error": f"skipped: {C.skip_reason('diffusers', 'cpu')}"})
    if device.startswith("cuda"):
        add("steps only (set_timesteps before), DDIM eta=1 seed, device timesteps", _step_loop_only(device), per=steps,
            repeats=1)
    part.data["rows"] = rows
    part.status = "ok" if not problems else ("failed" if len(problems) == len(rows) else "partial")
    part.note = f"{len(rows) - len(problems)} profiles" + (f", failed: {', '.join(problems)}" if problems else "")


def _step_loop_only(device: str):
    """The steps of a loop without its setup: set_timesteps (which uploads the table: a blocking copy)
    runs first, then model + step per device timestep, which must not synchronise."""
    import torch

    import fastdiff
    from benchmarks.models import make_model
    model, shape = make_model("unet28", device)
    sampler = fastdiff.DDIMSampler()
    x0 = torch.randn(shape, device=device)

    def setup():
        sampler.set_timesteps(10, device=device)

    setup()

    def steps():
        x = x0.clone()
        for t in sampler.timesteps:
            sampler.step(model(x, t.expand(shape[0])), t, x, eta=1.0, seed=7, out=x)
        return x
    return steps


# ---- results ------------------------------------------------------------------------------------
def summary_lines(parts: dict[str, Part], meta: dict, results: list[dict]) -> list[str]:
    """The short table printed last."""
    from benchmarks import save_results as S
    lines = [f"== gpu-check summary: {meta.get('device_name')} ({meta.get('capability', '')}) · torch {meta.get('torch')} "
             f"· triton {meta.get('triton')} · diffusers {meta.get('diffusers')} · commit {meta.get('git_commit', '')[:12]}",
             f"{'part':8s} {'status':8s} {'time':>7s}  note"]
    for part in parts.values():
        lines.append(f"{part.name:8s} {part.status:8s} {part.seconds:6.0f}s  {part.note}")
    if meta.get("copy_gbps"):
        lines.append(f"copy bandwidth (device-to-device, read + write): {meta['copy_gbps']:.0f} GB/s")
    ops = [r for r in results if r.get("op") in S.OP_ORDER and not r.get("error")]
    if ops:
        largest = max(r["numel"] for r in ops)
        lines.append(f"ops at {largest:,} elements, kernel time (% copy bw) [stream time]:")
        for op in S.OP_ORDER:
            for dtype in ("fp32", "bf16"):
                cells = [f"{r['provider']} {_us(r['median_s'])} ({r['pct_copy_bw']:.0f}%) [{_us(r['stream_s'])}]"
                         for r in ops if r["op"] == op and r["dtype"] == dtype and r["numel"] == largest]
                if cells:
                    lines.append(f"  {op:15s} {dtype}: " + "; ".join(cells))
    if meta.get("device") == "cuda":
        order = S.backend_order(results)
        if order["classes"]:
            cells = [f"{s}: {v['default']} (C++/Triton stream {v['cpp_over_triton_stream']:.2f}, kernel "
                     f"{v.get('cpp_over_triton_kernel', float('nan')):.2f})" for s, v in order["classes"].items()]
            lines.append("backend order: " + "; ".join(cells))
            if order["size_rule"]:
                r = order["size_rule"]
                lines.append(f"  -> size rule: {r['below']} below {r['threshold_numel']:,} elements, {r['at_or_above']} above")
        else:
            lines.append("backend order: not decided (Triton and C++ CUDA not both measured)")
    e2e = [r for r in results if r.get("op") == "e2e" and not r.get("error")]
    for setup in sorted({(r["model"], r["sampler"]) for r in e2e}):
        rows = {r["provider"]: r for r in e2e if (r["model"], r["sampler"]) == setup}
        base = rows.get("diffusers")
        cells = [f"{name} {_us(r['median_s'])}" + (f" ({base['median_s'] / r['median_s']:.2f}x)" if base else "")
                 for name, r in rows.items()]
        lines.append(f"e2e {setup[0]} {setup[1]}: " + "; ".join(cells))
    skipped = meta.get("skipped") or {}
    if skipped:
        reasons: dict[str, int] = {}
        for why in skipped.values():
            reasons[why] = reasons.get(why, 0) + 1
        lines.append(f"not measured: {len(skipped)} cases/loops; why: " +
                     "; ".join(f"{why} (x{n})" for why, n in sorted(reasons.items(), key=lambda kv: -kv[1])[:6]))
    for row in parts.get("profile", Part("profile")).data.get("rows", []):
        if row.get("error"):
            lines.append(f"profile {row['what']}: {row['error']}")
        else:
            lines.append(f"profile {row['what']}: {row['kernels_per_step']:.1f} kernels/step, "
                         f"{row['syncs_per_step']:.1f} syncs/step; sync debug: {row['sync_debug']}")
    return lines


def write_results(args, parts: dict[str, Part], env: dict, results: list[dict], skipped: dict, info,
                  log: Log) -> tuple[dict, list[pathlib.Path]]:
    from benchmarks import save_results as S
    extra = {"device": info.device.split(":")[0] if info else args.device, "environment": env,
             "capability": env.get("capability"), "parts": {k: vars(p) for k, p in parts.items()},
             "parts_md": "\n".join(["| part | status | time | note |", "|---|---|---|---|"] +
                                   [f"| {p.name} | {p.status} | {p.seconds:.0f} s | {p.note} |" for p in parts.values()]),
             "gpu_check": True, "smoke": args.smoke}
    tests = parts.get("tests")
    if tests and tests.data.get("counts"):
        c = tests.data["counts"]
        extra["tests_md"] = (f"{c['passed']} passed, {c['failures']} failed, {c['errors']} errors, {c['skipped']} "
                             "skipped (`pytest -m cuda tests/`, FASTDIFF_REQUIRE_CUDA_EXT=1)" +
                             "".join(f"\n- failed: {f}" for f in tests.data["failed"][:30]) +
                             "".join(f"\n- skipped x{n}: {why}" for why, n in tests.data["skip_reasons"].items()))
    profile = parts.get("profile")
    if profile and profile.data.get("rows"):
        extra["profile_md"] = "\n".join(
            ["| what | kernels / step | launch calls / step | host syncs / step | sync debug 'error' |",
             "|---|---|---|---|---|"] +
            [(f"| {r['what']} | failed: {r['error']} | | | |" if r.get("error") else
              f"| {r['what']} | {r['kernels_per_step']:.1f} | {r['launch_calls_per_step']:.1f} | "
              f"{r['syncs_per_step']:.1f} ({', '.join(r['sync_names']) or 'none'}) | {r['sync_debug']} |")
             for r in profile.data["rows"]])
    meta = S.metadata(results, quick=args.smoke, skipped=skipped, **extra)
    if info is not None:
        meta["copy_gbps"], meta["device_name"], meta["l2_bytes"] = info.copy_gbps, info.name, info.l2_bytes
    data = {"meta": meta, "results": results}
    out_dirs = [args.results_dir] + ([args.out] if args.out else [])
    json_path, md_path = S.write(data, out_dirs)
    written = [json_path, md_path]
    if args.doc and not args.no_doc:
        try:
            S.update_doc(args.doc, data, block="cuda" if meta["device"] == "cuda" else "cpu-gpu-check")
            written.append(args.doc)
            if args.out and args.doc.resolve() != (args.out / args.doc.name).resolve():
                shutil.copy(args.doc, args.out / args.doc.name)
        except (SystemExit, Exception) as error:  # noqa: BLE001 - the results files are written; keep the log
            log(f"[results] {args.doc} not updated: {type(error).__name__}: {error}")
    return data, written


def import_results(source: pathlib.Path, doc: pathlib.Path, results_dir: pathlib.Path) -> int:
    """Here, after a device run: copy its results JSON + MD into benchmarks/results/ and refresh the GPU
    section of BENCHMARKS.md from the JSON (never copies the device's whole BENCHMARKS.md over ours)."""
    from benchmarks import save_results as S
    paths = sorted(source.glob("*.json")) if source.is_dir() else [source]
    paths = [p for p in paths if p.name != "cuda-tests.json" and _is_results(p)]
    if not paths:
        print(f"gpu-check --import: no results JSON in {source}", file=sys.stderr)
        return 1
    path = max(paths, key=lambda p: p.stat().st_mtime)
    data = json.loads(path.read_text())
    results_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, results_dir / path.name)
    md = path.with_suffix(".md")
    (results_dir / md.name).write_text(md.read_text() if md.exists() else S.markdown(data))
    S.update_doc(doc, data, block="cuda")
    print(f"imported {path.name} into {results_dir} and refreshed the GPU section of {doc}")
    return 0


def _is_results(path: pathlib.Path) -> bool:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "meta" in data and "results" in data


# ---- main ---------------------------------------------------------------------------------------
def parse_args(argv=None):
    from benchmarks import cases as C
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=pathlib.Path, default=os.environ.get(OUT_ENV) or os.environ.get("OUT") or None,
                        help=f"also write the result files here (default: ${OUT_ENV}, else $OUT)")
    parser.add_argument("--results-dir", type=pathlib.Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--doc", type=pathlib.Path, default=None,
                        help="markdown file whose results block is refreshed (default on a GPU: BENCHMARKS.md, "
                             "block results:cuda; the CPU dry run: none, block results:cpu-gpu-check)")
    parser.add_argument("--no-doc", action="store_true", help="leave the doc alone")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (a dry run of the pipeline: --smoke)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, few steps, one repeat (tests of this script)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {','.join(PARTS)}")
    parser.add_argument("--ops", default=",".join(C.OP_ORDER))
    parser.add_argument("--sizes", default=",".join(C.GPU_SIZES))
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--providers", default="triton,cpp_cuda,eager,compile,diffusers",
                        help=f"comma list of {','.join(C.PROVIDERS)}")
    parser.add_argument("--budget", type=float, default=TOTAL_BUDGET_S, help="total seconds (parts scale with it)")
    parser.add_argument("--wheels", type=pathlib.Path, default=ROOT / ".whl",
                        help="wheels installed (no network, no deps) before anything runs, if any")
    parser.add_argument("--import", dest="import_from", type=pathlib.Path,
                        help="no measuring: import a device run's results (a folder or JSON) here")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    if args.doc is None and (args.device.startswith("cuda") or args.import_from):
        args.doc = ROOT / "BENCHMARKS.md"
    split = lambda s: [v.strip() for v in s.split(",") if v.strip()]  # noqa: E731
    args.parts, args.ops, args.sizes = split(args.parts), split(args.ops), split(args.sizes)
    args.dtypes, args.providers = split(args.dtypes), split(args.providers)
    for name, values, allowed in (("--parts", args.parts, PARTS), ("--ops", args.ops, C.OP_ORDER),
                                  ("--sizes", args.sizes, C.SIZES), ("--dtypes", args.dtypes, C.DTYPES),
                                  ("--providers", args.providers, C.PROVIDERS)):
        unknown = [v for v in values if v not in allowed]
        if unknown:
            parser.error(f"{name}: unknown {unknown}; allowed: {list(allowed)}")
    return args


def main(argv=None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    if "--device" not in raw and not any(a.startswith("--device=") for a in raw) and not any(
            a.startswith("--import") for a in raw):
        reason = no_gpu_reason()  # before any other import: no GPU -> one line, at once
        if reason:
            print(f"gpu-check: no NVIDIA GPU here: {reason}. Nothing was run.")
            return NO_GPU_EXIT
    args = parse_args(raw)
    if args.import_from:
        return import_results(args.import_from, args.doc, args.results_dir)
    if args.device.startswith("cuda"):
        reason = no_gpu_reason()
        if reason:
            print(f"gpu-check: no NVIDIA GPU here: {reason}. Nothing was run.")
            return NO_GPU_EXIT
    log = Log()
    scale = args.budget / TOTAL_BUDGET_S
    clock = Clock(args.budget, {k: v * scale for k, v in BUDGETS.items()})
    out = args.out or (ROOT / "build" / "gpu-check")
    out.mkdir(parents=True, exist_ok=True)
    args.out = out if args.out else None
    logs_dir = out
    problem = install_wheels(args.wheels, ROOT / "build" / "site", log)
    if problem:
        log(f"[wheels] {problem}")
    env = environment(args.device)
    log(f"gpu-check on {env.get('gpu', args.device)} ({env.get('capability', '')}): torch {env['torch']} "
        f"(CUDA {env['cuda']}), triton {env['triton']}, diffusers {env['diffusers']}, Python {env['python']}; "
        f"budget {args.budget:.0f} s")
    parts = {name: Part(name) for name in PARTS}
    results: list[dict] = []
    skipped: dict[str, str] = {}
    info = None
    for name in PARTS:
        part = parts[name]
        if name not in args.parts:
            part.status, part.note = "skipped", "not asked for (--parts)"
            continue
        if not args.device.startswith("cuda") and name in ("build", "tests"):
            part.status, part.note = "skipped", "CPU dry run: the CUDA build and the cuda tests need a GPU"
            continue
        deadline = clock.deadline(name)
        if deadline - time.monotonic() < 5:
            part.status, part.note = "skipped", f"no time left ({clock.elapsed():.0f} s of {args.budget:.0f} s used)"
            continue
        start = time.monotonic()
        try:
            if name == "build":
                run_build(part, deadline, logs_dir, log)
            elif name == "tests":
                run_tests(part, deadline, logs_dir, log)
            else:
                if info is None:
                    from benchmarks import measure as M
                    info = M.device_info(args.device, copy_bytes=64 * 2**20 if args.smoke else None)
                    env["copy_gbps"] = info.copy_gbps
                if name == "ops":
                    run_ops(part, deadline, args, info, log, results, skipped)
                elif name == "e2e":
                    run_e2e(part, deadline, args, args.device, log, results, skipped)
                else:
                    run_profile(part, deadline, args, args.device, log)
        except Exception as error:  # noqa: BLE001 - one broken part must not lose the others' results
            part.status, part.note = "failed", f"{type(error).__name__}: {str(error)[:300]}"
            log(f"[{name}] FAILED: {part.note}")
            log(traceback.format_exc())
        part.seconds = time.monotonic() - start
        log(f"[{name}] {part.status} in {part.seconds:.0f} s: {part.note}")
    data, written = write_results(args, parts, env, results, skipped, info, log)
    log(f"[results] {', '.join(str(p) for p in written)}" + (f" (+ copies in {args.out})" if args.out else ""))
    log(f"[time] {clock.elapsed():.0f} s in all (budget {args.budget:.0f} s)")
    lines = summary_lines(parts, data["meta"], results)
    (out / "gpu-check.log").write_text("\n".join(log.lines + [""] + lines) + "\n")
    print("\n" + "\n".join(lines), flush=True)
    failed = [p for p in parts.values() if p.status == "failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
