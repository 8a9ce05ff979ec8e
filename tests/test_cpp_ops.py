"""The C++ CPU kernels of fastdiff._C against fastdiff.reference (through fastdiff.eager, the
reference backend with the same signatures) and the Philox stream against the numpy oracle.

Tolerances (DESIGN "Correctness"): fp32 atol=1e-6 rtol=1e-5; fp64 atol=1e-12 rtol=1e-10;
fp16/bf16: max error vs the fp32 reference <= 2x the reference's own error in that dtype + 1e-3.
With FASTDIFF_REQUIRE_CPP=1 (CI) a missing extension fails every test instead of skipping it.
"""
import os
import pathlib
import re

import numpy as np
import pytest
import torch

import fastdiff
import philox_oracle as O
from fastdiff import eager as E
from fastdiff import noise as N
from fastdiff import schedules as S
from fastdiff import tables as T

try:
    from fastdiff import _cpp as C
    REASON = C.unavailable_reason("cpu")
except Exception as error:  # the wrapper itself failed
    C, REASON = None, f"fastdiff._cpp failed to import: {error}"
REQUIRE = os.environ.get("FASTDIFF_REQUIRE_CPP") == "1"
pytestmark = pytest.mark.skipif(REASON is not None and not REQUIRE, reason=f"C++ extension unavailable: {REASON}")
from fastdiff import backends as B  # noqa: E402
ROOT = pathlib.Path(__file__).resolve().parent.parent

ABAR = S.alphas_cumprod_from_betas(S.linear_betas(1000, 1e-4, 0.02))
STEPS = list(range(980, -1, -20))  # a 50-step DDPM schedule
SHAPES = [(2, 3, 17, 23), (1, 1023), (1, 3, 17, 23)]
LOW = (torch.float16, torch.bfloat16)


def ddpm_row(variance_type, t):
    return T.ddpm_table(ABAR, STEPS, variance_type)[t]


def ddim_row(t):
    return T.ddim_table(ABAR, 20, float(ABAR[0]))[t]


