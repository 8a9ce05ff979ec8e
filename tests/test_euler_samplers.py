"""EulerDiscreteSampler and EulerAncestralDiscreteSampler vs diffusers' EulerDiscreteScheduler and
EulerAncestralDiscreteScheduler: schedules, input scaling, single steps and whole loops over every option
(same generator), churn, add_noise / get_velocity, guidance, seeded noise, the meta device,
fastdiff.sample() and errors.

Measured (reference and cpp backends, fp32, this grid; triton on its subset): schedules and input scaling
are bit-equal; loops differ from stock diffusers by float32 rounding only, worst 1.0e-6 for Euler
(zero-SNR v-prediction, first sigma 4096) and 2.4e-7 for Euler ancestral; single steps within 7.8e-7 x
max(1, sigma). Rows hold diffusers' float32 coefficients; the kernel computes x' = q x + (1 - q) x0
(q = sigma_next / sigma^) where diffusers computes x + (x - x0) / sigma^ dt, which cancels when
sigma_next << sigma^: with squaredcos_cap_v2 (sigma_max = 20291) stock diffusers is 9.4e-4 off its own
float64 twin at the first step, fastdiff 1.2e-6, so that case is compared with the float64 twin.
"""
import inspect
import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import fastdiff  # noqa: E402
from fastdiff import noise as N  # noqa: E402

Euler, EulerTheirs = fastdiff.EulerDiscreteSampler, diffusers.EulerDiscreteScheduler
Ancestral, AncestralTheirs = fastdiff.EulerAncestralDiscreteSampler, diffusers.EulerAncestralDiscreteScheduler
PAIRS = {"euler": (Euler, EulerTheirs), "ancestral": (Ancestral, AncestralTheirs)}
LOOP_ATOL = 1e-4  # DESIGN: fp32 loops vs diffusers
SHAPE = (2, 4, 6, 6)
SDXL = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing="leading",
            steps_offset=1)

pytestmark = pytest.mark.usefixtures("one_thread")


def denoiser(x, t):
    """A deterministic stand-in for a scaled-input model (eps ~ input): depends on x and t, stays bounded."""
    t = torch.as_tensor(t).reshape(-1)[:1].reshape(())
    return 0.95 * x + 0.05 * torch.tanh(x + 0.001 * t)


# name -> (sampler kind, constructor config, set_timesteps arguments, step options)
CASES = {
    "sdxl": ("euler", SDXL, dict(num_inference_steps=12), {}),
    "v-karras": ("euler", {"prediction_type": "v_prediction", "use_karras_sigmas": True}, dict(num_inference_steps=10), {}),
    "exponential-sigma-min": ("euler", {"use_exponential_sigmas": True, "final_sigmas_type": "sigma_min"},
                              dict(num_inference_steps=10), {}),
    "beta-sigmas": ("euler", {"use_beta_sigmas": True, "beta_schedule": "scaled_linear"}, dict(num_inference_steps=10), {}),
    "log-linear": ("euler", {"interpolation_type": "log_linear"}, dict(num_inference_steps=10), {}),
    "edm-continuous-v": ("euler", {"timestep_type": "continuous", "prediction_type": "v_prediction",
                                   "use_karras_sigmas": True, "sigma_min": 0.002, "sigma_max": 80.0},
                         dict(num_inference_steps=10), {}),
    "zero-snr-v-trailing": ("euler", {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction",
                                      "timestep_spacing": "trailing"}, dict(num_inference_steps=10), {}),
    "sample-cosine": ("euler", {"prediction_type": "sample", "beta_schedule": "squaredcos_cap_v2"},
                      dict(num_inference_steps=10), {}),
    "churn": ("euler", {}, dict(num_inference_steps=10), {"s_churn": 2.0}),
    "churn-window": ("euler", SDXL, dict(num_inference_steps=10),
                     {"s_churn": 8.0, "s_tmin": 0.3, "s_tmax": 6.0, "s_noise": 1.003}),
    "custom-sigmas": ("euler", {}, dict(sigmas=[14.0, 7.0, 3.0, 1.0, 0.3, 0.0]), {}),
    "custom-timesteps": ("euler", {}, dict(timesteps=[999.0, 750.5, 500.0, 250.0, 10.0]), {}),
    "ancestral": ("ancestral", {}, dict(num_inference_steps=12), {}),
    "sdxl-turbo-4": ("ancestral", {**SDXL, "timestep_spacing": "trailing", "steps_offset": 0},
                     dict(num_inference_steps=4), {}),
    "sdxl-turbo-1": ("ancestral", {**SDXL, "timestep_spacing": "trailing", "steps_offset": 0},
                     dict(num_inference_steps=1), {}),
    "ancestral-v-zero-snr-leading": ("ancestral", {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True,
                                                   "timestep_spacing": "leading", "steps_offset": 1},
                                     dict(num_inference_steps=10), {}),
}


