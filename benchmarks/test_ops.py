"""The op suite: the generic step (ddpm, ddim, cfg+ddpm, multistep rows), q_sample and cfg, per
provider, size and dtype (benchmarks/cases.py). Each case is checked against the reference first.

CPU: pytest-benchmark times the call (its host time). GPU: benchmarks/measure.py times kernels with
CUDA events (graph replays and back-to-back launches over inputs rotated past L2) and the host
time per call separately; pytest-benchmark's own table then shows the host time per call.
"""
from __future__ import annotations

from benchmarks import cases, common


def test_op(benchmark, op, provider, size, dtype, device, quick, request):
    case = cases.OpCase(op, size, dtype, device)
    benchmark.group = f"{op} {size} {dtype}"
    if device == "cuda":
        from benchmarks import measure
        record = measure.measure(case, provider, request.getfixturevalue("gpu_info"), quick=quick)
        with cases.forced(provider):
            call = case.call(provider)
            benchmark.pedantic(call, rounds=5 if quick else 20, iterations=10, warmup_rounds=1)
    else:
        with cases.forced(provider):
            call = case.call(provider)
            case.check(provider, call)
            rounds, iterations = common.plan_rounds(common.seconds_per_call(call), quick)
            benchmark.pedantic(call, rounds=rounds, iterations=iterations, warmup_rounds=1)
        record = common.cpu_record(benchmark, case, provider, iterations)
    benchmark.extra_info.update({k: record[k] for k in ("bytes_moved", "gbps", "copy_gbps", "pct_copy_bw",
                                                        "device_name", "shape", "dtype", "provider")})
    common.RESULTS.append(record)
