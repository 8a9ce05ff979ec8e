"""Where diffusers returns NaN, fastdiff returns finite, documented values (fastdiff.reference)."""
import torch

import fastdiff
from diffusers_twins import FP32, stock


def one_step(sampler, model_output, sample, t, **kwargs):
    return sampler.step(model_output, t, sample, generator=torch.Generator().manual_seed(0), **kwargs).prev_sample


def test_fixed_large_log_is_fixed_large_not_nan():
    sample, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    theirs = one_step(stock("DDPMScheduler", variance_type="fixed_large_log"), eps, sample, 500)
    assert torch.isnan(theirs).all()  # diffusers: sqrt(log(beta_t)) of a negative log
    ours = one_step(fastdiff.DDPMSampler(variance_type="fixed_large_log"), eps, sample, 500)
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, one_step(stock("DDPMScheduler", variance_type="fixed_large"), eps, sample, 500),
                               **FP32)


def test_learned_negative_variance_is_clamped_not_nan():
    sample = torch.randn(1, 3, 4, 4)
    model_output = torch.cat([torch.randn(1, 3, 4, 4), -torch.rand(1, 3, 4, 4) - 0.1], dim=1)  # all negative
    theirs = one_step(stock("DDPMScheduler", variance_type="learned"), model_output, sample, 500)
    assert torch.isnan(theirs).all()
    ours = one_step(fastdiff.DDPMSampler(variance_type="learned"), model_output, sample, 500)
    # variance clamped at 0: the posterior mean alone, exactly what a zero-noise step gives
    mean = fastdiff.DDPMSampler(variance_type="learned").step(
        torch.cat([model_output[:, :3], torch.zeros(1, 3, 4, 4)], 1), 500, sample, seed=1).prev_sample
    torch.testing.assert_close(ours, mean, **FP32)


def test_ddim_eta_above_one_is_finite():
    sampler = fastdiff.DDIMSampler()
    sampler.set_timesteps(10)
    theirs = stock("DDIMScheduler")
    theirs.set_timesteps(10)
    sample, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    assert torch.isnan(theirs.step(eps, 900, sample, eta=3.0, generator=torch.Generator()).prev_sample).all()
    assert torch.isfinite(sampler.step(eps, 900, sample, eta=3.0, seed=0).prev_sample).all()


def test_device_timestep_outside_schedule_gives_nan_not_garbage():
    """A device timestep the schedule does not have (7) or past the table (5000) reads the NaN row."""
    sampler = fastdiff.DDPMSampler()
    sampler.set_timesteps(10)
    sample, eps = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)
    table = sampler._table(sample.device)
    for t in (7, 5000, -1):
        assert torch.isnan(fastdiff.tables.gather_row(table, torch.tensor([t]))).all()
    # An accelerator timestep (or a CPU one under torch.compile) is used as the row index unchecked:
    out = fastdiff.ops.run_step(eps, sample, table, torch.tensor([7]), torch.empty(0), None, 1, 0, None, None, 0.0, 0,
                                None, None, 0, False, False, False, True)
    assert torch.isnan(out[0]).all() and torch.isnan(out[1]).all()
