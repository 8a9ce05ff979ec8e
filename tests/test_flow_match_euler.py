"""FlowMatchEulerDiscreteSampler vs diffusers' FlowMatchEulerDiscreteScheduler: schedules, single steps and
whole loops over every option (same generator), guidance, seeded noise, a small SD3 transformer inside
diffusers' own StableDiffusion3Pipeline, the meta device, fastdiff.sample() and errors.

Measured (reference and cpp backends, fp32; triton on its subset): schedules are bit-equal, and every
single step and loop of the grid equals diffusers' bit for bit (rows hold diffusers' own float32 dt; the
step is x + dt v in diffusers' order).
The parity tests assert the DESIGN tolerance (loops 1e-4) so that backends with FMA contraction pass.
"""
import inspect

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import fastdiff  # noqa: E402
from fastdiff import noise as N  # noqa: E402
from fastdiff.samplers import sigmas as S  # noqa: E402

Ours, Theirs = fastdiff.FlowMatchEulerDiscreteSampler, diffusers.FlowMatchEulerDiscreteScheduler
LOOP_ATOL = 1e-4  # DESIGN: fp32 loops vs diffusers
SHAPE = (2, 4, 6, 6)

pytestmark = pytest.mark.usefixtures("one_thread")


def velocity(x, t):
    """A deterministic stand-in for a flow model: depends on x and t, keeps the sample bounded."""
    t = torch.as_tensor(t).reshape(-1)[:1].reshape(())  # the loop passes a [batch] view
    return 0.95 * x + 0.05 * torch.tanh(x + 0.001 * t)


def flux_sigmas(n):
    return np.linspace(1.0, 1 / n, n)


# (constructor config, set_timesteps arguments): every option of the scheduler, the pipelines' settings.
CASES = {
    "default": ({}, dict(num_inference_steps=12)),
    "sd3-shift3": ({"shift": 3.0}, dict(num_inference_steps=12)),
    "flux-dynamic": ({"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15},
                     dict(sigmas=flux_sigmas(10), mu=S.calculate_shift(1024))),
    "ltx-terminal": ({"use_dynamic_shifting": True, "base_shift": 0.95, "max_shift": 2.05, "shift_terminal": 0.1,
                      "base_image_seq_len": 1024, "max_image_seq_len": 4096},
                     dict(num_inference_steps=10, mu=S.calculate_shift(2048, 1024, 4096, 0.95, 2.05))),
    "linear-time-shift": ({"use_dynamic_shifting": True, "time_shift_type": "linear"}, dict(num_inference_steps=8, mu=1.7)),
    "hunyuan-karras": ({"shift": 7.0, "use_karras_sigmas": True}, dict(num_inference_steps=10)),
    "exponential": ({"shift": 3.0, "use_exponential_sigmas": True}, dict(num_inference_steps=10)),
    "beta": ({"use_beta_sigmas": True}, dict(num_inference_steps=10)),
    "mochi-invert": ({"invert_sigmas": True}, dict(sigmas=list(np.linspace(1.0, 0.05, 8)))),
    "stochastic": ({"shift": 3.0, "stochastic_sampling": True}, dict(num_inference_steps=10)),
    "custom-timesteps": ({"shift": 3.0}, dict(timesteps=[1000.0, 800.0, 520.5, 300.0, 90.0])),
    "sigmas-and-timesteps": ({}, dict(sigmas=[1.0, 0.7, 0.4, 0.1], timesteps=[999.0, 700.0, 400.0, 100.0])),
}


def set_both(config, kwargs, device=None):
    ours, theirs = Ours(**config), Theirs(**config)
    ours.set_timesteps(device=device, **kwargs)
    theirs.set_timesteps(device=device, **kwargs)
    return ours, theirs


def run_loop(scheduler, generator, x, **step_kwargs):
    for t in scheduler.timesteps:
        x = scheduler.step(velocity(x, t), t, x, generator=generator, **step_kwargs).prev_sample
    return x


# ---- the diffusers surface ------------------------------------------------------------------------
def test_same_constructor_keywords_and_defaults():
    ours = {k: p.default for k, p in inspect.signature(Ours.__init__).parameters.items() if k != "self"}
    theirs = {k: p.default for k, p in inspect.signature(Theirs.__init__).parameters.items() if k != "self"}
    assert ours == theirs
    step_theirs = [k for k in inspect.signature(Theirs.step).parameters if k != "self"]
    step_ours = [k for k in inspect.signature(Ours.step).parameters if k != "self"]
    assert step_ours[:len(step_theirs)] == step_theirs  # diffusers' positional order, then keyword-only extras
    assert list(inspect.signature(Ours.set_timesteps).parameters) == list(inspect.signature(Theirs.set_timesteps).parameters)


def test_config_round_trips_and_from_diffusers_config(tmp_path):
    config = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05, shift_terminal=0.1,
                  time_shift_type="linear", stochastic_sampling=True)
    ours = Ours.from_config(Theirs(**config).config)
    assert {k: ours.config[k] for k in config} == config
    assert {k: Theirs.from_config(ours.config).config[k] for k in config} == config
    ours.save_pretrained(tmp_path / "scheduler")
    back = Theirs.from_pretrained(tmp_path, subfolder="scheduler")
    assert {k: back.config[k] for k in config} == config
    Theirs(**config).save_pretrained(tmp_path / "theirs")
    assert {k: Ours.from_pretrained(tmp_path / "theirs").config[k] for k in config} == config


