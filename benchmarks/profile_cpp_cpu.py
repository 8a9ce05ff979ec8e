"""CPU profile of the C++ DDPM step (fastdiff._C) against eager and compiled references.

    python benchmarks/profile_cpp_cpu.py [--sizes 1048576 16777216] [--repeat 5]

Rows, per size (fp32, 1-d samples of N elements in a batch of 1):
  eager      reference.ddpm_step with noise from torch.randn (what a plain PyTorch loop does)
  compile    torch.compile of that same function
  cpp_philox fastdiff._C ddpm_step drawing its noise in-kernel (Philox, one block per 4 elements)
  cpp_noise  fastdiff._C ddpm_step with the noise given as a tensor (reads x, eps, noise; writes prev)
  clone      torch.clone moving the same bytes as cpp_noise (2N read + 2N written = 4N floats)
Median of --repeat timed calls after warm-up; GB/s counts the bytes each row must move.
"""
import argparse
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # source checkout

import fastdiff
from fastdiff import _cpp, reference as R, schedules as S, tables as T


def timed(fn, repeat):
    fn()
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[1 << 20, 1 << 24])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    assert _cpp.unavailable_reason("cpu") is None, _cpp.unavailable_reason("cpu")
    abar = S.alphas_cumprod_from_betas(S.linear_betas(1000, 1e-4, 0.02))
    row = T.ddpm_table(abar, list(range(980, -1, -20)), "fixed_small")[500]

    def eager(model, sample):
        return R.ddpm_step(model, sample, row, noise=torch.randn_like(sample))[0]

    compiled = torch.compile(eager)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch threads {torch.get_num_threads()}, torch {torch.__version__}")
    print(f"{'N':>10} {'provider':>11} {'ms':>9} {'GB/s':>7} {'vs eager':>9}")
    for n in args.sizes:
        g = torch.Generator().manual_seed(0)
        model, sample, noise = (torch.randn(1, n, generator=g) for _ in range(3))
        stacked = torch.randn(1, 2 * n, generator=g)  # clone: reads 2N + writes 2N = cpp_noise's 4N
        rows = {
            "eager": (lambda: eager(model, sample), 3 * n),
            "compile": (lambda: compiled(model, sample), 3 * n),
            "cpp_philox": (lambda: _cpp.ddpm_step(model, sample, row, None, 1, 0, "epsilon", "fixed_small", None,
                                                  None, None, False), 3 * n),
            "cpp_noise": (lambda: _cpp.ddpm_step(model, sample, row, noise, 1, 0, "epsilon", "fixed_small", None,
                                                 None, None, False), 4 * n),
            "clone": (lambda: stacked.clone(), 4 * n),
        }
        base = None
        for name, (fn, floats) in rows.items():
            t = timed(fn, args.repeat)
            base = base or t
            print(f"{n:>10} {name:>11} {t * 1e3:9.3f} {floats * 4 / t / 1e9:7.2f} {base / t:8.2f}x")


if __name__ == "__main__":
    main()