def make(case):
    kind, config, kwargs, options = CASES[case]
    ours, theirs = (cls(**config) for cls in PAIRS[kind])
    for s in (ours, theirs):
        s.set_timesteps(**kwargs)
    return ours, theirs, options


def run_loop(scheduler, generator, x_T, **options):
    x = x_T * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.step(denoiser(scheduler.scale_model_input(x, t), t), t, x, generator=generator,
                           **options).prev_sample
    return x


# ---- the diffusers surface ------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(PAIRS))
def test_same_constructor_keywords_and_defaults(kind):
    ours_cls, theirs_cls = PAIRS[kind]
    ours = {k: p.default for k, p in inspect.signature(ours_cls.__init__).parameters.items() if k != "self"}
    theirs = {k: p.default for k, p in inspect.signature(theirs_cls.__init__).parameters.items() if k != "self"}
    assert ours.pop("table_dtype") == "float32"  # documented fastdiff-only key
    assert ours == theirs
    step_theirs = [k for k in inspect.signature(theirs_cls.step).parameters if k != "self"]
    step_ours = [k for k in inspect.signature(ours_cls.step).parameters if k != "self"]
    assert step_ours[:len(step_theirs)] == step_theirs
    assert list(inspect.signature(ours_cls.set_timesteps).parameters) == \
        list(inspect.signature(theirs_cls.set_timesteps).parameters)


@pytest.mark.parametrize("kind", list(PAIRS))
def test_config_round_trips_and_from_diffusers_config(kind, tmp_path):
    ours_cls, theirs_cls = PAIRS[kind]
    config = dict(SDXL, prediction_type="v_prediction", rescale_betas_zero_snr=True)
    ours = ours_cls.from_config(theirs_cls(**config).config)
    assert {k: ours.config[k] for k in config} == config
    assert {k: theirs_cls.from_config(ours.config).config[k] for k in config} == config
    ours.save_pretrained(tmp_path / "scheduler")
    assert {k: theirs_cls.from_pretrained(tmp_path, subfolder="scheduler").config[k] for k in config} == config
    theirs_cls(**config).save_pretrained(tmp_path / "theirs")
    assert {k: ours_cls.from_pretrained(tmp_path / "theirs").config[k] for k in config} == config
    assert torch.equal(ours_cls.from_pretrained(tmp_path / "theirs").alphas_cumprod, theirs_cls(**config).alphas_cumprod)


@pytest.mark.parametrize("kind", list(PAIRS))
def test_attributes_before_and_after_set_timesteps(kind):
    ours, theirs = (cls(**SDXL) for cls in PAIRS[kind])
    for when in ("constructed", "set"):
        assert torch.equal(ours.sigmas, theirs.sigmas) and torch.equal(ours.timesteps, theirs.timesteps)
        assert torch.equal(ours.init_noise_sigma, theirs.init_noise_sigma)
        assert (ours.order, len(ours), ours.num_inference_steps) == (theirs.order, len(theirs), theirs.num_inference_steps)
        ours.set_timesteps(9)
        theirs.set_timesteps(9)
    assert ours.step_index is None and ours.begin_index is None


@pytest.mark.parametrize("case", list(CASES))
def test_schedule_and_input_scaling_equal_diffusers(case):
    ours, theirs, _ = make(case)
    assert torch.equal(ours.sigmas, theirs.sigmas), (ours.sigmas, theirs.sigmas)
    assert torch.equal(ours.timesteps, theirs.timesteps) and ours.timesteps.dtype == theirs.timesteps.dtype
    assert torch.equal(ours.init_noise_sigma, theirs.init_noise_sigma)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    for i in range(len(theirs.timesteps)):
        ours.set_begin_index(i)
        theirs._step_index = i
        assert torch.equal(ours.scale_model_input(x, theirs.timesteps[i]), theirs.scale_model_input(x, theirs.timesteps[i]))


