"""The diffusers-compatible surface: constructor, config round trips, set_timesteps, outputs, errors."""
import inspect
import json

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

import fastdiff

PAIRS = [(fastdiff.DDPMSampler, DDPMScheduler), (fastdiff.DDIMSampler, DDIMScheduler)]


@pytest.mark.parametrize("ours,theirs", PAIRS)
def test_same_constructor_keywords_and_defaults(ours, theirs):
    ours_params = {k: p.default for k, p in inspect.signature(ours.__init__).parameters.items() if k != "self"}
    theirs_params = {k: p.default for k, p in inspect.signature(theirs.__init__).parameters.items()
                     if k != "self" and k in ours_params}
    assert ours_params == theirs_params
    assert set(ours().config) == set(theirs().config) - {"_class_name", "_diffusers_version"} - (
        set(theirs().config) - set(ours_params))


@pytest.mark.parametrize("ours,theirs", PAIRS)
def test_config_round_trips_both_ways(ours, theirs, tmp_path):
    config = dict(num_train_timesteps=500, beta_schedule="scaled_linear", prediction_type="v_prediction",
                  timestep_spacing="trailing", rescale_betas_zero_snr=True)
    from_diffusers = ours.from_config(theirs(**config).config)
    assert {k: from_diffusers.config[k] for k in config} == config
    back = theirs.from_config(from_diffusers.config)
    assert {k: back.config[k] for k in config} == config
    ours(**config).save_pretrained(tmp_path / "scheduler")
    data = json.loads((tmp_path / "scheduler" / "scheduler_config.json").read_text())
    assert data["_class_name"] == theirs.__name__
    assert theirs.from_pretrained(tmp_path, subfolder="scheduler").config["prediction_type"] == "v_prediction"
    theirs(**config).save_pretrained(tmp_path / "theirs")
    loaded = ours.from_pretrained(tmp_path / "theirs")
    assert dict(loaded.config) == dict(ours(**config).config)
    assert torch.equal(loaded.alphas_cumprod, theirs(**config).alphas_cumprod)


def test_from_config_overrides_and_rejects_unknown():
    sampler = fastdiff.DDPMSampler.from_config(DDPMScheduler().config, variance_type="fixed_large")
    assert sampler.config.variance_type == "fixed_large"
    assert fastdiff.DDPMSampler.from_config(DDIMScheduler().config).config.clip_sample is True  # foreign keys ignored
    with pytest.raises(TypeError, match="unknown arguments \\['varience_type'\\]"):
        fastdiff.DDPMSampler.from_config({}, varience_type="fixed_large")
    with pytest.raises(TypeError, match="read-only"):
        sampler.config["variance_type"] = "learned"


@pytest.mark.parametrize("ours,theirs", PAIRS)
@pytest.mark.parametrize("spacing,offset", [("leading", 0), ("leading", 1), ("linspace", 0), ("trailing", 0)])
def test_set_timesteps_and_attributes(ours, theirs, spacing, offset):
    a, b = ours(timestep_spacing=spacing, steps_offset=offset), theirs(timestep_spacing=spacing, steps_offset=offset)
    assert torch.equal(a.timesteps, b.timesteps)  # before set_timesteps too
    a.set_timesteps(37)
    b.set_timesteps(37)
    assert torch.equal(a.timesteps, b.timesteps) and a.timesteps.dtype == torch.int64
    assert (len(a), a.order, a.init_noise_sigma, a.num_inference_steps) == (len(b), b.order, b.init_noise_sigma, 37)
    x = torch.randn(1, 3, 4, 4)
    assert a.scale_model_input(x, 10) is x
    assert torch.equal(a.betas, b.betas) and torch.equal(a.alphas, b.alphas)


def test_custom_timesteps_and_previous_timestep():
    a, b = fastdiff.DDPMSampler(), DDPMScheduler()
    for s in (a, b):
        s.set_timesteps(timesteps=[900, 500, 100, 3])
    assert torch.equal(a.timesteps, b.timesteps)
    assert [int(a.previous_timestep(t)) for t in a.timesteps] == [int(b.previous_timestep(t)) for t in b.timesteps]
    assert a.previous_timestep(3) == -1 and a.custom_timesteps
    ddim = fastdiff.DDIMSampler()
    ddim.set_timesteps(10)
    assert ddim.previous_timestep(901) == 801


def test_step_outputs_dict_and_tuple():
    sampler = fastdiff.DDIMSampler()
    sampler.set_timesteps(5)
    x, eps = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)
    out = sampler.step(eps, sampler.timesteps[0], x)
    prev, x0 = sampler.step(eps, sampler.timesteps[0], x, return_dict=False)
    assert torch.equal(out.prev_sample, prev) and torch.equal(out[0], prev) and torch.equal(out["prev_sample"], prev)
    assert torch.equal(out.pred_original_sample, x0) and torch.equal(out[1], x0)


@pytest.mark.parametrize("timestep", [700, torch.tensor(700), torch.tensor([700])])
def test_timestep_forms_agree(timestep):
    sampler = fastdiff.DDPMSampler()
    sampler.set_timesteps(10)
    x, eps = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)
    want = sampler.step(eps, 700, x, seed=1).prev_sample
    assert torch.equal(sampler.step(eps, timestep, x, seed=1).prev_sample, want)


def test_device_gather_path_equals_host_lookup(monkeypatch):
    """The branch an accelerator timestep (or torch.compile) takes: gather from the device table."""
    sampler = fastdiff.DDPMSampler()
    sampler.set_timesteps(10)
    x, eps = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)
    want = sampler.step(eps, 700, x, seed=1).prev_sample
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert torch.equal(sampler.step(eps, torch.tensor(700), x, seed=1).prev_sample, want)


