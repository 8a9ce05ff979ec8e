"""Measure one op case for one provider: check first, then kernel / stream / host time (benchmarks/timing.py).

Used by `make gpu-check` (benchmarks/gpu_check.py) and by the pytest op suite on a GPU. On the
CPU (the smoke run of gpu_check) the same code runs with host-clock events and without graphs.
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from benchmarks import cases as C
from benchmarks import timing as TM


@dataclass
class DeviceInfo:
    """What every measurement on one device shares: its timers, L2 size and copy bandwidth."""
    device: str
    name: str
    l2_bytes: int
    copy_gbps: float
    new_event: Callable[[], TM.Event]
    synchronize: Callable[[], None]
    # (calls, count, device) -> replay: a CUDA graph of `count` rotated calls (a stub in CPU tests)
    capture: Callable = field(default=TM.capture_cuda_graph)

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")


def cpu_name() -> str:
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model} ({os.cpu_count()} cores, torch threads={torch.get_num_threads()})"


def device_info(device: str, copy_bytes: Optional[int] = None) -> DeviceInfo:
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(device)
        l2 = int(getattr(props, "L2_cache_size", 50 * 2**20))
        new_event, sync = TM.cuda_event_factory(), TM.cuda_synchronize(device)
        name = props.name
    else:
        l2, new_event, sync, name = 105 * 2**20, TM.HostEvent, (lambda: None), cpu_name()
    copy = TM.measure_copy_gbps(device, nbytes=copy_bytes, new_event=new_event, synchronize=sync)
    return DeviceInfo(device, name, l2, copy, new_event, sync)


def _estimate(call: Callable, sync: Callable[[], None]) -> float:
    """A rough per-call time (host clock around 3 calls and a sync) used only to size the windows, after a
    warm-up of >= 3 calls and >= 50 ms (freshly compiled code is slow on its first calls)."""
    start, calls = time.perf_counter(), 0
    while calls < 3 or (time.perf_counter() - start < 0.05 and calls < 100):
        call()
        calls += 1
    sync()
    start = time.perf_counter()
    for _ in range(3):
        call()
    sync()
    return (time.perf_counter() - start) / 3


def measure(case: C.OpCase, provider: str, info: DeviceInfo, *, quick: bool = False, graphs: bool = True,
            max_sets: int = 1024) -> dict:
    """Check `provider` on `case`, then time it. Returns a result record (times in seconds; every time
    next to its GB/s and % of the copy bandwidth measured on this device in the same run)."""
    with C.forced(provider):
        case.check(provider)
        sets_wanted = TM.rotation_sets(case.bytes_per_set, info.l2_bytes, max_sets=max_sets) if info.is_cuda else 1
        # memory guard: rotated sets stay under ~4 GiB (a 16M fp32 case needs 2 sets of ~320 MB)
        sets = max(1, min(sets_wanted, (4 * 2**30) // max(case.bytes_per_set, 1)))
        input_sets = case.input_sets(sets)
        calls = [case.call(provider, s) for s in input_sets]
        estimate = _estimate(calls[0], info.synchronize)
        window = 0.004 if quick else 0.01
        launches = TM.plan_launches(estimate, window_s=window, low=5 if quick else 10, high=max(20, min(2000, sets)))
        repeats = 3 if quick else 5
        stream = TM.time_back_to_back(calls, launches=launches, repeats=repeats, warmup=min(len(calls), 3),
                                      new_event=info.new_event, synchronize=info.synchronize)
        host = TM.host_time_per_call(calls[0], calls=20 if not quick else 10, repeats=repeats,
                                     synchronize=info.synchronize)
        kernel, graph_note = None, "CUDA graphs need a GPU" if not info.is_cuda else ""
        if info.is_cuda and graphs:
            # every rotated set at least once (up to 1000 calls), else 20 calls, fewer for huge sets: a
            # graph keeps its calls' temporaries (the eager reference's) alive in its pool
            in_graph = max(min(len(calls), 1000), min(20, max(4, (2 << 30) // max(case.bytes_per_set, 1))))
            try:
                kernel = TM.time_graph(lambda: info.capture(calls, in_graph, info.device), in_graph,
                                       repeats=repeats, new_event=info.new_event, synchronize=info.synchronize)
            except Exception as error:  # noqa: BLE001 - reported in the results, never silent
                graph_note = f"graph capture failed: {type(error).__name__}: {str(error)[:200]}"
                info.synchronize()
        elif info.is_cuda:
            graph_note = "graphs off (--no-graphs)"
    del input_sets, calls
    record = {
        "op": case.name, "provider": provider, "size": case.size, "size_class": C.SIZE_CLASS.get(case.size, case.size),
        "shape": list(case.shape), "numel": case.numel, "dtype": case.dtype_name, "device": info.device,
        "device_name": info.name, "bytes_moved": case.bytes_moved, "copy_gbps": info.copy_gbps,
        "floor_s": TM.floor_seconds(case.bytes_moved, info.copy_gbps),
        "rotation_sets": sets, "rotation_bytes": sets * case.bytes_per_set,
        "rotation_covers_l2": TM.rotation_covers_l2(sets, case.bytes_per_set, info.l2_bytes) if info.is_cuda else None,
        "stream_s": stream.median_s, "stream_spread": stream.spread, "launches_per_window": launches,
        "host_s": host.median_s, "host_spread": host.spread,
        "kernel_s": kernel.median_s if kernel else None, "kernel_spread": kernel.spread if kernel else None,
        "kernel_note": graph_note,
    }
    for key in ("kernel", "stream"):
        seconds = record[f"{key}_s"]
        if seconds:
            record[f"{key}_gbps"] = TM.gbps(case.bytes_moved, seconds)
            record[f"{key}_pct_copy"] = TM.pct_of(record[f"{key}_gbps"], info.copy_gbps)
    # the number tables lead with: device time per call (graph) where there is one, else stream time
    record["median_s"] = record["kernel_s"] or record["stream_s"]
    record["gbps"] = TM.gbps(case.bytes_moved, record["median_s"])
    record["pct_copy_bw"] = TM.pct_of(record["gbps"], info.copy_gbps)
    return record
