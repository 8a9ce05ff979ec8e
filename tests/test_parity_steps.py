"""Single steps vs diffusers over the grid of every config option (DESIGN "oracle chain").

Two pairings: the default tables (derived in diffusers' float32 operation order) against stock
diffusers, and `table_dtype="float64"` against diffusers with float64 tables (`exact`). Runs on the
default CPU backend (the C++ extension when built) and, via FASTDIFF_BACKEND, on the reference;
the Triton and C++ kernels are checked against the reference in their own files.
"""
import itertools

import pytest
import torch

import fastdiff
from diffusers_twins import FP32, STOCK_DIFFUSERS_ATOL, exact, stock

VARIANCE = ["fixed_small", "fixed_small_log", "fixed_large", "learned", "learned_range"]
PREDICTION = ["epsilon", "sample", "v_prediction"]
CLIPPING = {"none": dict(clip_sample=False), "clip": dict(clip_sample=True, clip_sample_range=1.5),
            "threshold": dict(thresholding=True, sample_max_value=3.0, dynamic_thresholding_ratio=0.9)}
SHAPE = (2, 3, 6, 5)


@pytest.fixture(params=["default", "reference"])
def backend(request, monkeypatch):
    if request.param == "reference":
        monkeypatch.setenv("FASTDIFF_BACKEND", "reference")
    return request.param


@pytest.fixture(params=[("default", "float32"), ("reference", "float32"), ("default", "float64")],
                ids=["default-float32", "reference-float32", "default-float64"])
def twin(request, monkeypatch):
    """(table_dtype, the diffusers scheduler it must match): stock for float32 tables, exact for float64
    (that pairing on the default backend only: the backends are compared with each other in their own files)."""
    backend, table_dtype = request.param
    if backend == "reference":
        monkeypatch.setenv("FASTDIFF_BACKEND", "reference")
    return table_dtype, (stock if table_dtype == "float32" else exact)


