"""The diffusers parity subset on a GPU, through the Triton and the C++ CUDA backends, and whole loops
under `torch.cuda.set_sync_debug_mode("error")` (issue 9).

- Single steps (DDPM and DDIM over a grid of prediction types, variances and clipping) and whole
  loops (1000-step DDPM, 50-step DDIM) on CUDA against diffusers on the CPU with the same
  generator, at the DESIGN tolerances (steps: fp32 atol 1e-6 rtol 1e-5 vs the float64-table twin;
  loops: atol 1e-4 vs stock diffusers). Every other fastdiff sampler that exists
  (`getattr(fastdiff, name)`) runs a loop against its diffusers twin too.
- No host sync: the steps of a loop (device timesteps, seeded in-kernel noise) and whole
  `fastdiff.sample()` calls (graphs off, one-step graph, whole-loop graph) run in sync debug mode
  "error" after one warm-up call.

Every test carries the `cuda` marker. A backend that cannot run fails, except the C++ CUDA backend,
which skips with its reason unless FASTDIFF_REQUIRE_CUDA_EXT=1 (as `make gpu-check` sets).
"""
import contextlib
import inspect
import os

import pytest
import torch

import fastdiff
from fastdiff import backends

pytestmark = pytest.mark.cuda
CUDA = torch.device("cuda")
FP32 = dict(atol=1e-6, rtol=1e-5)  # DESIGN: fp32 step vs reference
LOOP_ATOL = 1e-4  # DESIGN: full loops vs diffusers, fp32
SHAPE = (2, 3, 6, 5)
OTHER_SAMPLERS = ("EulerDiscreteSampler", "EulerAncestralDiscreteSampler", "FlowMatchEulerDiscreteSampler",
                  "DPMSolverMultistepSampler", "UniPCMultistepSampler")


def backend_reason(name: str) -> str | None:
    reason = backends.unavailable_reason(name, CUDA, torch.float32)
    if reason is None and not hasattr(backends.load(name), "step"):
        reason = f"the {name} backend does not implement the generic step"
    return reason


@pytest.fixture(params=["triton", "cpp"])
def backend(request, monkeypatch):
    """FASTDIFF_BACKEND forced to each CUDA backend (a cpp that cannot run skips unless required)."""
    name = request.param
    reason = backend_reason(name)
    if reason:
        if name == "cpp" and os.environ.get("FASTDIFF_REQUIRE_CUDA_EXT") != "1":
            pytest.skip(f"C++ CUDA backend: {reason} (FASTDIFF_REQUIRE_CUDA_EXT=1 makes this a failure)")
        pytest.fail(f"{name} cannot run on this GPU: {reason}")
    monkeypatch.setenv("FASTDIFF_BACKEND", name)
    return name


@pytest.fixture
def diffusers():
    return pytest.importorskip("diffusers", reason="the parity tests compare with diffusers (carry its wheel)")


def exact(diffusers, name, **config):
    """diffusers' scheduler with float64 tables (tests/diffusers_twins.py): fastdiff's rows must match it."""
    s = getattr(diffusers, name)(**config)
    s.alphas_cumprod = s.alphas_cumprod.double()
    s.one = torch.tensor(1.0, dtype=torch.float64)
    if hasattr(s, "final_alpha_cumprod"):
        s.final_alpha_cumprod = torch.as_tensor(s.final_alpha_cumprod).double()
    return s


def inputs(seed, channels=3):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(SHAPE, generator=g)
    model_output = torch.randn((SHAPE[0], channels, *SHAPE[2:]), generator=g)
    if channels == 2 * SHAPE[1]:  # a positive variance half keeps diffusers' "learned" finite
        model_output[:, SHAPE[1]:] = model_output[:, SHAPE[1]:].abs() * 1e-3
    return model_output, sample


