"""Forward noising for training, x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps with per-sample t,
also returning eps (the loss target): read x0, write x_t and eps -> 3 x numel x element size bytes.
eager / compile / diffusers draw eps with torch.randn (as a training script does); fastdiff draws
it in-kernel (Philox) and writes it out."""
from __future__ import annotations

import torch

from benchmarks import common
from fastdiff import noise as N
from fastdiff import ops
from fastdiff import reference as R

GROUP = "q_sample"


def reference(inputs: dict, noise: torch.Tensor) -> torch.Tensor:
    return R.q_sample(inputs["x0"], inputs["timesteps"], inputs["alphas_cumprod"], noise)


def provider_call(provider: str, inputs: dict):
    x0, t, abar = inputs["x0"], inputs["timesteps"], inputs["alphas_cumprod"]
    randn = lambda: torch.randn(x0.shape, device=x0.device, dtype=x0.dtype)  # noqa: E731
    if provider == "eager":
        return lambda: R.q_sample(x0, t, abar, randn())
    if provider == "compile":
        q_sample = common.compiled(R.q_sample)
        return lambda: q_sample(x0, t, abar, randn())
    if provider == "diffusers":
        from diffusers import DDPMScheduler
        scheduler = DDPMScheduler()
        return lambda: scheduler.add_noise(x0, randn(), t)
    return lambda: ops.q_sample(x0, t, abar, None, common.SEED, 0, True, False)[0]


def test_q_sample(benchmark, provider, size, dtype, device, quick):
    case = common.make_case(GROUP, provider, size, dtype, device, bytes_per_element=3)
    dt = common.DTYPES[dtype]
    batch = case.shape[0]
    inputs = {"x0": common.randn(case.shape, dt, device, 1),
              "timesteps": torch.linspace(0, common.NUM_TRAIN_TIMESTEPS - 1, batch).long().to(device),
              "alphas_cumprod": common.alphas_cumprod(device)}
    noise = common.provider_noise(provider, case.shape, dt, device, counter=0, stream=N.STREAM_Q_SAMPLE)
    with common.forced_backend(provider):
        call = provider_call(provider, inputs)
        common.check_case(call, reference, inputs, noise, f"{GROUP}/{provider}/{size}/{dtype}")
        common.run_case(benchmark, case, call, quick)
