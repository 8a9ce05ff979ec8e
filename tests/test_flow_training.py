"""Flow-matching training (rectified flow, SD3 / Flux scripts) through fastdiff.diffusion_loss: fused noising
and velocity target, SD3's timestep sampling and loss weightings, equal to diffusers' training_utils and
its SD3 DreamBooth script with the same generator; seeded draws on the sample's device; errors."""
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3  # noqa: E402

import fastdiff  # noqa: E402
from fastdiff import noise as N  # noqa: E402
from fastdiff import training  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


SHAPE = (4, 3, 6, 6)


def model(x_t, t):
    """Any deterministic function of (x_t, t) stands in for the transformer."""
    return torch.tanh(x_t) * (t[:, None, None, None] / 1000)


def sd3_script_loss(x0, scheduler, generator, timestep_sampling, loss_weighting, **density):
    """diffusers' examples/dreambooth/train_dreambooth_sd3.py, precondition_outputs=0, drawn in our order
    (timesteps, then noise) from one generator."""
    scheme = timestep_sampling if timestep_sampling != "uniform" else "none"
    u = compute_density_for_timestep_sampling(weighting_scheme=scheme, batch_size=x0.shape[0], generator=generator,
                                              **density)
    indices = (u * scheduler.config.num_train_timesteps).long()
    timesteps = scheduler.timesteps[indices]
    step_indices = [(scheduler.timesteps == t).nonzero().item() for t in timesteps]  # the script's get_sigmas
    sigmas = scheduler.sigmas[step_indices].flatten()[:, None, None, None]
    noise = torch.randn(x0.shape, generator=generator)
    noisy = (1.0 - sigmas) * x0 + sigmas * noise
    pred = model(noisy, timesteps)
    weighting = compute_loss_weighting_for_sd3(weighting_scheme=loss_weighting, sigmas=sigmas)
    target = noise - x0
    return torch.mean((weighting.float() * (pred.float() - target.float()) ** 2).reshape(x0.shape[0], -1), 1).mean()


@pytest.mark.parametrize("timestep_sampling,loss_weighting,density", [
    ("uniform", "none", {}),
    ("logit_normal", "none", {"logit_mean": 0.0, "logit_std": 1.0}),
    ("logit_normal", "sigma_sqrt", {"logit_mean": 0.5, "logit_std": 1.3}),
    ("mode", "cosmap", {"mode_scale": 1.29}),
])
@pytest.mark.parametrize("config", [{"shift": 3.0}, {"use_dynamic_shifting": True}])
def test_loss_equals_the_sd3_training_script(backend, timestep_sampling, loss_weighting, density, config):
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    want = sd3_script_loss(x0, diffusers.FlowMatchEulerDiscreteScheduler(**config), torch.Generator().manual_seed(1),
                           timestep_sampling, loss_weighting, **density)
    got = fastdiff.diffusion_loss(model, x0, fastdiff.FlowMatchEulerDiscreteSampler(**config),
                                  generator=torch.Generator().manual_seed(1), timestep_sampling=timestep_sampling,
                                  loss_weighting=loss_weighting, **density)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_density_and_weighting_equal_diffusers():
    for scheme, kwargs in [("logit_normal", {"logit_mean": 0.2, "logit_std": 0.7}), ("mode", {"mode_scale": 0.8}),
                           ("uniform", {})]:
        want = compute_density_for_timestep_sampling(scheme if scheme != "uniform" else "none", 16,
                                                     generator=torch.Generator().manual_seed(3), **kwargs)
        got = training.flow_timestep_density(16, "cpu", scheme, generator=torch.Generator().manual_seed(3), **kwargs)
        assert torch.equal(got, want)
    sigmas = torch.rand(8) * 0.98 + 0.01
    for scheme in ("none", "sigma_sqrt", "cosmap"):
        assert torch.equal(training.flow_loss_weighting(scheme, sigmas), compute_loss_weighting_for_sd3(scheme, sigmas))