def compare_steps(ours, theirs, step_kwargs, channels=3, steps=10):
    """Each step on CUDA (ours) vs the CPU twin (theirs), same inputs and generator."""
    ours.set_timesteps(steps, device=CUDA)
    theirs.set_timesteps(steps)
    assert torch.equal(ours.timesteps.cpu(), theirs.timesteps)
    for i, t in enumerate(theirs.timesteps):
        model_output, sample = inputs(i, channels)
        got = ours.step(model_output.to(CUDA), ours.timesteps[i], sample.to(CUDA),
                        generator=torch.Generator().manual_seed(i), **step_kwargs)
        want = theirs.step(model_output, t, sample, generator=torch.Generator().manual_seed(i), **step_kwargs)
        assert got.prev_sample.device.type == "cuda"  # torch.device("cuda") != its result's "cuda:0"
        torch.testing.assert_close(got.prev_sample.cpu(), want.prev_sample.float(), **FP32)
        torch.testing.assert_close(got.pred_original_sample.cpu(), want.pred_original_sample.float(), **FP32)


CLIPPING = {"none": dict(clip_sample=False), "clip": dict(clip_sample=True, clip_sample_range=1.5),
            "threshold": dict(thresholding=True, sample_max_value=3.0, dynamic_thresholding_ratio=0.9)}


@pytest.mark.parametrize("clipping", list(CLIPPING))
@pytest.mark.parametrize("variance,prediction", [("fixed_small", "epsilon"), ("fixed_large", "v_prediction"),
                                                 ("learned_range", "epsilon"), ("learned", "sample")])
def test_ddpm_steps(backend, diffusers, variance, prediction, clipping):
    config = dict(variance_type=variance, prediction_type=prediction, **CLIPPING[clipping])
    channels = 6 if variance.startswith("learned") else 3
    compare_steps(fastdiff.DDPMSampler(**config), exact(diffusers, "DDPMScheduler", **config), {}, channels)


@pytest.mark.parametrize("clipping", list(CLIPPING))
@pytest.mark.parametrize("prediction,eta,clipped", [("epsilon", 0.0, False), ("v_prediction", 1.0, False),
                                                    ("sample", 0.5, True)])
def test_ddim_steps(backend, diffusers, prediction, eta, clipped, clipping):
    config = dict(prediction_type=prediction, **CLIPPING[clipping])
    compare_steps(fastdiff.DDIMSampler(**config), exact(diffusers, "DDIMScheduler", **config),
                  dict(eta=eta, use_clipped_model_output=clipped))


def toy_model(x, t):
    """A deterministic stand-in for a denoiser: depends on x and t (a scalar or one per sample), bounded."""
    t = torch.as_tensor(t, device=x.device).float()
    if t.ndim:
        t = t.reshape(-1, *([1] * (x.ndim - 1)))
    return torch.tanh(0.9 * x + 0.001 * t)


def scaled_denoiser(x, t):
    """For samplers with sigmas (scaled model inputs): eps ~ the scaled input, so x0 stays data-sized."""
    t = torch.as_tensor(t, device=x.device).float()
    if t.ndim:
        t = t.reshape(-1, *([1] * (x.ndim - 1)))
    return 0.95 * x + 0.05 * torch.tanh(x + 0.001 * t)


def run_loop(scheduler, steps, device, seed=0, shape=(2, 3, 8, 8), model=toy_model, **step_kwargs):
    """The loop a diffusers user writes (scale_model_input, init_noise_sigma), same generator on any device."""
    scheduler.set_timesteps(steps, device=device)
    generator = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=generator) * getattr(scheduler, "init_noise_sigma", 1.0)).to(device)
    takes_generator = "generator" in inspect.signature(scheduler.step).parameters
    scale = getattr(scheduler, "scale_model_input", lambda x, t: x)  # flow matching has none
    for t in scheduler.timesteps:
        model_output = model(scale(x, t), t)
        extra = {"generator": generator} if takes_generator else {}
        x = scheduler.step(model_output, t, x, **extra, **step_kwargs).prev_sample
    return x


