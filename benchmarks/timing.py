"""Timing that measures what it says (DESIGN "Performance: how we measure").

Three numbers per GPU case, never a host clock around a synchronize for a kernel time:

- **kernel time**: the calls captured back to back in a CUDA graph (inputs rotated through enough
  sets that one pass moves more than twice the L2), the graph replayed between two CUDA events.
  What the device spends per call with no launch gaps: the number a CUDA-graph loop pays.
- **stream time**: the same rotation launched eagerly, back to back, between two CUDA events:
  max(device time, host issue time) per call, what an eager loop pays per call.
- **host time**: `perf_counter` around many calls issued without any synchronisation (the device
  is synchronised only outside the timed window), per call: the Python + launch cost.

On the CPU (no asynchrony) a call's time is its host time; the pytest suites time it with
pytest-benchmark. Every function here takes its clock / events / synchronisation as arguments,
so tests drive them with stubs (tests/test_gpu_check.py).
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional, Protocol, Sequence

COPY_FACTOR = 2  # rotated inputs total more than this many L2 caches


# ---- bandwidth math -------------------------------------------------------------------------------
def gbps(bytes_moved: float, seconds: float) -> float:
    """Effective bandwidth in GB/s (1e9 bytes) of moving `bytes_moved` in `seconds`."""
    if seconds <= 0:
        raise ValueError(f"seconds must be > 0, got {seconds!r}")
    return bytes_moved / seconds / 1e9


def pct_of(achieved_gbps: float, reference_gbps: float) -> float:
    """`achieved_gbps` as a percentage of `reference_gbps` (the measured copy bandwidth)."""
    if reference_gbps <= 0:
        raise ValueError(f"reference bandwidth must be > 0, got {reference_gbps!r}")
    return 100.0 * achieved_gbps / reference_gbps


def copy_gbps_from_time(nbytes: int, seconds: float) -> float:
    """Copy bandwidth of `dst.copy_(src)` over `nbytes`: bytes read + bytes written per second."""
    return gbps(2 * nbytes, seconds)


def floor_seconds(bytes_moved: float, copy_bandwidth_gbps: float) -> float:
    """The memory-bound floor of a case: its bytes at the measured copy bandwidth."""
    return bytes_moved / (copy_bandwidth_gbps * 1e9)


def rotation_sets(bytes_per_set: int, l2_bytes: int, factor: int = COPY_FACTOR, max_sets: int = 2048) -> int:
    """How many input sets to rotate through so that they total more than `factor` x L2 bytes.

    At least 2 (a set is never read twice in a row). Capped at `max_sets`; a capped rotation is
    reported (`rotation_covers_l2`), never silently treated as cold.
    """
    if bytes_per_set <= 0:
        raise ValueError(f"bytes_per_set must be > 0, got {bytes_per_set!r}")
    wanted = math.floor(factor * l2_bytes / bytes_per_set) + 1  # strictly more than factor x L2
    return max(2, min(max_sets, wanted))


def rotation_covers_l2(sets: int, bytes_per_set: int, l2_bytes: int, factor: int = COPY_FACTOR) -> bool:
    return sets * bytes_per_set > factor * l2_bytes


# ---- clocks ------------------------------------------------------------------------------------------
class Event(Protocol):
    def record(self) -> None: ...

    def synchronize(self) -> None: ...

    def elapsed_time(self, end: "Event") -> float: ...  # milliseconds, as torch.cuda.Event


def cuda_event_factory() -> Callable[[], Event]:
    import torch
    return lambda: torch.cuda.Event(enable_timing=True)


def cuda_synchronize(device=None) -> Callable[[], None]:
    import torch
    return lambda: torch.cuda.synchronize(device)


class HostEvent:
    """An Event on the host clock: what the CPU smoke run of gpu_check uses instead of CUDA events
    (on the CPU every call has finished when it returns)."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self.clock, self.t = clock, None

    def record(self) -> None:
        self.t = self.clock()

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, end: "HostEvent") -> float:
        return (end.t - self.t) * 1e3


# ---- device time of back-to-back calls ---------------------------------------------------------------
@dataclass
class Timing:
    """Per-call seconds of each timed window; `median_s` is what tables report."""
    per_call_s: list[float]
    calls_per_window: int

    @property
    def median_s(self) -> float:
        return statistics.median(self.per_call_s)

    @property
    def min_s(self) -> float:
        return min(self.per_call_s)

    @property
    def spread(self) -> float:
        """(max - min) / median of the windows: how far apart repeats of the same measurement are."""
        return (max(self.per_call_s) - min(self.per_call_s)) / self.median_s if self.median_s > 0 else 0.0


