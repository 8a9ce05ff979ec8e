"""Classifier-free guidance, alone and fused into the DDPM step.

cfg: u + w (c - u) over the [uncond; cond] model batch: read u and c, write the guided output
  -> 3 x numel x element size bytes. diffusers' pipelines write this line inline
  (`noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)`): that is the
  "diffusers" provider.
cfg+step: guidance, then the DDPM step of test_ddpm_step: read the 2B model batch and x_t, write
  x_{t-1} -> 4 x numel x element size bytes. diffusers = the pipeline line + DDPMScheduler.step;
  eager / compile = reference.ddpm_step(guidance_scale=w); fastdiff = one fused ddpm_step.
"""
from __future__ import annotations

import torch

from benchmarks import common
from fastdiff import noise as N
from fastdiff import ops
from fastdiff import reference as R

GUIDANCE = 7.5


def doubled(shape: tuple[int, ...]) -> tuple[int, ...]:
    return (2 * shape[0], *shape[1:])


# ---- cfg ----------------------------------------------------------------------------------------
def cfg_reference(inputs: dict, noise) -> torch.Tensor:
    uncond, cond = inputs["model_output"].chunk(2)
    return R.cfg_combine(uncond, cond, GUIDANCE)


def cfg_call(provider: str, inputs: dict):
    uncond, cond = inputs["model_output"].chunk(2)
    if provider == "eager":
        return lambda: R.cfg_combine(uncond, cond, GUIDANCE)
    if provider == "compile":
        combine = common.compiled(R.cfg_combine)
        return lambda: combine(uncond, cond, GUIDANCE)
    if provider == "diffusers":
        return lambda: uncond + GUIDANCE * (cond - uncond)  # diffusers' pipelines, in the model's dtype
    return lambda: ops.cfg_combine(uncond, cond, GUIDANCE)


def test_cfg(benchmark, provider, size, dtype, device, quick):
    case = common.make_case("cfg", provider, size, dtype, device, bytes_per_element=3)
    inputs = {"model_output": common.randn(doubled(case.shape), common.DTYPES[dtype], device, 1)}
    with common.forced_backend(provider):
        call = cfg_call(provider, inputs)
        common.check_case(call, cfg_reference, inputs, None, f"cfg/{provider}/{size}/{dtype}")
        common.run_case(benchmark, case, call, quick)


# ---- cfg+step -----------------------------------------------------------------------------------
def step_reference(inputs: dict, noise: torch.Tensor) -> torch.Tensor:
    return R.ddpm_step(inputs["model_output"], inputs["sample"], inputs["coefs"], clip_sample_range=1.0,
                       noise=noise, guidance_scale=GUIDANCE)[0]


def step_call(provider: str, inputs: dict):
    m, x, c = inputs["model_output"], inputs["sample"], inputs["coefs"]
    randn = lambda: torch.randn(x.shape, device=x.device, dtype=x.dtype)  # noqa: E731
    if provider == "eager":
        return lambda: R.ddpm_step(m, x, c, clip_sample_range=1.0, noise=randn(), guidance_scale=GUIDANCE)[0]
    if provider == "compile":
        step = common.compiled(lambda m, x, c, n: R.ddpm_step(m, x, c, clip_sample_range=1.0, noise=n,
                                                              guidance_scale=GUIDANCE)[0])
        return lambda: step(m, x, c, randn())
    if provider == "diffusers":
        from diffusers import DDPMScheduler
        scheduler = DDPMScheduler()

        def pipeline_step():
            uncond, cond = m.chunk(2)
            return scheduler.step(uncond + GUIDANCE * (cond - uncond), common.STEP_T, x).prev_sample

        return pipeline_step
    return lambda: ops.ddpm_step(m, x, c, None, common.SEED, 0, "epsilon", "fixed_small", 1.0, None, GUIDANCE,
                                 False)[0]


def test_cfg_step(benchmark, provider, size, dtype, device, quick):
    case = common.make_case("cfg+step", provider, size, dtype, device, bytes_per_element=4)
    dt = common.DTYPES[dtype]
    inputs = {"model_output": common.randn(doubled(case.shape), dt, device, 1),
              "sample": common.randn(case.shape, dt, device, 2), "coefs": common.ddpm_row(device)}
    noise = common.provider_noise(provider, case.shape, dt, device, counter=common.STEP_T, stream=N.STREAM_STEP)
    with common.forced_backend(provider):
        call = step_call(provider, inputs)
        common.check_case(call, step_reference, inputs, noise, f"cfg+step/{provider}/{size}/{dtype}")
        common.run_case(benchmark, case, call, quick)