def test_attributes_before_and_after_set_timesteps():
    ours, theirs = Ours(shift=3.0), Theirs(shift=3.0)
    assert torch.equal(ours.sigmas, theirs.sigmas) and torch.equal(ours.timesteps, theirs.timesteps)
    assert (ours.sigma_min, ours.sigma_max, ours.shift, ours.order, len(ours)) == (
        theirs.sigma_min, theirs.sigma_max, theirs.shift, theirs.order, len(theirs))
    ours.set_shift(5.0)
    theirs.set_shift(5.0)
    ours.set_timesteps(7)
    theirs.set_timesteps(7)
    assert torch.equal(ours.sigmas, theirs.sigmas) and torch.equal(ours.timesteps, theirs.timesteps)
    assert ours.step_index is None and ours.begin_index is None and ours.num_inference_steps == 7
    assert not hasattr(ours, "add_noise") and not hasattr(Theirs(), "add_noise")  # flow matching: scale_noise


@pytest.mark.parametrize("case", list(CASES))
def test_schedule_equals_diffusers(case):
    ours, theirs = set_both(*CASES[case])
    assert ours.sigmas.dtype == theirs.sigmas.dtype == torch.float32
    assert torch.equal(ours.sigmas, theirs.sigmas.cpu()), (ours.sigmas, theirs.sigmas)
    assert torch.equal(ours.timesteps, theirs.timesteps)
    assert ours.num_inference_steps == theirs.num_inference_steps


# ---- parity: single steps and loops -------------------------------------------------------------------
@pytest.mark.parametrize("case", ["sd3-shift3", "flux-dynamic", "mochi-invert", "stochastic"])
def test_single_steps_equal_diffusers(backend, case):
    ours, theirs = set_both(*CASES[case])
    g = torch.Generator().manual_seed(0)
    for i in range(len(theirs.timesteps)):
        x, v = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
        noise = torch.randn(SHAPE, generator=g)
        ours.set_begin_index(i)
        theirs.set_begin_index(i)
        t = theirs.timesteps[i]
        want = theirs.step(v, t, x, generator=torch.Generator().manual_seed(i)).prev_sample
        got = ours.step(v, t, x, generator=torch.Generator().manual_seed(i)).prev_sample
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
        if ours.config.stochastic_sampling:  # the same step with the noise given
            ours.set_begin_index(i)
            expected = (1 - theirs.sigmas[i + 1]) * (x - theirs.sigmas[i] * v) + theirs.sigmas[i + 1] * noise
            torch.testing.assert_close(ours.step(v, t, x, variance_noise=noise).prev_sample, expected,
                                       atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_loop_equals_diffusers_same_generator(backend, case):
    ours, theirs = set_both(*CASES[case])
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    got = run_loop(ours, torch.Generator().manual_seed(2), x_T)
    want = run_loop(theirs, torch.Generator().manual_seed(2), x_T)
    torch.testing.assert_close(got, want, atol=LOOP_ATOL, rtol=0)
    assert got.abs().max() > 0.1


@pytest.mark.parametrize("case", ["sd3-shift3", "stochastic"])
def test_loop_equals_diffusers_triton(triton_backend, case):
    ours, theirs = set_both(*CASES[case])
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(run_loop(ours, torch.Generator().manual_seed(2), x_T),
                               run_loop(theirs, torch.Generator().manual_seed(2), x_T), atol=LOOP_ATOL, rtol=0)


def test_half_precision_sample_steps_in_fp32_and_keeps_its_dtype():
    ours, theirs = set_both({"shift": 3.0}, dict(num_inference_steps=6))
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    got = run_loop(ours, None, x.to(torch.bfloat16))
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), run_loop(theirs, None, x), atol=3e-2, rtol=3e-2)


