"""Launch benchmark op cases a few times each, for Nsight Compute to profile (hardware counters).

Each (provider, op, size, dtype) runs `--calls` times after one warm-up call (JIT compile, allocator),
in the order given, so `--launch-skip` / `--launch-count` or a kernel-name filter pick the launches.

    ncu --clock-control none --kernel-name regex:step_kernel --launch-skip 1 --launch-count 1 \\
        --section SpeedOfLight --section Occupancy --section WarpStateStats \\
        python benchmarks/ncu_ops.py --providers cpp_cuda --ops step/ddpm --sizes video
"""
from __future__ import annotations

import argparse
import pathlib
import sys

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import cases as C  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--providers", default="cpp_cuda,triton")
    parser.add_argument("--ops", default="step/ddpm")
    parser.add_argument("--sizes", default="video")
    parser.add_argument("--dtypes", default="fp32")
    parser.add_argument("--calls", type=int, default=2)
    parser.add_argument("--device", default="cuda", help="cuda; cpu only to try the script (provider cpp_cpu)")
    args = parser.parse_args(argv)
    split = lambda s: [v for v in s.split(",") if v]  # noqa: E731
    for provider in split(args.providers):
        for op in split(args.ops):
            for size in split(args.sizes):
                for dtype in split(args.dtypes):
                    case = C.OpCase(op, size, dtype, args.device)
                    with C.forced(provider):
                        run = case.call(provider)
                        run()  # warm-up: JIT compile, allocator
                        sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
                        sync()
                        for _ in range(args.calls):
                            run()
                        sync()
                    print(f"ran {provider} {op} {size} {dtype} x{args.calls + 1}", flush=True)


if __name__ == "__main__":
    main()