# ---- parity: single steps and loops -------------------------------------------------------------------
@pytest.mark.parametrize("case", ["sdxl", "zero-snr-v-trailing", "churn-window", "ancestral"])
def test_single_steps_equal_diffusers(backend, case):
    ours, theirs, options = make(case)
    g = torch.Generator().manual_seed(0)
    for i in range(len(theirs.timesteps)):
        sigma = float(theirs.sigmas[i])
        x, eps = sigma * torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
        ours.set_begin_index(i)
        theirs.set_begin_index(i)
        t = theirs.timesteps[i]
        want = theirs.step(eps, t, x, generator=torch.Generator().manual_seed(i), **options)
        got = ours.step(eps, t, x, generator=torch.Generator().manual_seed(i), **options)
        scale = max(1.0, sigma)
        torch.testing.assert_close(got.prev_sample, want.prev_sample, atol=2e-6 * scale, rtol=1e-5)
        torch.testing.assert_close(got.pred_original_sample, want.pred_original_sample, atol=2e-6 * scale, rtol=1e-5)


def float64_twin(theirs):
    """diffusers with float64 sigmas and a float64 loop: its x0 and update run in float64 (only the sample is
    rounded to float32 at each step's upcast), free of the cancellation in x + d dt at sigma_max = 2e4."""
    theirs.sigmas = theirs.sigmas.double()
    return theirs


STOCK_CANCELS = {"sample-cosine"}  # squaredcos_cap_v2: sigma_max = 20291; stock diffusers is off by ~1e-3 there


@pytest.mark.parametrize("case", list(CASES))
def test_loop_equals_diffusers_same_generator(backend, case):
    ours, theirs, options = make(case)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    got = run_loop(ours, torch.Generator().manual_seed(2), x_T, **options)
    if case in STOCK_CANCELS:
        want = run_loop(float64_twin(theirs), None, x_T.double(), **options).float()
    else:
        want = run_loop(theirs, torch.Generator().manual_seed(2), x_T, **options)
    torch.testing.assert_close(got, want, atol=LOOP_ATOL, rtol=0)
    assert 0.05 < got.abs().max() < 100


@pytest.mark.parametrize("case", ["sdxl", "churn", "sdxl-turbo-4"])
def test_loop_equals_diffusers_triton(triton_backend, case):
    ours, theirs, options = make(case)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(run_loop(ours, torch.Generator().manual_seed(2), x_T, **options),
                               run_loop(theirs, torch.Generator().manual_seed(2), x_T, **options), atol=LOOP_ATOL, rtol=0)


@pytest.mark.parametrize("kind", list(PAIRS))
def test_float64_tables(kind):
    """table_dtype='float64': the same coefficients derived in float64 from the same float32 sigmas; a float64
    loop then tracks diffusers' float64 twin to its per-step float32 upcast of the sample."""
    ours, ours32 = PAIRS[kind][0](**SDXL, table_dtype="float64"), PAIRS[kind][0](**SDXL)
    theirs = PAIRS[kind][1](**SDXL)
    for s in (ours, ours32, theirs):
        s.set_timesteps(8)
    torch.testing.assert_close(ours._table(torch.device("cpu")), ours32._table(torch.device("cpu")),
                               atol=1e-7, rtol=1e-6, equal_nan=True)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = run_loop(ours, torch.Generator().manual_seed(2), x_T)
    want = run_loop(float64_twin(theirs), torch.Generator().manual_seed(2), x_T)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_churn_draws_noise_only_where_diffusers_does():
    """With a churn window, diffusers draws at the steps inside it only: the generator stays in step."""
    ours, theirs, options = make("churn-window")
    windowed = [(0.3 <= float(s) <= 6.0) for s in theirs.sigmas[:-1]]
    assert any(windowed) and not all(windowed)
    gen_ours, gen_theirs = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    x = torch.randn(SHAPE)
    for t in theirs.timesteps:
        ours.step(x, t, x, generator=gen_ours, **options)
        theirs.step(x, t, x, generator=gen_theirs, **options)
        assert torch.equal(gen_ours.get_state(), gen_theirs.get_state())


@pytest.mark.parametrize("kind", list(PAIRS))
@pytest.mark.parametrize("begin_index", [None, 2])
def test_add_noise_equals_diffusers(kind, begin_index):
    ours, theirs = (cls(**SDXL) for cls in PAIRS[kind])
    for s in (ours, theirs):
        s.set_timesteps(10)
        if begin_index is not None:
            s.set_begin_index(begin_index)
    g = torch.Generator().manual_seed(0)
    x, n = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    t = theirs.timesteps[[3, 7]]
    assert torch.equal(ours.add_noise(x, n, t), theirs.add_noise(x, n, t))
    training = PAIRS[kind][0](), PAIRS[kind][1]()  # before set_timesteps: the full training schedule
    t = torch.tensor([10, 900])
    assert torch.equal(training[0].add_noise(x, n, t), training[1].add_noise(x, n, t))