def test_seeded_draws_are_the_public_streams(backend):
    """Seeded: sigma from Philox uniforms on the training grid, noise from the q-sample stream, target n - x0."""
    sampler = fastdiff.FlowMatchEulerDiscreteSampler(shift=3.0)
    x0 = torch.randn(SHAPE)
    seen = {}

    def spy(x_t, t):
        seen["x_t"], seen["t"] = x_t, t
        return torch.zeros_like(x_t)
    loss = fastdiff.diffusion_loss(spy, x0, sampler, seed=5, sample_offset=2, reduction="none")
    t, sigmas = training.flow_training_timesteps(None, x0, sampler, seed=5, sample_offset=2)
    index = (training.flow_timestep_density(SHAPE[0], "cpu", seed=5, sample_offset=2) * 1000).long()
    assert torch.equal(seen["t"], t) and torch.equal(t, sampler.train_timesteps[index])
    assert torch.equal(sigmas, sampler.train_sigmas[index])
    noise = N.randn(SHAPE, 5, stream=N.STREAM_Q_SAMPLE, sample_offset=2)
    s = sigmas[:, None, None, None]
    torch.testing.assert_close(seen["x_t"], (1 - s) * x0 + s * noise, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(loss, (noise - x0) ** 2, atol=1e-5, rtol=1e-5)
    # sample i draws the same sigma and noise in any batch split
    t_part, _ = training.flow_training_timesteps(None, x0[2:], sampler, seed=5, sample_offset=4)
    assert torch.equal(t_part, t[2:])


@pytest.mark.parametrize("timestep_sampling", ["uniform", "logit_normal", "mode"])
def test_seeded_timestep_distributions(timestep_sampling):
    u = training.flow_timestep_density(4096, "cpu", timestep_sampling, seed=1)
    assert 0 <= u.min() and u.max() <= 1
    if timestep_sampling == "uniform":
        assert abs(u.mean() - 0.5) < 0.02
    elif timestep_sampling == "logit_normal":  # sigmoid(N(0, 1)): median 0.5, mass in the middle
        assert abs(u.median() - 0.5) < 0.03 and ((u > 0.25) & (u < 0.75)).float().mean() > 0.65
    else:  # mode_scale 1.29 pushes mass to the middle too (SD3 eq. 20)
        assert ((u > 0.25) & (u < 0.75)).float().mean() > 0.55


def test_explicit_continuous_timesteps_and_reductions():
    sampler = fastdiff.FlowMatchEulerDiscreteSampler()
    x0 = torch.randn(SHAPE)
    t = torch.tensor([1000.0, 620.5, 250.0, 3.0])
    elementwise = fastdiff.diffusion_loss(model, x0, sampler, timesteps=t, seed=0, reduction="none")
    noise = N.randn(SHAPE, 0, stream=N.STREAM_Q_SAMPLE)
    s = (t / 1000)[:, None, None, None]
    torch.testing.assert_close(elementwise, (model((1 - s) * x0 + s * noise, t) - (noise - x0)) ** 2,
                               atol=1e-6, rtol=1e-5)
    assert torch.equal(fastdiff.diffusion_loss(model, x0, sampler, timesteps=t, seed=0), elementwise.mean())
    assert torch.equal(fastdiff.diffusion_loss(model, x0, sampler, timesteps=t, seed=0, reduction="sum"),
                       elementwise.sum())


def test_runs_on_the_meta_device(monkeypatch):
    """Timesteps, sigmas, noise and the loss stay on the sample's device: no host copy."""
    monkeypatch.setenv("FASTDIFF_BACKEND", "reference")
    sampler = fastdiff.FlowMatchEulerDiscreteSampler(shift=3.0)
    loss = fastdiff.diffusion_loss(lambda x, t: x * t[:, None, None, None], torch.empty(SHAPE, device="meta"), sampler,
                                   seed=1, timestep_sampling="logit_normal", loss_weighting="cosmap")
    assert loss.device.type == "meta" and loss.shape == ()


@pytest.mark.parametrize("sampler,kwargs,error,match", [
    (fastdiff.DDPMSampler(), dict(timestep_sampling="logit_normal"), ValueError, "not a flow-matching sampler"),
    (fastdiff.DDPMSampler(), dict(loss_weighting="cosmap"), ValueError, "not a flow-matching sampler"),
    (fastdiff.FlowMatchEulerDiscreteSampler(), dict(timestep_sampling="lognorm"), ValueError,
     "timestep_sampling must be one of"),
    (fastdiff.FlowMatchEulerDiscreteSampler(), dict(loss_weighting="snr"), ValueError, "loss_weighting must be one of"),
    (fastdiff.FlowMatchEulerDiscreteSampler(), dict(timesteps=torch.tensor([1500.0])), ValueError,
     r"must be in \[0, 1000\]"),
    (fastdiff.FlowMatchEulerDiscreteSampler(), dict(timesteps=torch.tensor([1.0, 2.0])), ValueError,
     "1 or batch=4 entries"),
])
def test_errors(sampler, kwargs, error, match):
    with pytest.raises(error, match=match):
        fastdiff.diffusion_loss(model, torch.randn(SHAPE), sampler, seed=0, **kwargs)
