"""DDPM reverse step (epsilon, fixed_small, clip_sample=True, t=500 of 1000): read eps and x_t,
write x_{t-1} -> 3 x numel x element size bytes. Noise: torch.randn (eager, compile, diffusers)
or in-kernel Philox (fastdiff), so no provider is charged for reading a noise tensor it made."""
from __future__ import annotations

import torch

from benchmarks import common
from fastdiff import noise as N
from fastdiff import ops
from fastdiff import reference as R

GROUP = "ddpm_step"


def reference(inputs: dict, noise: torch.Tensor) -> torch.Tensor:
    return R.ddpm_step(inputs["model_output"], inputs["sample"], inputs["coefs"], clip_sample_range=1.0,
                       noise=noise)[0]


def provider_call(provider: str, inputs: dict):
    m, x, c = inputs["model_output"], inputs["sample"], inputs["coefs"]
    randn = lambda: torch.randn(x.shape, device=x.device, dtype=x.dtype)  # noqa: E731
    if provider == "eager":
        return lambda: R.ddpm_step(m, x, c, clip_sample_range=1.0, noise=randn())[0]
    if provider == "compile":
        step = common.compiled(lambda m, x, c, n: R.ddpm_step(m, x, c, clip_sample_range=1.0, noise=n)[0])
        return lambda: step(m, x, c, randn())
    if provider == "diffusers":
        from diffusers import DDPMScheduler
        scheduler = DDPMScheduler()  # clip_sample=True, fixed_small, epsilon: the fastdiff settings
        return lambda: scheduler.step(m, common.STEP_T, x).prev_sample
    return lambda: ops.ddpm_step(m, x, c, None, common.SEED, 0, "epsilon", "fixed_small", 1.0, None, None, False)[0]


def test_ddpm_step(benchmark, provider, size, dtype, device, quick):
    case = common.make_case(GROUP, provider, size, dtype, device, bytes_per_element=3)
    dt = common.DTYPES[dtype]
    inputs = {"model_output": common.randn(case.shape, dt, device, 1), "sample": common.randn(case.shape, dt, device, 2),
              "coefs": common.ddpm_row(device)}
    noise = common.provider_noise(provider, case.shape, dt, device, counter=common.STEP_T, stream=N.STREAM_STEP)
    with common.forced_backend(provider):
        call = provider_call(provider, inputs)
        common.check_case(call, reference, inputs, noise, f"{GROUP}/{provider}/{size}/{dtype}")
        common.run_case(benchmark, case, call, quick)