def test_seeded_noise_is_the_public_stream():
    sampler = fastdiff.DDPMSampler(clip_sample=False)
    sampler.set_timesteps(10)
    x, eps = torch.randn(3, 3, 4, 4), torch.randn(3, 3, 4, 4)
    seeded = sampler.step(eps, 500, x, seed=42, sample_offset=5).prev_sample
    noise = fastdiff.noise.randn(x.shape, 42, counter=500, sample_offset=5)
    # Same integer stream on every backend; normals agree to 1e-6 (libm differs), DESIGN "Noise".
    torch.testing.assert_close(seeded, sampler.step(eps, 500, x, variance_noise=noise).prev_sample,
                               atol=2e-6, rtol=0)
    alone = sampler.step(eps[1:2], 500, x[1:2], seed=42, sample_offset=6).prev_sample
    assert torch.equal(alone[0], seeded[1])


def test_default_noise_follows_torch_manual_seed():
    sampler = fastdiff.DDPMSampler()
    sampler.set_timesteps(10)
    x, eps = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)
    torch.manual_seed(3)
    a = sampler.step(eps, 500, x).prev_sample
    torch.manual_seed(3)
    assert torch.equal(a, sampler.step(eps, 500, x).prev_sample)
    assert not torch.equal(a, sampler.step(eps, 500, x).prev_sample)


def test_guidance_scale_equals_manual_cfg():
    sampler = fastdiff.DDIMSampler()
    sampler.set_timesteps(10)
    x, uncond, cond = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    fused = sampler.step(torch.cat([uncond, cond]), 501, x, guidance_scale=7.5).prev_sample
    manual = sampler.step(uncond + 7.5 * (cond - uncond), 501, x).prev_sample
    torch.testing.assert_close(fused, manual, atol=1e-6, rtol=1e-5)


# ---- bad input: a clear error naming the argument, the value and what is allowed ----------------
@pytest.mark.parametrize("kwargs,match", [
    (dict(beta_schedule="cosine"), "beta_schedule must be one of"),
    (dict(variance_type="fixed"), "variance_type must be one of .* got 'fixed'"),
    (dict(prediction_type="eps"), "prediction_type must be one of .* got 'eps'"),
    (dict(timestep_spacing="even"), "timestep_spacing must be one of .* got 'even'"),
    (dict(num_train_timesteps=0), "num_train_timesteps must be a positive int"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fastdiff.DDPMSampler(**kwargs)


def test_bad_set_timesteps():
    sampler = fastdiff.DDPMSampler()
    with pytest.raises(ValueError, match="num_inference_steps must be an int in \\[1, num_train_timesteps=1000\\], got 1001"):
        sampler.set_timesteps(1001)
    with pytest.raises(ValueError, match="strictly descending"):
        sampler.set_timesteps(timesteps=[1, 5])
    with pytest.raises(ValueError, match="either num_inference_steps or timesteps"):
        sampler.set_timesteps(10, timesteps=[5, 1])
    with pytest.raises(ValueError, match="call set_timesteps"):
        fastdiff.DDIMSampler().step(torch.randn(1, 1, 2), 5, torch.randn(1, 1, 2))


def test_bad_step_inputs():
    sampler = fastdiff.DDPMSampler()
    sampler.set_timesteps(10)
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="timestep 7 is not in the schedule"):
        sampler.step(x, 7, x)
    with pytest.raises(ValueError, match=r"model_output has shape \(2, 4, 4, 4\) but a sample of shape \(2, 3, 4, 4\) needs \[2, 3, 4, 4\]"):
        sampler.step(torch.randn(2, 4, 4, 4), 900, x)
    with pytest.raises(ValueError, match="needs \\[4, 3, 4, 4\\] \\(\\[uncond; cond\\] batch"):
        sampler.step(x, 900, x, guidance_scale=3.0)
    with pytest.raises(ValueError, match="at most one of generator, variance_noise and seed; got generator and variance_noise"):
        sampler.step(x, 900, x, generator=torch.Generator(), variance_noise=x)
    with pytest.raises(ValueError, match="variance_noise must match sample"):
        sampler.step(x, 900, x, variance_noise=x[:1])
    with pytest.raises(TypeError, match="model_output must be a floating-point tensor, got Tensor of dtype torch.int64"):
        sampler.step(x.long(), 900, x)
    with pytest.raises(TypeError, match="timestep must be an int or a 1-element tensor, got float"):
        sampler.step(x, 900.0, x)
    with pytest.raises(ValueError, match="model_output is on meta but sample is on cpu"):
        sampler.step(x.to("meta"), 900, x)
    learned = fastdiff.DDPMSampler(variance_type="learned")
    with pytest.raises(ValueError, match="variance_type='learned' needs model_output with 2 x 3 channels"):
        learned.step(x, 999, x)
    with pytest.raises(ValueError, match="timesteps must be in \\[0, 1000\\), got \\[1000\\]"):
        sampler.add_noise(x, x, torch.tensor([1, 1000]))
    with pytest.raises(ValueError, match="eta must be a float >= 0"):
        ddim = fastdiff.DDIMSampler()
        ddim.set_timesteps(5)
        ddim.step(x, 801, x, eta=-1)


def test_learned_variance_with_2c_channels_runs():
    sampler = fastdiff.DDPMSampler(variance_type="learned_range")
    sampler.set_timesteps(10)
    x = torch.randn(2, 3, 4, 4)
    out = sampler.step(torch.randn(2, 6, 4, 4), 900, x, seed=0).prev_sample
    assert out.shape == x.shape and torch.isfinite(out).all()