def test_per_token_timesteps_equal_diffusers():
    ours, theirs = set_both({"shift": 3.0}, dict(num_inference_steps=6))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 10, 4, generator=g)
    a, b = x.clone(), x.clone()
    for t in theirs.timesteps:
        per_token = t.expand(2, 10).clone()
        per_token[:, :3] = t * 0.5  # conditioning tokens, less noisy
        v = torch.tanh(a)
        a = ours.step(v, t, a, per_token_timesteps=per_token).prev_sample
        b = theirs.step(torch.tanh(b), t, b, per_token_timesteps=per_token).prev_sample
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("begin_index", [None, 0, 3])
def test_scale_noise_equals_diffusers(begin_index):
    ours, theirs = set_both({"shift": 3.0}, dict(num_inference_steps=10))
    g = torch.Generator().manual_seed(0)
    x, n = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    t = theirs.timesteps[[4, 6]]
    if begin_index is not None:
        ours.set_begin_index(begin_index)
        theirs.set_begin_index(begin_index)
    assert torch.equal(ours.scale_noise(x, t, n), theirs.scale_noise(x, t, n))
    untouched = Ours(shift=3.0)  # training use, before set_timesteps
    assert torch.equal(untouched.scale_noise(x, torch.tensor([500.0, 1000.0]), n),
                       Theirs(shift=3.0).scale_noise(x, torch.tensor([500.0, 1000.0]), n))


# ---- guidance and noise -------------------------------------------------------------------------
def test_cfg_and_skip_layer_guidance_fused_equal_manual(backend):
    ours = Ours(shift=3.0)
    ours.set_timesteps(5)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE, generator=g)
    u, c, skip = (torch.randn(SHAPE, generator=g) for _ in range(3))
    fused, manual = x.clone(), x.clone()
    manual_sampler = Ours(shift=3.0)
    manual_sampler.set_timesteps(5)
    for t in ours.timesteps:
        fused = ours.step(torch.cat([u, c]), t, fused, guidance_scale=4.0, skip_layer_output=skip,
                          skip_layer_guidance_scale=2.8).prev_sample
        guided = u + 4.0 * (c - u)
        guided = guided + (c - skip) * 2.8  # SD3's pipeline, after CFG
        manual = manual_sampler.step(guided, t, manual).prev_sample
    torch.testing.assert_close(fused, manual, atol=1e-5, rtol=1e-5)


def test_seeded_stochastic_noise_is_the_public_philox_stream(backend):
    sampler = Ours(stochastic_sampling=True)
    sampler.set_timesteps(4)
    x, v = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    sampler.set_begin_index(2)
    seeded = sampler.step(v, sampler.timesteps[2], x, seed=9, sample_offset=4).prev_sample
    noise = N.randn(x.shape, 9, counter=2, sample_offset=4)  # counter = the step index
    sampler.set_begin_index(2)
    given = sampler.step(v, sampler.timesteps[2], x, variance_noise=noise).prev_sample
    torch.testing.assert_close(seeded, given, atol=2e-6, rtol=0)
    sampler.set_begin_index(2)
    alone = sampler.step(v[1:2], sampler.timesteps[2], x[1:2], seed=9, sample_offset=5).prev_sample
    assert torch.equal(alone[0], seeded[1])