def test_get_velocity_equals_diffusers():
    ours, theirs = Euler(), EulerTheirs()
    for s in (ours, theirs):
        s.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    x, n = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    t = theirs.timesteps[[1, 8]]
    assert torch.equal(ours.get_velocity(x, n, t), theirs.get_velocity(x, n, t))
    assert not hasattr(Ancestral(), "get_velocity") and not hasattr(AncestralTheirs(), "get_velocity")


# ---- guidance and noise -------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(PAIRS))
def test_cfg_and_skip_layer_guidance_fused_equal_manual(backend, kind):
    fused_sampler, manual_sampler = (PAIRS[kind][0](**SDXL) for _ in range(2))
    for s in (fused_sampler, manual_sampler):
        s.set_timesteps(5)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE, generator=g) * fused_sampler.init_noise_sigma
    u, c, skip = (torch.randn(SHAPE, generator=g) for _ in range(3))
    fused, manual = x.clone(), x.clone()
    for t in fused_sampler.timesteps:
        fused = fused_sampler.step(torch.cat([u, c]), t, fused, guidance_scale=7.5, skip_layer_output=skip,
                                   skip_layer_guidance_scale=1.5, seed=3).prev_sample
        guided = u + 7.5 * (c - u) + (c - skip) * 1.5
        manual = manual_sampler.step(guided, t, manual, seed=3).prev_sample
    torch.testing.assert_close(fused, manual, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", ["ancestral", "churn"])
def test_seeded_noise_is_the_public_philox_stream(backend, case):
    ours, _, options = make(case)
    x, eps = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    t = ours.timesteps[2]
    ours.set_begin_index(2)
    seeded = ours.step(eps, t, x, seed=9, sample_offset=4, **options).prev_sample
    ours.set_begin_index(2)
    noise = N.randn(x.shape, 9, counter=2, sample_offset=4)  # counter = the step index
    given = ours.step(eps, t, x, variance_noise=noise, **options).prev_sample
    torch.testing.assert_close(seeded, given, atol=1e-5, rtol=0)
    ours.set_begin_index(2)
    alone = ours.step(eps[1:2], t, x[1:2], seed=9, sample_offset=5, **options).prev_sample
    assert torch.equal(alone[0], seeded[1])


def test_half_precision_sample_steps_in_fp32_and_keeps_its_dtype():
    ours, theirs, _ = make("sdxl")
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    got = run_loop(ours, None, x_T.to(torch.float16))
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), run_loop(theirs, None, x_T), atol=2e-2, rtol=2e-2)


# ---- no host sync, fastdiff.sample ----------------------------------------------------------------
@pytest.mark.parametrize("case", ["sdxl", "churn", "ancestral"])
def test_loop_runs_on_the_meta_device(monkeypatch, case):
    """A whole loop (first step from a device timestep, no set_begin_index) never reads a device value."""
    monkeypatch.setenv("FASTDIFF_BACKEND", "reference")
    kind, config, kwargs, options = CASES[case]
    sampler = PAIRS[kind][0](**config)
    sampler.set_timesteps(device="meta", **kwargs)
    x = torch.empty(SHAPE, device="meta") * sampler.init_noise_sigma
    for t in sampler.timesteps[:3]:
        model_input = sampler.scale_model_input(x, t)
        x = sampler.step(torch.cat([model_input, model_input]), t, x, guidance_scale=3.0, seed=1,
                         **options).prev_sample
    x = fastdiff.sample(denoiser, sampler, SHAPE, num_inference_steps=3, seed=1, device="meta", progress=False)
    assert x.device.type == "meta"


@pytest.mark.parametrize("case", ["churn", "ancestral"])
def test_step_compiles_fullgraph_without_recompiling(case):
    """scale_model_input and step trace whole (no .item(), no data-dependent branch) and do not recompile
    from step to step; a churn table is built by one eager step first (a compiled step only reads tables)."""
    ours, _, options = make(case)
    eager, _, _ = make(case)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    ours.step(x, ours.timesteps[0], x.clone(), seed=1, **options)  # builds the option's table
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        step = torch.compile(ours.step, fullgraph=True, backend="aot_eager")
        scale = torch.compile(ours.scale_model_input, fullgraph=True, backend="aot_eager")
        for s in (ours, eager):
            s.set_begin_index(0)
        y = x.clone()
        for t in ours.timesteps[:4]:
            x = step(denoiser(scale(x, t), t), t, x, seed=3, return_dict=False, **options)[0]
            y = eager.step(denoiser(eager.scale_model_input(y, t), t), t, y, seed=3, **options).prev_sample
    torch._dynamo.reset()
    torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", ["sdxl", "ancestral"])