def inputs(shape, dtype, *, model_batch=1, model_channels=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(shape, generator=g)
    mshape = (shape[0] * model_batch, shape[1] * model_channels, *shape[2:])
    model = torch.randn(mshape, generator=g)
    noise = torch.randn(shape, generator=g)
    return model.to(dtype), sample.to(dtype), noise.to(dtype)


def assert_matches(out, ref_fn, args, dtype, philox=False):
    """out (the kernel's) vs ref_fn(*args) with the DESIGN tolerances for dtype.

    philox: the kernel drew its noise in-kernel while the reference used fastdiff.noise.randn; the
    two agree within 1e-6 (different log/cos), which bounds fp64 agreement too.
    """
    if dtype in LOW:
        up = [a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() and a.dtype in LOW else a
              for a in args]
        ref32, ref_lo = ref_fn(*up), ref_fn(*args)
        for o, r32, rlo in zip(_tuple(out), _tuple(ref32), _tuple(ref_lo)):
            assert o.dtype == dtype and o.shape == r32.shape
            if o.numel():
                err, ref_err = (o.float() - r32).abs().max(), (rlo.float() - r32).abs().max()
                assert err <= 2 * ref_err + 1e-3, f"{dtype}: error {err} vs reference's own {ref_err}"
        return
    tight = dtype == torch.float64 and not philox
    tol = dict(atol=1e-12, rtol=1e-10) if tight else dict(atol=1e-6, rtol=1e-5)
    for o, r in zip(_tuple(out), _tuple(ref_fn(*args))):
        assert o.dtype == r.dtype and o.shape == r.shape
        torch.testing.assert_close(o, r, **tol)


def _tuple(x):
    return x if isinstance(x, tuple) else (x,)


# --- DDPM ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("variance_type", T.VARIANCE_TYPES)
@pytest.mark.parametrize("prediction_type", T.PREDICTION_TYPES)
@pytest.mark.parametrize("clip", ["none", "clip", "threshold"])
def test_ddpm_every_variance_prediction_clip(variance_type, prediction_type, clip):
    shape = (2, 3, 17, 23)
    learned = variance_type in T.LEARNED_VARIANCE_TYPES
    model, sample, noise = inputs(shape, torch.float32, model_channels=2 if learned else 1)
    clip_range = 1.0 if clip == "clip" else None
    threshold = torch.tensor([1.5, 2.5]) if clip == "threshold" else None
    for t in (980, 500, 20, 0):
        args = (model, sample, ddpm_row(variance_type, t), noise, 0, 0, prediction_type, variance_type, clip_range,
                threshold, None, True)
        assert_matches(C.ddpm_step(*args), E.ddpm_step, args, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("given_noise", [True, False])
@pytest.mark.parametrize("cfg", [None, 7.5])
@pytest.mark.parametrize("variance_type", ["fixed_small", "learned_range"])
def test_ddpm_dtypes_shapes_noise_cfg(dtype, shape, given_noise, cfg, variance_type):
    learned = variance_type == "learned_range"
    model, sample, noise = inputs(shape, dtype, model_batch=2 if cfg else 1, model_channels=2 if learned else 1)
    args = (model, sample, ddpm_row(variance_type, 500), noise if given_noise else None, 1234, 3, "epsilon",
            variance_type, 1.0, None, cfg, True)
    assert_matches(C.ddpm_step(*args), E.ddpm_step, args, dtype, philox=not given_noise)


def test_ddpm_write_x0_false_gives_empty_and_same_prev():
    model, sample, noise = inputs((2, 3, 17, 23), torch.float32)
    row = ddpm_row("fixed_small", 500)
    prev, x0 = C.ddpm_step(model, sample, row, noise, 0, 0, "epsilon", "fixed_small", None, None, None, False)
    assert x0.shape == (0,) and x0.dtype == sample.dtype
    ref, _ = E.ddpm_step(model, sample, row, noise, 0, 0, "epsilon", "fixed_small", None, None, None, False)
    torch.testing.assert_close(prev, ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("layout", ["channels_last", "strided", "mixed_dtype"])
def test_ddpm_layouts(layout):
    model, sample, noise = inputs((2, 3, 17, 23), torch.float32)
    if layout == "channels_last":
        model, sample, noise = (x.contiguous(memory_format=torch.channels_last) for x in (model, sample, noise))
    elif layout == "strided":
        model, sample, noise = (torch.cat([x, x], dim=-1)[..., ::2] for x in (model, sample, noise))
        assert not sample.is_contiguous()
    else:
        model = model.half()  # an fp16 model output with an fp32 sample: math in fp32, as the reference
    args = (model, sample, ddpm_row("fixed_large", 500), noise, 0, 0, "v_prediction", "fixed_large", None, None,
            None, True)
    out = C.ddpm_step(*args)
    assert_matches(out, E.ddpm_step, args, torch.float32)
    for o in out:
        assert o.stride() == torch.empty_like(sample).stride()
        assert o.data_ptr() not in {t.data_ptr() for t in (model, sample, noise)}


def test_ddpm_in_kernel_noise_is_the_philox_stream():
    """prev - posterior mean = std * noise.randn(shape, seed, counter=t, sample_offset)."""
    model, sample, _ = inputs((2, 3, 17, 23), torch.float64)
    row = ddpm_row("fixed_large", 500)
    prev, _ = C.ddpm_step(model, sample, row, None, 2**40 + 5, 7, "epsilon", "fixed_large", None, None, None, False)
    mean, _ = C.ddpm_step(model, sample, row, torch.zeros_like(sample), 0, 0, "epsilon", "fixed_large", None, None,
                          None, False)
    expected = N.randn(sample.shape, 2**40 + 5, counter=500, sample_offset=7).double() * row[T.DDPM_STD].double()
    torch.testing.assert_close(prev - mean, expected, atol=1e-12, rtol=1e-6)


@pytest.fixture(params=[None, 3], ids=["default_threads", "3_threads"])
def threads(request):
    """Runs a test with torch's thread count and with 3 threads: 3 parallel ranges over an even batch
    start inside samples, at elements that are not multiples of 4."""
    before = torch.get_num_threads()
    if request.param is not None:
        torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("shape", [(64, 4, 8, 8), (64, 3, 17, 23)])
def test_noise_of_a_sample_is_the_same_in_a_batch_of_1_and_64(shape, threads):
    model, sample, _ = inputs(shape, torch.float32)
    row = ddpm_row("fixed_small", 500)
    full, _ = C.ddpm_step(model, sample, row, None, 99, 0, "epsilon", "fixed_small", None, None, None, False)
    for i in (0, 17, 21, 63):
        one, _ = C.ddpm_step(model[i:i + 1], sample[i:i + 1], row, None, 99, i, "epsilon", "fixed_small", None,
                             None, None, False)
        assert torch.equal(one[0], full[i])
    other, _ = C.ddpm_step(model, sample, row, None, 100, 0, "epsilon", "fixed_small", None, None, None, False)
    assert not torch.equal(other, full)  # the seed matters


# --- DDIM ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction_type", T.PREDICTION_TYPES)
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.5])
@pytest.mark.parametrize("use_clipped", [False, True])
@pytest.mark.parametrize("clip", ["none", "clip", "threshold"])
def test_ddim_every_mode(prediction_type, eta, use_clipped, clip):
    model, sample, noise = inputs((2, 3, 17, 23), torch.float32)
    clip_range = 1.0 if clip == "clip" else None
    threshold = torch.tensor([1.5, 2.5]) if clip == "threshold" else None
    for t in (999, 500, 0):
        args = (model, sample, ddim_row(t), noise, 0, 0, prediction_type, eta, use_clipped, clip_range, threshold,
                None, True)
        assert_matches(C.ddim_step(*args), E.ddim_step, args, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("given_noise", [True, False])
@pytest.mark.parametrize("cfg", [None, 5.0])
def test_ddim_dtypes_shapes_noise_cfg(dtype, shape, given_noise, cfg):
    model, sample, noise = inputs(shape, dtype, model_batch=2 if cfg else 1)
    args = (model, sample, ddim_row(500), noise if given_noise else None, 77, 1, "v_prediction", 1.0, False, None,
            None, cfg, True)
    assert_matches(C.ddim_step(*args), E.ddim_step, args, dtype, philox=not given_noise)


# --- q_sample and cfg_combine --------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("given_noise", [True, False])
def test_q_sample(dtype, shape, given_noise):
    x0, _, noise = inputs(shape, dtype)
    timesteps = torch.randint(0, 1000, (shape[0],), generator=torch.Generator().manual_seed(1))
    args = (x0, timesteps, ABAR, noise if given_noise else None, 2**33 + 1, 4, True, True)
    assert_matches(C.q_sample(*args), E.q_sample, args, dtype, philox=not given_noise)
    x_t, n, v = C.q_sample(x0, timesteps, ABAR, args[3], 2**33 + 1, 4, False, False)
    assert n.shape == (0,) and v.shape == (0,)
    assert_matches(x_t, lambda *a: E.q_sample(*a)[0], args, dtype, philox=not given_noise)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_cfg_combine(dtype, shape):
    uncond, cond, _ = inputs(shape, dtype)
    assert_matches(C.cfg_combine(uncond, cond, 7.5), E.cfg_combine, (uncond, cond, 7.5), dtype)


def test_cfg_combine_channels_last_keeps_layout():
    uncond, cond, _ = inputs((2, 3, 17, 23), torch.float32)
    cond = cond.contiguous(memory_format=torch.channels_last)
    out = C.cfg_combine(uncond, cond, 3.0)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, E.cfg_combine(uncond, cond, 3.0), atol=1e-6, rtol=1e-5)


# --- Philox stream -------------------------------------------------------------------------------


@pytest.mark.parametrize("seed,counter,stream,offset", [(0, 0, 0, 0), (12345678901234, 17, 0, 5),
                                                        (2**63 - 1, 999, 1, 2**31), (42, 2**32 - 1, 7, 0)])
@pytest.mark.parametrize("per_sample", [4099, 4096, 3, 1])
def test_philox_integer_stream_bit_exact_and_normals(seed, counter, stream, offset, per_sample):
    """Per element: its Philox word and Box-Muller partner bit for bit (randn4x layout: (i0, i1) for
    e % 4 < 2, (i2, i3) else), normals within 1e-6; per-sample sizes with and without a partial quad."""
    shape = (3, per_sample)
    normal, bits = C.philox_randn(torch.empty(shape), seed, counter, stream, offset)
    want, (words, partners) = O.randn(shape, seed, counter, stream, offset)
    assert np.array_equal(bits[0].numpy().astype(np.uint32), words)
    assert np.array_equal(bits[1].numpy().astype(np.uint32), partners)
    np.testing.assert_allclose(normal.numpy(), want, atol=1e-6, rtol=0)
    torch.testing.assert_close(normal, N.randn(shape, seed, counter=counter, stream=stream, sample_offset=offset),
                               atol=1e-6, rtol=0)


def test_philox_normals_many_values():
    """1M normals (tails included) within 1e-6 of the oracle: the log/sin/cos polynomials hold up."""
    normal, _ = C.philox_randn(torch.empty(4, 2**18), 7, 999, 0, 0)
    want, _ = O.randn((4, 2**18), 7, 999, 0, 0)
    np.testing.assert_allclose(normal.numpy(), want, atol=1e-6, rtol=0)
    assert abs(float(normal.mean())) < 5e-3 and abs(float(normal.std()) - 1) < 5e-3
    tail = np.abs(want) > 4.0  # the largest radii: u(i0) near 0, where log's error would show
    assert tail.sum() > 10
    np.testing.assert_allclose(normal.numpy()[tail], want[tail], atol=1e-6, rtol=0)


def test_philox_quad_pairs_are_cos_and_sin_of_one_angle():
    """Elements 4q, 4q + 1 are (r cos th, r sin th) of one pair: their squares sum to r^2, and so do 4q + 2, 4q + 3."""
    normal, bits = C.philox_randn(torch.empty(2, 4096), 3, 5, 0, 0)
    quads = normal.double().reshape(2, -1, 4)
    u = bits[0].reshape(2, -1, 4).numpy().astype(np.uint32).view(np.int32).astype(np.int64)
    u = np.where(u < 0, -u - 1, u).astype(np.float32) * np.float32(4.6566127342e-10)
    r2 = -2.0 * np.log(np.maximum(u, np.float32(1e-7)).astype(np.float64))
    np.testing.assert_allclose((quads[..., 0] ** 2 + quads[..., 1] ** 2).numpy(), r2[..., 0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose((quads[..., 2] ** 2 + quads[..., 3] ** 2).numpy(), r2[..., 2], rtol=1e-5, atol=1e-5)
    assert not np.allclose(r2[..., 0], r2[..., 2])  # the two pairs come from different words


@pytest.mark.parametrize("per_sample", [1, 3, 5, 4 * 33333 + 2, 2 * 32768 + 7])
def test_in_kernel_noise_with_partial_quads_and_unaligned_parallel_ranges(per_sample, threads):
    """Per-sample sizes not divisible by 4 put the parallel split (32768-element grains over the flat
    batch) and the chunk starts at elements that are not multiples of 4: every op still draws noise.randn."""
    batch = 5
    shape = (batch, per_sample)
    model, sample, _ = inputs(shape, torch.float64)
    row = ddpm_row("fixed_large", 500)
    prev, _ = C.ddpm_step(model, sample, row, None, 11, 2, "epsilon", "fixed_large", None, None, None, False)
    mean, _ = C.ddpm_step(model, sample, row, torch.zeros_like(sample), 0, 0, "epsilon", "fixed_large", None, None,
                          None, False)
    expected = N.randn(shape, 11, counter=500, sample_offset=2).double()
    torch.testing.assert_close((prev - mean) / row[T.DDPM_STD].double(), expected, atol=1e-6, rtol=0)
    x0 = torch.zeros(shape)
    _, noise, _ = C.q_sample(x0, torch.zeros(batch, dtype=torch.int64), ABAR, None, 11, 2, True, False)
    torch.testing.assert_close(noise, N.randn(shape, 11, stream=N.STREAM_Q_SAMPLE, sample_offset=2), atol=1e-6, rtol=0)
    normal, _ = C.philox_randn(torch.empty(shape), 11, 500, 0, 2)
    torch.testing.assert_close(normal, expected.float(), atol=1e-6, rtol=0)


# --- contract: constants, errors, opcheck, default backend ---------------------------------------


def test_header_constants_equal_tables():
    text = (ROOT / "csrc" / "step_coefs.h").read_text()
    defines = {name: int(value) for name, value in re.findall(r"#define FD_(\w+) (\d+)", text)}
    expected = {name: getattr(T, name) for name in ("WIDTH", "TIMESTEP", "SQRT_ABAR", "SQRT_1M_ABAR", "DDPM_C_X0",
                                                    "DDPM_C_XT", "DDPM_STD", "DDPM_MIN_LOG", "DDPM_MAX_LOG",
                                                    "DDIM_SQRT_ABAR_PREV", "DDIM_1M_ABAR_PREV", "DDIM_SIGMA",
                                                    "VAR_FIXED", "VAR_LEARNED", "VAR_LEARNED_RANGE")}
    expected.update({"PRED_EPSILON": T.prediction_code("epsilon"), "PRED_SAMPLE": T.prediction_code("sample"),
                     "PRED_V": T.prediction_code("v_prediction"), "STREAM_STEP": N.STREAM_STEP,
                     "STREAM_Q_SAMPLE": N.STREAM_Q_SAMPLE})
    assert {k: defines.get(k) for k in expected} == expected


def test_errors_name_the_argument():
    model, sample, noise = inputs((2, 3, 5, 5), torch.float32)
    row = ddpm_row("fixed_small", 500)
    with pytest.raises(RuntimeError, match=r"model_output must have shape \[2, 6, 5, 5\]"):
        C.ddpm_step(model, sample, row, noise, 0, 0, "epsilon", "learned", None, None, None, True)
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        C.ddpm_step(model, sample, row, noise, 0, 0, "eps", "fixed_small", None, None, None, True)
    with pytest.raises(ValueError, match="variance_type must be one of"):
        C.ddpm_step(model, sample, row, noise, 0, 0, "epsilon", "small", None, None, None, True)
    with pytest.raises(RuntimeError, match=r"threshold must hold one value per sample \(2\)"):
        C.ddpm_step(model, sample, row, noise, 0, 0, "epsilon", "fixed_small", None, torch.ones(3), None, True)
    with pytest.raises(RuntimeError, match=r"timesteps\[1\] must be in \[0, 1000\), got 1000"):
        C.q_sample(sample, torch.tensor([0, 1000]), ABAR, noise, 0, 0, False, False)
    with pytest.raises(RuntimeError, match="noise must have the sample's shape"):
        C.ddim_step(model, sample, ddim_row(500), noise[:1], 0, 0, "epsilon", 1.0, False, None, None, None, True)


def _op_cases():
    model, sample, noise = inputs((2, 3, 5, 5), torch.float32)
    m2, _, _ = inputs((2, 3, 5, 5), torch.float32, model_batch=2)
    row, drow, t = ddpm_row("fixed_small", 500), ddim_row(500), torch.tensor([3, 999])
    return [
        ("ddpm_step", (model, sample, row, noise, 0, 0, "epsilon", "fixed_small", 1.0, None, None, True)),
        ("ddpm_step", (m2, sample, row, None, 5, 1, "v_prediction", "fixed_large", None, None, 2.0, False)),
        ("ddim_step", (model, sample, drow, None, 5, 0, "sample", 0.5, True, None, torch.ones(2) * 1.5, None, True)),
        ("q_sample", (sample, t, ABAR, None, 3, 0, True, True)),
        ("cfg_combine", (model, sample, 4.0)),
    ]


def _c_args(name, args):
    if name in ("ddpm_step", "ddim_step"):
        args = list(args)
        args[6] = T.prediction_code(args[6])
        if name == "ddpm_step":
            args[7] = T.variance_mode(args[7])
    return tuple(args)


@pytest.mark.parametrize("case", range(5))
def test_opcheck_fastdiff_C_ops(case):
    name, args = _op_cases()[case]
    torch.library.opcheck(getattr(torch.ops.fastdiff_C, name).default, _c_args(name, args))


def test_opcheck_philox_randn():
    torch.library.opcheck(torch.ops.fastdiff_C.philox_randn.default, (torch.empty(2, 9), 1, 2, 0, 0))


@pytest.mark.parametrize("case", range(5))
def test_opcheck_fastdiff_ops_on_cpp_backend(case, monkeypatch):
    monkeypatch.setenv("FASTDIFF_BACKEND", "cpp")
    name, args = _op_cases()[case]
    assert B.select(name, args[1]).__name__ == "fastdiff._cpp"
    torch.library.opcheck(getattr(torch.ops.fastdiff, name).default, args)
    out, ref = getattr(torch.ops.fastdiff, name)(*args), getattr(E, name)(*args)
    for o, r in zip(_tuple(out), _tuple(ref)):
        torch.testing.assert_close(o, r, atol=1e-6, rtol=1e-5)


def test_extension_is_built_and_is_the_default_cpu_backend(monkeypatch):
    """Fails (never skips) under FASTDIFF_REQUIRE_CPP=1 when the extension is missing."""
    monkeypatch.delenv("FASTDIFF_BACKEND", raising=False)
    assert REASON is None, REASON
    assert B.select("ddpm_step", torch.zeros(2, 3)).__name__ == "fastdiff._cpp"
    assert hasattr(torch.ops.fastdiff_C, "ddpm_step")
