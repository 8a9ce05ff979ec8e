"""Beta / alpha-bar tables equal diffusers' float32 tables bit for bit."""
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from fastdiff import schedules
from fastdiff.samplers.base import spaced_timesteps

SCHEDULES = ["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"]


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("zero_snr", [False, True])
def test_tables_equal_diffusers_exactly(schedule, zero_snr):
    ref = DDPMScheduler(beta_schedule=schedule, rescale_betas_zero_snr=zero_snr)
    betas = schedules.make_betas(1000, 0.0001, 0.02, schedule, rescale_zero_snr=zero_snr)
    assert betas.dtype == torch.float32
    assert torch.equal(betas, ref.betas)
    assert torch.equal(schedules.alphas_cumprod_from_betas(betas), ref.alphas_cumprod)


def test_zero_snr_reaches_zero_and_keeps_first_value():
    betas = schedules.make_betas(1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    abar = schedules.alphas_cumprod_from_betas(schedules.rescale_betas_zero_snr(betas))
    assert abar[-1].item() == 0.0
    assert abar[0].item() == pytest.approx(schedules.alphas_cumprod_from_betas(betas)[0].item(), rel=1e-6)


def test_trained_betas_and_sigmoid_2015():
    trained = np.linspace(1e-4, 2e-2, 10)
    assert torch.equal(schedules.make_betas(10, trained_betas=trained), torch.tensor(trained, dtype=torch.float32))
    expected = torch.sigmoid(torch.linspace(-18, 10, 50)) * (0.3 - 1e-5) + 1e-5
    assert torch.equal(schedules.make_betas(50, beta_schedule="sigmoid_2015"), expected)
    assert 0 < expected.min() and expected.max() < 0.3


def test_cosine_schedule_is_capped():
    betas = schedules.cosine_betas(1000)
    assert betas.max().item() == pytest.approx(0.999)
    assert torch.all(betas[1:] >= betas[:-1])


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("steps", [1, 7, 50, 1000])
def test_spacing_equals_diffusers(spacing, steps):
    ref = DDPMScheduler(timestep_spacing=spacing, steps_offset=0)
    ref.set_timesteps(steps)
    assert np.array_equal(spaced_timesteps(1000, steps, spacing, 0), ref.timesteps.numpy())


def test_bad_schedule_names_the_value():
    with pytest.raises(ValueError, match="beta_schedule must be one of .* got 'cosine'"):
        schedules.make_betas(10, beta_schedule="cosine")
    with pytest.raises(ValueError, match="trained_betas"):
        schedules.make_betas(10, trained_betas=[0.1, 0.2])