def test_fastdiff_sample_equals_a_diffusers_loop(backend, case):
    kind, config, _, _ = CASES[case]
    theirs = PAIRS[kind][1](**config)
    theirs.set_timesteps(8)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(SHAPE, generator=g) * theirs.init_noise_sigma  # SDXL's prepare_latents
    for t in theirs.timesteps:
        x = theirs.step(denoiser(theirs.scale_model_input(x, t), t.expand(SHAPE[0])), t, x, generator=g).prev_sample
    got = fastdiff.sample(denoiser, PAIRS[kind][0](**config), SHAPE, num_inference_steps=8,
                          generator=torch.Generator().manual_seed(4), progress=False)
    torch.testing.assert_close(got, x, atol=LOOP_ATOL, rtol=0)


# ---- errors ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,error,match", [
    (dict(sigmas=[1.0, 3.0, 0.0]), ValueError, "sigmas must be strictly descending"),
    (dict(timesteps=[10.0, 500.0]), ValueError, "timesteps must be strictly descending"),
    (dict(num_inference_steps=3, sigmas=[2.0, 0.0]), ValueError, "only one of"),
    (dict(timesteps=[900.0, 100.0], sigmas=[2.0, 0.0]), ValueError, "only one of"),
    (dict(), ValueError, "exactly one of"),
    (dict(num_inference_steps=-1), ValueError, "num_inference_steps must be an int >= 1"),
])
def test_set_timesteps_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        Euler().set_timesteps(**kwargs)
    with pytest.raises(ValueError, match="cannot be set with use_karras_sigmas"):
        Euler(use_karras_sigmas=True).set_timesteps(timesteps=[900.0, 100.0])


@pytest.mark.parametrize("config,match", [
    ({"prediction_type": "flow"}, "prediction_type must be one of"),
    ({"beta_schedule": "sigmoid"}, "beta_schedule must be one of"),
    ({"interpolation_type": "cubic"}, "interpolation_type must be one of"),
    ({"timestep_type": "edm"}, "timestep_type must be one of"),
    ({"final_sigmas_type": "one"}, "final_sigmas_type must be one of"),
    ({"use_karras_sigmas": True, "use_exponential_sigmas": True}, "only one of"),
    ({"timestep_spacing": "uniform"}, "timestep_spacing must be one of"),
    ({"table_dtype": "float16"}, "table_dtype must be one of"),
])
def test_constructor_errors(config, match):
    with pytest.raises(ValueError, match=match):
        Euler(**config)


@pytest.mark.parametrize("kind", list(PAIRS))
def test_step_errors(kind):
    sampler = PAIRS[kind][0]()
    sampler.set_timesteps(2)
    x = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="integer timestep"):
        sampler.step(x, torch.tensor(999), x)
    with pytest.raises(ValueError, match="skip_layer_output needs guidance_scale"):
        sampler.step(x, sampler.timesteps[0], x, skip_layer_output=x)
    with pytest.raises(ValueError, match="pass at most one of generator, variance_noise and seed"):
        sampler.step(x, sampler.timesteps[0], x, seed=1, variance_noise=x, **({"s_churn": 1.0} if kind == "euler" else {}))
    sampler.set_timesteps(2)
    for t in sampler.timesteps:
        sampler.step(x, t, x)
    with pytest.raises(IndexError, match="past the end of the schedule"):
        sampler.step(x, sampler.timesteps[-1], x)
    if kind == "euler":
        with pytest.raises(ValueError, match="s_churn must be a float"):
            sampler.step(x, sampler.timesteps[0], x, s_churn=math.nan)
        sampler.set_timesteps(2)
        sampler.set_begin_index(0)
        with pytest.raises(RuntimeError, match="run one eager step with these options first"):
            torch.compile(sampler.step, fullgraph=True, backend="eager")(x, sampler.timesteps[0], x, s_churn=1.0)
        torch._dynamo.reset()
    else:
        sample_sampler = Ancestral(prediction_type="sample")
        sample_sampler.set_timesteps(2)
        with pytest.raises(NotImplementedError, match="prediction_type='sample'"):
            sample_sampler.step(x, sample_sampler.timesteps[0], x)
