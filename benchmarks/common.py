"""What the pytest benchmark suites share: the results list, device names, CPU timing plans.

Method (DESIGN "Performance: how we measure"; BENCHMARKS.md "Method"):
- Bytes moved = the inputs a fused kernel must read once + the outputs it writes once
  (benchmarks/cases.py; noise made inside the kernel is not counted). The same number is used for
  every provider, so GB/s is an *effective* bandwidth.
- Copy bandwidth = bytes read + written by `dst.copy_(src)` of a buffer larger than the last-level
  cache, measured in the same session; every time is reported with its % of it.
- Every case checks its output against `fastdiff.reference` before it is timed.
- CPU: pytest-benchmark rounds (a call's time is its host time). GPU: kernel time from CUDA
  events (graph replays and back-to-back launches, inputs rotated past L2) and host time per
  call measured separately (benchmarks/timing.py, benchmarks/measure.py), never a host clock
  around a synchronize.
"""
from __future__ import annotations

import functools
import math
import time
from typing import Callable

import torch

from benchmarks import cases
from benchmarks import timing as TM
from benchmarks.measure import cpu_name

RESULTS: list[dict] = []  # filled by the suites, written by conftest.pytest_sessionfinish
SKIPPED: dict[str, str] = {}  # "provider" or "provider/op/dtype" -> why it was not measured


def device_name(device: str) -> str:
    return torch.cuda.get_device_name(device) if device.startswith("cuda") else cpu_name()


@functools.cache
def copy_bandwidth(device: str) -> float:
    """Bytes/s of dst.copy_(src) past the last-level cache (read + write), measured once per session."""
    return TM.measure_copy_gbps(device) * 1e9


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def warm_up(fn: Callable, min_calls: int = 3, min_seconds: float = 0.2, max_calls: int = 200) -> None:
    """Call `fn` until both `min_calls` calls and `min_seconds` have passed (lazy init, allocator, and the
    first slow calls of freshly compiled code, which on a 2-core machine can take 100x a warm call)."""
    start, calls = time.perf_counter(), 0
    while calls < min_calls or (time.perf_counter() - start < min_seconds and calls < max_calls):
        fn()
        calls += 1


def seconds_per_call(fn: Callable, repeats: int = 3) -> float:
    warm_up(fn)
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


def cpu_record(benchmark, case: cases.OpCase, provider: str, iterations: int) -> dict:
    """The result record of a pytest-benchmark CPU measurement (a call's time is its host time)."""
    stats = benchmark.stats.stats
    copy_gbps = copy_bandwidth(case.device) / 1e9
    gbps = TM.gbps(case.bytes_moved, stats.median)
    return {
        "op": case.name, "provider": provider, "size": case.size, "size_class": cases.SIZE_CLASS.get(case.size),
        "shape": list(case.shape), "numel": case.numel, "dtype": case.dtype_name, "device": case.device,
        "device_name": device_name(case.device), "bytes_moved": case.bytes_moved, "median_s": stats.median,
        "mean_s": stats.mean, "min_s": stats.min, "max_s": stats.max, "stddev_s": stats.stddev,
        "rounds": stats.rounds, "iterations": iterations, "host_s": stats.median, "gbps": gbps,
        "copy_gbps": copy_gbps, "pct_copy_bw": TM.pct_of(gbps, copy_gbps),
        "floor_s": TM.floor_seconds(case.bytes_moved, copy_gbps),
    }