# ---- SD3: a small transformer in a hand-written loop and in diffusers' pipeline ------------------------
@pytest.fixture(scope="module")
def sd3_transformer():
    torch.manual_seed(0)
    return diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=16, out_channels=4,
        pos_embed_max_size=16).eval()


def sd3_inputs():
    g = torch.Generator().manual_seed(0)
    return dict(prompt_embeds=torch.randn(1, 5, 16, generator=g), negative_prompt_embeds=torch.randn(1, 5, 16, generator=g),
                pooled_prompt_embeds=torch.randn(1, 16, generator=g),
                negative_pooled_prompt_embeds=torch.randn(1, 16, generator=g))


@torch.no_grad()
def test_sd3_transformer_loop_with_cfg_and_skip_layer_guidance(sd3_transformer):
    """SD3's reference loop: Euler on shifted sigmas, CFG 4.0 and skip-layer guidance (layer 1, scale 2.8)."""
    inputs = sd3_inputs()
    text = torch.cat([inputs["negative_prompt_embeds"], inputs["prompt_embeds"]])
    pooled = torch.cat([inputs["negative_pooled_prompt_embeds"], inputs["pooled_prompt_embeds"]])
    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))

    def model(x, t, skip_layers=None):
        n = x.shape[0]
        return sd3_transformer(hidden_states=x, encoder_hidden_states=text[-n:], pooled_projections=pooled[-n:],
                               timestep=t.expand(n), skip_layers=skip_layers).sample

    def loop(scheduler, fused):
        scheduler.set_timesteps(6)
        x = x_T.clone()
        for t in scheduler.timesteps:
            pred = model(torch.cat([x, x]), t)
            skip = model(x, t, skip_layers=[1])
            if fused:
                x = scheduler.step(pred, t, x, guidance_scale=4.0, skip_layer_output=skip,
                                   skip_layer_guidance_scale=2.8).prev_sample
            else:
                u, c = pred.chunk(2)
                guided = u + 4.0 * (c - u)
                guided = guided + (c - skip) * 2.8
                x = scheduler.step(guided, t, x, return_dict=False)[0]
        return x
    want = loop(Theirs(shift=3.0), fused=False)
    got = loop(Ours(shift=3.0), fused=True)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert want.abs().max() > 0.1


