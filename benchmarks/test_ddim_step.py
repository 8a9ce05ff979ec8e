"""DDIM step (epsilon, eta=0, clip_sample=True, t=500 of a 50-step schedule): read eps and x_t,
write x_prev -> 3 x numel x element size bytes. Deterministic (eta=0): no noise anywhere."""
from __future__ import annotations

import torch

from benchmarks import common
from fastdiff import ops
from fastdiff import reference as R

GROUP = "ddim_step"


def reference(inputs: dict, noise: torch.Tensor | None) -> torch.Tensor:
    return R.ddim_step(inputs["model_output"], inputs["sample"], inputs["coefs"], clip_sample_range=1.0)[0]


def provider_call(provider: str, inputs: dict):
    m, x, c = inputs["model_output"], inputs["sample"], inputs["coefs"]
    if provider == "eager":
        return lambda: R.ddim_step(m, x, c, clip_sample_range=1.0)[0]
    if provider == "compile":
        step = common.compiled(lambda m, x, c: R.ddim_step(m, x, c, clip_sample_range=1.0)[0])
        return lambda: step(m, x, c)
    if provider == "diffusers":
        from diffusers import DDIMScheduler
        scheduler = DDIMScheduler()  # clip_sample=True, set_alpha_to_one=True, epsilon
        scheduler.set_timesteps(common.DDIM_STEPS)
        return lambda: scheduler.step(m, common.STEP_T, x, eta=0.0).prev_sample
    return lambda: ops.ddim_step(m, x, c, None, common.SEED, 0, "epsilon", 0.0, False, 1.0, None, None, False)[0]


def test_ddim_step(benchmark, provider, size, dtype, device, quick):
    case = common.make_case(GROUP, provider, size, dtype, device, bytes_per_element=3)
    dt = common.DTYPES[dtype]
    inputs = {"model_output": common.randn(case.shape, dt, device, 1), "sample": common.randn(case.shape, dt, device, 2),
              "coefs": common.ddim_row(device)}
    with common.forced_backend(provider):
        call = provider_call(provider, inputs)
        common.check_case(call, reference, inputs, None, f"{GROUP}/{provider}/{size}/{dtype}")
        common.run_case(benchmark, case, call, quick)