def make_inputs(dtype, layout, channels=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(SHAPE, generator=g, dtype=dtype)
    model_output = torch.randn((SHAPE[0], channels, *SHAPE[2:]), generator=g, dtype=dtype)
    if channels == 2 * SHAPE[1]:  # a positive variance half keeps diffusers' "learned" finite
        model_output[:, SHAPE[1]:] = model_output[:, SHAPE[1]:].abs() * 1e-3
    if layout == "strided":  # every other column of a wider buffer
        sample = torch.cat([sample, sample], -1)[..., ::2]
        model_output = torch.cat([model_output, model_output], -1)[..., ::2]
        assert not sample.is_contiguous()
    elif layout == "channels_last":
        sample, model_output = (x.contiguous(memory_format=torch.channels_last) for x in (sample, model_output))
    return model_output, sample


def run_steps(ours, theirs, step_kwargs, dtype, layout, channels):
    ours.set_timesteps(10)
    theirs.set_timesteps(10)
    assert torch.equal(ours.timesteps, theirs.timesteps)
    worst = 0.0
    for i, t in enumerate(ours.timesteps):
        model_output, sample = make_inputs(dtype, layout, channels, seed=i)
        got = ours.step(model_output, t, sample, generator=torch.Generator().manual_seed(i), **step_kwargs)
        want = theirs.step(model_output, t, sample, generator=torch.Generator().manual_seed(i), **step_kwargs)
        for g, w in ((got.prev_sample, want.prev_sample), (got.pred_original_sample, want.pred_original_sample)):
            assert g.dtype == sample.dtype and g.shape == sample.shape
            torch.testing.assert_close(g, w.to(g.dtype), **FP32)
            worst = max(worst, (g - w).abs().max().item())
    return worst


@pytest.mark.parametrize("variance,prediction,clipping", list(itertools.product(VARIANCE, PREDICTION, CLIPPING)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ddpm_step_grid(twin, variance, prediction, clipping, dtype):
    table_dtype, theirs = twin
    config = dict(variance_type=variance, prediction_type=prediction, **CLIPPING[clipping])
    channels = 6 if variance.startswith("learned") else 3
    run_steps(fastdiff.DDPMSampler(**config, table_dtype=table_dtype), theirs("DDPMScheduler", **config), {}, dtype,
              "contiguous", channels)


@pytest.mark.parametrize("prediction,clipping", list(itertools.product(PREDICTION, CLIPPING)))
@pytest.mark.parametrize("eta,clipped", [(0.0, False), (0.5, True), (1.0, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ddim_step_grid(twin, prediction, clipping, eta, clipped, dtype):
    table_dtype, theirs = twin
    config = dict(prediction_type=prediction, **CLIPPING[clipping])
    kwargs = dict(eta=eta, use_clipped_model_output=clipped)
    run_steps(fastdiff.DDIMSampler(**config, table_dtype=table_dtype), theirs("DDIMScheduler", **config), kwargs,
              dtype, "contiguous", 3)


@pytest.mark.parametrize("layout", ["strided", "channels_last"])
@pytest.mark.parametrize("name,cls,kwargs", [("DDPMScheduler", fastdiff.DDPMSampler, {}),
                                             ("DDIMScheduler", fastdiff.DDIMSampler, {"eta": 0.7})])
def test_layouts(backend, layout, name, cls, kwargs):
    run_steps(cls(), exact(name), kwargs, torch.float32, layout, 3)


@pytest.mark.parametrize("name,cls,kwargs", [("DDPMScheduler", fastdiff.DDPMSampler, {}),
                                             ("DDIMScheduler", fastdiff.DDIMSampler, {"eta": 1.0})])
@pytest.mark.parametrize("spacing,offset", [("leading", 1), ("linspace", 0), ("trailing", 0)])
@pytest.mark.parametrize("table_dtype,tolerance", [("float32", FP32), ("float64", dict(atol=STOCK_DIFFUSERS_ATOL,
                                                                                       rtol=1e-5))])
def test_against_stock_diffusers(name, cls, kwargs, spacing, offset, table_dtype, tolerance):
    """float32 tables are diffusers' own numbers; float64 tables differ by diffusers' float32 rounding."""
    config = dict(timestep_spacing=spacing, steps_offset=offset, prediction_type="v_prediction", clip_sample=False)
    ours, theirs = cls(**config, table_dtype=table_dtype), stock(name, **config)
    ours.set_timesteps(25)
    theirs.set_timesteps(25)
    for i, t in enumerate(ours.timesteps):
        model_output, sample = make_inputs(torch.float32, "contiguous", seed=i)
        got = ours.step(model_output, t, sample, generator=torch.Generator().manual_seed(i), **kwargs)
        want = theirs.step(model_output, t, sample, generator=torch.Generator().manual_seed(i), **kwargs)
        torch.testing.assert_close(got.prev_sample, want.prev_sample, **tolerance)


def test_float64_coefficients_are_closer_to_the_truth_than_diffusers():
    """float64 tables round float64 values once; diffusers' beta_t = 1 - abar_t/abar_prev cancels in float32,
    and the default float32 tables reproduce diffusers' value exactly."""
    theirs = stock("DDPMScheduler")
    abar = theirs.alphas_cumprod.double()
    t = torch.arange(1, 1000)
    truth = 1 - abar[t] / abar[t - 1]  # beta_t in float64
    c_x0_truth = abar[t - 1].sqrt() * truth / (1 - abar[t])
    diffusers_beta = 1 - theirs.alphas_cumprod[t] / theirs.alphas_cumprod[t - 1]
    diffusers_c_x0 = theirs.alphas_cumprod[t - 1] ** 0.5 * diffusers_beta / (1 - theirs.alphas_cumprod[t])
    tables = {}
    for table_dtype in ("float32", "float64"):
        ours = fastdiff.DDPMSampler(table_dtype=table_dtype)
        tables[table_dtype] = ours._table(torch.device("cpu"))[t, fastdiff.tables.OUT_X0]
    ours_err = ((tables["float64"].double() - c_x0_truth) / c_x0_truth).abs().max()
    theirs_err = ((diffusers_c_x0.double() - c_x0_truth) / c_x0_truth).abs().max()
    assert ours_err < 1e-7 < theirs_err
    assert torch.equal(tables["float32"], diffusers_c_x0)


@pytest.mark.parametrize("cls,kwargs", [(fastdiff.DDPMSampler, {}), (fastdiff.DDIMSampler, {"eta": 1.0})])
def test_variance_noise_equals_generator_noise(cls, kwargs):
    sampler = cls()
    sampler.set_timesteps(10)
    model_output, sample = make_inputs(torch.float32, "contiguous")
    t = sampler.timesteps[3]
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    a = sampler.step(model_output, t, sample, variance_noise=noise, **kwargs).prev_sample
    b = sampler.step(model_output, t, sample, generator=torch.Generator().manual_seed(5), **kwargs).prev_sample
    assert torch.equal(a, b)


def test_add_noise_and_velocity_equal_diffusers():
    ours, theirs = fastdiff.DDPMSampler(), stock("DDPMScheduler")
    x0, n = make_inputs(torch.float32, "contiguous")
    t = torch.tensor([0, 999])
    torch.testing.assert_close(ours.add_noise(x0, n, t), theirs.add_noise(x0, n, t), **FP32)
    torch.testing.assert_close(ours.get_velocity(x0, n, t), theirs.get_velocity(x0, n, t), **FP32)
    torch.testing.assert_close(ours.add_noise(x0, n, 500), theirs.add_noise(x0, n, torch.tensor(500)), **FP32)