@torch.no_grad()
def test_inside_diffusers_stable_diffusion_3_pipeline(sd3_transformer):
    """diffusers' own StableDiffusion3Pipeline (CFG, skip-layer guidance, retrieve_timesteps) with our sampler."""
    def run(scheduler):
        pipe = diffusers.StableDiffusion3Pipeline(
            transformer=sd3_transformer, scheduler=scheduler, vae=None, text_encoder=None, tokenizer=None,
            text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
        pipe.set_progress_bar_config(disable=True)
        return pipe(**sd3_inputs(), height=64, width=64, num_inference_steps=5, guidance_scale=4.0,
                    generator=torch.Generator().manual_seed(1), output_type="latent", skip_guidance_layers=[1],
                    skip_layer_guidance_scale=2.8, skip_layer_guidance_start=0.0, skip_layer_guidance_stop=0.7).images
    want = run(Theirs(shift=3.0))
    got = run(Ours(shift=3.0))
    assert got.shape == (1, 4, 8, 8)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# ---- no host sync, fastdiff.sample ----------------------------------------------------------------
@pytest.mark.parametrize("config", [{"shift": 3.0}, {"stochastic_sampling": True}])
def test_loop_runs_on_the_meta_device(monkeypatch, config):
    """A whole loop (first step from a device timestep, no set_begin_index) never reads a device value."""
    monkeypatch.setenv("FASTDIFF_BACKEND", "reference")
    sampler = Ours(**config)
    sampler.set_timesteps(3, device="meta")
    x = torch.empty(SHAPE, device="meta")
    for t in sampler.timesteps:
        x = sampler.step(torch.cat([x, x]), t, x, guidance_scale=3.0, skip_layer_output=x,
                         skip_layer_guidance_scale=1.0, seed=3).prev_sample
    x = fastdiff.sample(lambda x, t: x, sampler, SHAPE, num_inference_steps=3, seed=1, device="meta", progress=False)
    assert x.device.type == "meta"


@pytest.mark.parametrize("config", [{"shift": 3.0}, {"stochastic_sampling": True}])
def test_step_compiles_fullgraph_without_recompiling(config):
    """step traces whole (no .item(), no data-dependent branch) and does not recompile from step to step."""
    ours, eager = Ours(**config), Ours(**config)
    for s in (ours, eager):
        s.set_timesteps(5)
        s.set_begin_index(0)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    y = x.clone()
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        step = torch.compile(ours.step, fullgraph=True, backend="aot_eager")
        for t in ours.timesteps:
            x = step(torch.cat([x, x]), t, x, seed=3, guidance_scale=2.0, skip_layer_output=x,
                     skip_layer_guidance_scale=1.0, return_dict=False)[0]
            y = eager.step(torch.cat([y, y]), t, y, seed=3, guidance_scale=2.0, skip_layer_output=y,
                           skip_layer_guidance_scale=1.0).prev_sample
    torch._dynamo.reset()
    torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("config", [{"shift": 3.0}, {"stochastic_sampling": True}])
def test_fastdiff_sample_equals_a_diffusers_loop(backend, config):
    theirs = Theirs(**config)
    theirs.set_timesteps(6)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(SHAPE, generator=g)  # what the pipelines draw (randn_tensor, CPU generator)
    for t in theirs.timesteps:
        x = theirs.step(velocity(x, t.expand(SHAPE[0])), t, x, generator=g).prev_sample
    got = fastdiff.sample(velocity, Ours(**config), SHAPE, num_inference_steps=6,
                          generator=torch.Generator().manual_seed(4), progress=False)
    torch.testing.assert_close(got, x, atol=LOOP_ATOL, rtol=0)


# ---- errors ------------------------------------------------------------------------------------
@pytest.mark.parametrize("config,kwargs,error,match", [
    ({"use_dynamic_shifting": True}, dict(num_inference_steps=4), ValueError, "mu must be passed"),
    ({}, dict(sigmas=[0.2, 0.5, 0.9]), ValueError, "sigmas must be strictly descending"),
    ({}, dict(timesteps=[100.0, 500.0]), ValueError, "timesteps must be strictly descending"),
    ({}, dict(sigmas=[1.0, 0.5], timesteps=[900.0]), ValueError, "same length"),
    ({}, dict(num_inference_steps=3, sigmas=[1.0, 0.5]), ValueError, "num_inference_steps"),
    ({}, dict(), ValueError, "pass num_inference_steps, sigmas or timesteps"),
    ({}, dict(num_inference_steps=0), ValueError, "num_inference_steps must be an int >= 1"),
])
def test_set_timesteps_errors(config, kwargs, error, match):
    with pytest.raises(error, match=match):
        Ours(**config).set_timesteps(**kwargs)


@pytest.mark.parametrize("config,error,match", [
    ({"time_shift_type": "cubic"}, ValueError, "time_shift_type must be one of"),
    ({"use_karras_sigmas": True, "use_beta_sigmas": True}, ValueError, "only one of"),
    ({"shift_terminal": 1.5}, ValueError, "shift_terminal must be in"),
])
def test_constructor_errors(config, error, match):
    with pytest.raises(error, match=match):
        Ours(**config)


def test_step_errors():
    sampler = Ours()
    sampler.set_timesteps(2)
    x = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="integer timestep"):
        sampler.step(x, 3, x)
    with pytest.raises(ValueError, match="skip_layer_output needs guidance_scale"):
        sampler.step(x, sampler.timesteps[0], x, skip_layer_output=x)
    with pytest.raises(ValueError, match="not in the schedule"):
        sampler.step(x, torch.tensor(123.0), x)
    sampler.set_timesteps(2)
    for t in sampler.timesteps:
        sampler.step(x, t, x)
    with pytest.raises(IndexError, match="past the end of the schedule"):
        sampler.step(x, sampler.timesteps[-1], x)
    with pytest.raises(ValueError, match="noise must be a tensor"):
        sampler.scale_noise(x, sampler.timesteps[:1])
    with pytest.raises(ValueError, match="per_token_timesteps needs"):
        sampler.set_timesteps(2)
        sampler.step(x, sampler.timesteps[0], x, per_token_timesteps=torch.ones(2, 4))