@pytest.mark.parametrize("config", [{}, {"prediction_type": "v_prediction", "variance_type": "fixed_large"}])
def test_ddpm_1000_step_loop(backend, diffusers, config):
    ours = run_loop(fastdiff.DDPMSampler(**config), 1000, CUDA)
    theirs = run_loop(diffusers.DDPMScheduler(**config), 1000, "cpu")
    torch.testing.assert_close(ours.cpu(), theirs, atol=LOOP_ATOL, rtol=0)


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("config", [{}, {"prediction_type": "sample", "timestep_spacing": "trailing"}])
def test_ddim_50_step_loop(backend, diffusers, eta, config):
    ours = run_loop(fastdiff.DDIMSampler(**config), 50, CUDA, eta=eta)
    theirs = run_loop(diffusers.DDIMScheduler(**config), 50, "cpu", eta=eta)
    torch.testing.assert_close(ours.cpu(), theirs, atol=LOOP_ATOL, rtol=0)


@pytest.mark.parametrize("name", OTHER_SAMPLERS)
def test_other_samplers_loop(backend, diffusers, name):
    cls = getattr(fastdiff, name, None)
    if cls is None:
        pytest.skip(f"fastdiff.{name} does not exist yet")
    twin = getattr(diffusers, cls.diffusers_class_name, None)
    if twin is None:
        pytest.skip(f"diffusers {diffusers.__version__} has no {cls.diffusers_class_name}")
    ours = run_loop(cls(), 20, CUDA, model=scaled_denoiser)
    theirs = run_loop(twin(), 20, "cpu", model=scaled_denoiser)
    torch.testing.assert_close(ours.cpu(), theirs, atol=LOOP_ATOL, rtol=0)


# ---- no host sync --------------------------------------------------------------------------------
@contextlib.contextmanager
def sync_debug_error():
    """Any host synchronisation inside raises (torch.cuda.set_sync_debug_mode("error"))."""
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)
        torch.cuda.synchronize()


def seeded_samplers():
    """(id, sampler factory, step options) of every sampler, with in-kernel (seeded) noise where it has noise."""
    cases = [("ddpm", fastdiff.DDPMSampler, {}), ("ddim-eta1", fastdiff.DDIMSampler, {"eta": 1.0})]
    for name in OTHER_SAMPLERS:
        if getattr(fastdiff, name, None) is not None:
            cases.append((name, getattr(fastdiff, name), {}))
    return cases


@pytest.mark.parametrize("factory,options", [pytest.param(f, o, id=i) for i, f, o in seeded_samplers()])
def test_steps_of_a_loop_never_sync(backend, factory, options):
    """Device timesteps, seeded noise, in-place steps: the per-step path never waits for the GPU."""
    sampler = factory()
    sampler.set_timesteps(10, device=CUDA)  # uploads the table (set-up, outside the guarded region)
    x = torch.randn(SHAPE, device=CUDA) * getattr(sampler, "init_noise_sigma", 1.0)
    takes_seed = "seed" in inspect.signature(sampler.step).parameters
    extra = {"seed": 7} if takes_seed else {}
    with sync_debug_error():
        for t in sampler.timesteps:
            model_output = scaled_denoiser(getattr(sampler, "scale_model_input", lambda x, t: x)(x, t), t)
            x = sampler.step(model_output, t, x, **extra, **options).prev_sample
    assert torch.isfinite(x).all()


@pytest.mark.parametrize("cuda_graph", [False, True, "loop"], ids=["eager", "graph-step", "graph-loop"])
@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_whole_sample_call_never_syncs(backend, kind, cuda_graph):
    """fastdiff.sample() with seed noise and device timesteps, graphs off and on: after a warm-up call (which
    captures the graph), a second identical call runs whole in sync debug mode "error". With graphs off
    this includes set_timesteps, whose table upload must not be a blocking host copy."""
    sampler = fastdiff.DDPMSampler(num_train_timesteps=100) if kind == "ddpm" else fastdiff.DDIMSampler()
    model = toy_model
    args = dict(num_inference_steps=10, seed=3, device=CUDA, progress=False, cuda_graph=cuda_graph)
    if kind == "ddim":
        args["eta"] = 1.0
    expected = fastdiff.sample(model, sampler, SHAPE, **args)
    with sync_debug_error():
        got = fastdiff.sample(model, sampler, SHAPE, **args)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