def time_back_to_back(calls: Sequence[Callable[[], object]], *, launches: int, repeats: int, warmup: int,
                      new_event: Callable[[], Event], synchronize: Callable[[], None]) -> Timing:
    """Events around `launches` back-to-back calls per window, rotating through `calls` (one per
    input set). The host never waits inside a window: the end event is waited on after it closes.
    """
    if not calls:
        raise ValueError("calls must hold at least one call")
    if launches < 1 or repeats < 1:
        raise ValueError(f"launches and repeats must be >= 1, got {launches} and {repeats}")
    n, k = len(calls), 0
    for _ in range(warmup):
        calls[k % n]()
        k += 1
    synchronize()
    per_call = []
    for _ in range(repeats):
        start, end = new_event(), new_event()
        start.record()
        for _ in range(launches):
            calls[k % n]()
            k += 1
        end.record()
        end.synchronize()
        per_call.append(start.elapsed_time(end) / 1e3 / launches)
    return Timing(per_call, launches)


def plan_launches(estimate_s: float, window_s: float = 0.01, low: int = 10, high: int = 2000) -> int:
    """Calls per timed window: about `window_s` of work, within [low, high]."""
    if estimate_s <= 0:
        return high
    return int(max(low, min(high, round(window_s / estimate_s))))


def time_graph(capture: Callable[[], Callable[[], None]], calls_in_graph: int, *, repeats: int,
               new_event: Callable[[], Event], synchronize: Callable[[], None]) -> Timing:
    """Kernel time per call from a graph holding `calls_in_graph` calls: its replays between events.

    `capture()` returns the graph's replay function (built by `capture_cuda_graph`).
    """
    replay = capture()
    timing = time_back_to_back([replay], launches=1, repeats=repeats, warmup=1, new_event=new_event,
                               synchronize=synchronize)
    return Timing([t / calls_in_graph for t in timing.per_call_s], calls_in_graph)


def capture_cuda_graph(calls: Sequence[Callable[[], object]], count: int, device) -> Callable[[], None]:
    """A CUDA graph of `count` calls rotating through `calls`, captured after a warm-up on a side stream."""
    import torch
    side = torch.cuda.Stream(device=device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for i in range(min(len(calls), 3)):
            calls[i]()
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.device(device), torch.cuda.graph(graph):
        for i in range(count):
            calls[i % len(calls)]()
    torch.cuda.synchronize(device)
    return graph.replay


# ---- host time ---------------------------------------------------------------------------------------
def host_time_per_call(call: Callable[[], object], *, calls: int, repeats: int, warmup: int = 2,
                       clock: Callable[[], float] = time.perf_counter,
                       synchronize: Callable[[], None] = lambda: None) -> Timing:
    """Host seconds per call: `clock` around `calls` calls issued without synchronising; the device
    is synchronised between windows only (outside the timed region), so queued work never waits.

    Keep calls x kernels per call under the launch queue's depth (~1000) so the host never blocks
    on a full queue: then this is the Python + launch cost alone.
    """
    for _ in range(warmup):
        call()
    synchronize()
    per_call = []
    for _ in range(repeats):
        start = clock()
        for _ in range(calls):
            call()
        per_call.append((clock() - start) / calls)
        synchronize()
    return Timing(per_call, calls)


def interleaved_host_times(calls: dict[str, Callable[[], object]], *, calls_per_window: int, rounds: int,
                           warmup: int = 3, clock: Callable[[], float] = time.perf_counter) -> dict[str, Timing]:
    """Host time per call of several providers, measured in alternating windows (A B C A B C ...),
    so a shared machine's load drifts hit every provider alike. Ratios come from one such run."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    per_call: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            start = clock()
            for _ in range(calls_per_window):
                call()
            per_call[name].append((clock() - start) / calls_per_window)
    return {name: Timing(times, calls_per_window) for name, times in per_call.items()}


# ---- copy bandwidth ---------------------------------------------------------------------------------
def measure_copy_gbps(device: str, *, nbytes: Optional[int] = None, repeats: int = 10,
                      new_event: Optional[Callable[[], Event]] = None,
                      synchronize: Optional[Callable[[], None]] = None) -> float:
    """Device-to-device (or host memcpy) copy bandwidth in GB/s, bytes read + written counted, over a
    buffer far larger than the last-level cache; CUDA events on a GPU, the host clock on the CPU."""
    import torch
    if nbytes is None:
        nbytes = 1 * 2**30 if device.startswith("cuda") else 512 * 2**20
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src).fill_(0.0)  # touched once: page faults of fresh memory are not timed
    if device.startswith("cuda"):
        new_event = new_event or cuda_event_factory()
        synchronize = synchronize or cuda_synchronize(device)
    else:
        new_event, synchronize = new_event or HostEvent, synchronize or (lambda: None)
    timing = time_back_to_back([lambda: dst.copy_(src)], launches=1, repeats=repeats, warmup=2,
                               new_event=new_event, synchronize=synchronize)
    return copy_gbps_from_time(nbytes, timing.median_s)
