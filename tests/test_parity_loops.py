"""Full sampling loops vs stock diffusers with the same generator (DESIGN: fp32 atol=1e-4)."""
import pytest
import torch

import fastdiff
from diffusers_twins import exact, stock


def toy_model(x, t):
    """A deterministic stand-in for a denoiser: depends on x and t, keeps values bounded."""
    return torch.tanh(0.9 * x + 0.001 * float(t))


def run_loop(sampler, steps, shape, dtype, step_kwargs, seed=0):
    sampler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator, dtype=dtype)
    for t in sampler.timesteps:
        x = sampler.step(toy_model(x, t), t, x, generator=generator, **step_kwargs).prev_sample
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("config", [{}, {"prediction_type": "v_prediction", "variance_type": "fixed_large"},
                                    {"beta_schedule": "squaredcos_cap_v2", "variance_type": "fixed_small_log"}])
def test_ddpm_1000_steps(dtype, config):
    """Default tables: stock diffusers' numbers (the cosine + fixed_small_log case differed by 2.6e-4 with
    float64-derived tables); table_dtype="float64": diffusers with float64 tables."""
    stock_loop = run_loop(stock("DDPMScheduler", **config), 1000, (2, 3, 8, 8), dtype, {})
    ours = run_loop(fastdiff.DDPMSampler(**config), 1000, (2, 3, 8, 8), dtype, {})
    torch.testing.assert_close(ours, stock_loop, atol=1e-5, rtol=0)
    assert abs(float(ours.sum() - stock_loop.sum())) < 1e-3  # diffusers' own tests allow 1e-2 on the sum
    ours64 = run_loop(fastdiff.DDPMSampler(**config, table_dtype="float64"), 1000, (2, 3, 8, 8), dtype, {})
    torch.testing.assert_close(ours64, run_loop(exact("DDPMScheduler", **config), 1000, (2, 3, 8, 8), dtype, {}),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("config", [{}, {"prediction_type": "sample", "timestep_spacing": "trailing"}])
def test_ddim_50_steps(eta, config):
    ours = run_loop(fastdiff.DDIMSampler(**config), 50, (2, 3, 8, 8), torch.float32, {"eta": eta})
    theirs = run_loop(stock("DDIMScheduler", **config), 50, (2, 3, 8, 8), torch.float32, {"eta": eta})
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_noncontiguous_loop_equals_contiguous():
    sampler = fastdiff.DDIMSampler()
    sampler.set_timesteps(20)
    x = torch.randn(2, 3, 8, 8)
    a, b = x.clone(), x.clone().contiguous(memory_format=torch.channels_last)
    for t in sampler.timesteps:
        a = sampler.step(toy_model(a, t), t, a, eta=1.0, seed=3).prev_sample
        b = sampler.step(toy_model(b, t), t, b, eta=1.0, seed=3).prev_sample
    torch.testing.assert_close(a, b.contiguous(), atol=1e-6, rtol=1e-5)
