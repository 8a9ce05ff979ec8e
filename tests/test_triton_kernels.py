"""The Triton kernels (kernels/) against fastdiff.reference / fastdiff.eager and the numpy Philox oracle.

On CPU they run under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1), which is
slow: tensors stay tiny and every launch uses few programs. With a GPU the same tests run on CUDA.
"""
import importlib

import numpy as np
import pytest
import torch

import philox_oracle as oracle
from fastdiff import eager as E
from fastdiff import noise as N
from fastdiff import reference as R
from fastdiff import tables as T

from fastdiff import backends  # noqa: E402
K = backends.load("triton")
KC = importlib.import_module("fastdiff.kernels._common")
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
LOWP = (torch.float16, torch.bfloat16)
ABAR = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float32), 0)
SEED = 20240611


# ----------------------------------------------------------------------------- helpers
def ddpm_row(variance_type="fixed_small", t=500):
    return T.ddpm_table(ABAR, list(range(990, -1, -10)), variance_type)[t].to(DEV)


def ddim_row(t=501):
    return T.ddim_table(ABAR, 20, float(ABAR[0]))[t].to(DEV)


def rand(*shape, dtype=torch.float32, gen_seed=0):
    g = torch.Generator().manual_seed(gen_seed)
    return torch.randn(*shape, generator=g).to(DEV, dtype)


def step_inputs(shape, *, learned=False, cfg=False, dtype=torch.float32):
    """(model_output, sample, noise) for a step on `shape`, laid out as the op expects."""
    b, c = shape[0], shape[1]
    mo_shape = ((2 * b) if cfg else b, (2 * c) if learned else c, *shape[2:])
    return rand(*mo_shape, dtype=dtype, gen_seed=1), rand(*shape, dtype=dtype, gen_seed=2), \
        rand(*shape, dtype=dtype, gen_seed=3)


def assert_fp32_close(got, want):
    """DESIGN: fp32 step vs reference, atol=1e-6, rtol=1e-5 (same expression up to FMA/ordering)."""
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def assert_lowp_close(got, ref32, ref_lowp):
    """DESIGN: error vs the fp32 reference <= 2x the error of the reference run in that dtype + 1e-3."""
    assert got.dtype == ref_lowp.dtype
    err = (got.float() - ref32.float()).abs().max().item()
    ref_err = (ref_lowp.float() - ref32.float()).abs().max().item()
    assert err <= 2 * ref_err + 1e-3, (err, ref_err)


def both(fn, args_triton, args_ref):
    """(triton result, eager result) of the op `fn` (a name) with the given positional args."""
    return getattr(K, fn)(*args_triton), getattr(E, fn)(*args_ref)


# ----------------------------------------------------------------------------- DDPM
@pytest.mark.parametrize("variance_type", T.VARIANCE_TYPES)
@pytest.mark.parametrize("prediction_type", T.PREDICTION_TYPES)
def test_ddpm_variance_and_prediction_types(variance_type, prediction_type):
    learned = variance_type in T.LEARNED_VARIANCE_TYPES
    mo, x, n = step_inputs((2, 2, 5, 7), learned=learned)
    args = (mo, x, ddpm_row(variance_type), n, SEED, 0, prediction_type, variance_type, None, None, None, True)
    (prev, x0), (prev_r, x0_r) = both("ddpm_step", args, args)
    assert_fp32_close(prev, prev_r)
    assert_fp32_close(x0, x0_r)


@pytest.mark.parametrize("clip,thresholded,cfg,variance_type", [
    (1.0, False, None, "fixed_small"),
    (0.5, True, None, "fixed_large"),
    (None, False, 7.5, "fixed_small"),
    (1.0, True, 3.0, "learned_range"),  # CFG + learned variance: the variance from the cond half
    (None, False, 2.0, "learned"),
])
def test_ddpm_clip_threshold_cfg(clip, thresholded, cfg, variance_type):
    learned = variance_type in T.LEARNED_VARIANCE_TYPES
    mo, x, n = step_inputs((2, 3, 4, 5), learned=learned, cfg=cfg is not None)
    thr = torch.tensor([1.5, 2.5], device=DEV) if thresholded else None
    args = (mo * 3, x, ddpm_row(variance_type), n, SEED, 0, "epsilon", variance_type, clip, thr, cfg, True)
    (prev, x0), (prev_r, x0_r) = both("ddpm_step", args, args)
    assert_fp32_close(prev, prev_r)
    assert_fp32_close(x0, x0_r)


def test_ddpm_in_kernel_noise_matches_eager_stream_and_last_step():
    mo, x, _ = step_inputs((2, 3, 5, 7))
    for t in (490, 0):  # t = 0: the table's std is 0, the step is the posterior mean
        args = (mo, x, ddpm_row("fixed_small", t), None, SEED, 5, "epsilon", "fixed_small", 1.0, None, None, False)
        (prev, x0), (prev_r, _) = both("ddpm_step", args, args)
        assert_fp32_close(prev, prev_r)
        assert x0.shape == (0,)
    mean = R.ddpm_step(mo, x, ddpm_row("fixed_small", 0), noise=torch.zeros_like(x), clip_sample_range=1.0)[0]
    assert_fp32_close(prev, mean)


@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("cfg", [None, 5.0])
def test_ddpm_half_precision(dtype, cfg):
    mo, x, n = step_inputs((2, 3, 8, 9), learned=True, cfg=cfg is not None, dtype=dtype)
    row = ddpm_row("learned_range")
    prev, x0 = K.ddpm_step(mo, x, row, n, 0, 0, "v_prediction", "learned_range", 1.0, None, cfg, True)
    kw = dict(prediction_type="v_prediction", variance_type="learned_range", clip_sample_range=1.0,
              guidance_scale=cfg)
    ref32 = R.ddpm_step(mo.float(), x.float(), row, noise=n.float(), **kw)
    ref_lowp = R.ddpm_step(mo, x, row, noise=n, **kw)
    for got, r32, rl in zip((prev, x0), ref32, ref_lowp):
        assert_lowp_close(got, r32, rl)


# ----------------------------------------------------------------------------- DDIM
@pytest.mark.parametrize("prediction_type", T.PREDICTION_TYPES)
@pytest.mark.parametrize("eta,use_clipped", [(0.0, False), (0.0, True), (0.7, False), (1.5, True)])
def test_ddim_matrix(prediction_type, eta, use_clipped):
    mo, x, n = step_inputs((2, 2, 6, 5))
    args = (mo, x, ddim_row(), n, SEED, 0, prediction_type, eta, use_clipped, 1.0, None, None, True)
    (prev, x0), (prev_r, x0_r) = both("ddim_step", args, args)
    assert_fp32_close(prev, prev_r)
    assert_fp32_close(x0, x0_r)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_threshold_cfg_in_kernel_noise(eta):
    mo, x, _ = step_inputs((2, 3, 4, 5), cfg=True)
    thr = torch.tensor([1.2, 3.0], device=DEV)
    args = (mo * 4, x, ddim_row(), None, SEED, 3, "epsilon", eta, True, None, thr, 6.0, True)
    (prev, x0), (prev_r, x0_r) = both("ddim_step", args, args)
    assert_fp32_close(prev, prev_r)
    assert_fp32_close(x0, x0_r)


@pytest.mark.parametrize("dtype", LOWP)
def test_ddim_half_precision(dtype):
    mo, x, n = step_inputs((2, 3, 8, 9), cfg=True, dtype=dtype)
    row = ddim_row()
    prev, x0 = K.ddim_step(mo, x, row, n, 0, 0, "epsilon", 0.5, False, 1.0, None, 4.0, True)
    kw = dict(prediction_type="epsilon", eta=0.5, clip_sample_range=1.0, guidance_scale=4.0)
    ref32 = R.ddim_step(mo.float(), x.float(), row, noise=n.float(), **kw)
    ref_lowp = R.ddim_step(mo, x, row, noise=n, **kw)
    for got, r32, rl in zip((prev, x0), ref32, ref_lowp):
        assert_lowp_close(got, r32, rl)


# ----------------------------------------------------------------------------- shapes and layouts
@pytest.mark.parametrize("shape", [(1, 3, 17, 23), (1, 1023)])
def test_odd_shapes_batch_one(shape):
    mo, x, n = step_inputs(shape)
    for op, args in (("ddpm_step", (mo, x, ddpm_row(), n, 1, 0, "epsilon", "fixed_small", 1.0, None, None, True)),
                     ("ddim_step", (mo, x, ddim_row(), None, 1, 0, "sample", 1.0, False, None, None, None, True))):
        (prev, x0), (prev_r, x0_r) = both(op, args, args)
        assert_fp32_close(prev, prev_r)
        assert_fp32_close(x0, x0_r)


def test_channels_last_and_non_contiguous_inputs_keep_empty_like_layout():
    mo, x, n = step_inputs((2, 3, 6, 5))
    x_cl = x.to(memory_format=torch.channels_last)
    mo_t = mo.transpose(2, 3).contiguous().transpose(2, 3)  # same values, strided view
    n_t = n.transpose(0, 1).contiguous().transpose(0, 1)
    args = (mo_t, x_cl, ddpm_row(), n_t, 0, 0, "epsilon", "fixed_small", None, None, None, True)
    prev, x0 = K.ddpm_step(*args)
    prev_r, x0_r = E.ddpm_step(mo, x, ddpm_row(), n, 0, 0, "epsilon", "fixed_small", None, None, None, True)
    assert prev.stride() == x0.stride() == torch.empty_like(x_cl).stride() != x.stride()
    assert_fp32_close(prev, prev_r)
    assert_fp32_close(x0, x0_r)


def test_out_buffers_in_place_and_no_aliasing():
    mo, x, n = step_inputs((2, 3, 4, 5))
    args = (mo, x, ddpm_row(), n, 0, 0, "epsilon", "fixed_small", 1.0, None, None, True)
    want, want_x0 = E.ddpm_step(*args)
    prev, x0 = K.ddpm_step(*args)
    assert {prev.data_ptr(), x0.data_ptr()}.isdisjoint({mo.data_ptr(), x.data_ptr(), n.data_ptr()})
    x_inplace, x0_buf = x.clone(), torch.empty_like(x)
    got, got_x0 = K.ddpm_step(mo, x_inplace, *args[2:], out=x_inplace, x0_out=x0_buf)
    assert got is x_inplace and got_x0 is x0_buf
    assert_fp32_close(x_inplace, want)
    assert_fp32_close(x0_buf, want_x0)
    strided = torch.empty(2, 3, 5, 4, device=DEV).transpose(2, 3)  # a non-contiguous out
    K.ddim_step(mo, x, ddim_row(), None, 0, 0, "epsilon", 0.0, False, None, None, None, False, out=strided)
    assert_fp32_close(strided, E.ddim_step(mo, x, ddim_row(), None, 0, 0, "epsilon", 0.0, False, None, None, None,
                                           False)[0])


# ----------------------------------------------------------------------------- noise stream
def noise_row(t):
    """A DDPM row whose step is prev = 1 * n: the step's output is exactly its noise."""
    row = torch.zeros(T.WIDTH)
    row[T.TIMESTEP], row[T.SQRT_ABAR], row[T.SQRT_1M_ABAR], row[T.DDPM_STD] = t, 1.0, 1.0, 1.0
    return row.to(DEV)


def kernel_noise(batch, per_sample, seed, t, sample_offset=0):
    zeros = torch.zeros(batch, per_sample, device=DEV)
    return K.ddpm_step(zeros, zeros, noise_row(t), None, seed, sample_offset, "epsilon", "fixed_small", None, None,
                       None, False)[0]


@pytest.mark.parametrize("seed,counter,stream,offset", [
    (0, 0, N.STREAM_STEP, 0), (2**32 - 1, 999, N.STREAM_Q_SAMPLE, 7), (2**63 - 1, 17, N.STREAM_STEP, 2**32 - 3)])
def test_philox_integers_bit_exact_and_normals(seed, counter, stream, offset):
    per_sample = 2 * KC.BLOCK + 7  # three programs per sample, the last quad cut after 3 elements
    words, partners, n = KC.philox_debug(3, per_sample, seed, counter, stream, sample_offset=offset, device=DEV)
    want_n, (want_words, want_partners) = oracle.randn((3, per_sample), seed, counter, stream, sample_offset=offset)
    assert np.array_equal(words.cpu().numpy().view(np.uint32), want_words)
    assert np.array_equal(partners.cpu().numpy().view(np.uint32), want_partners)
    np.testing.assert_allclose(n.cpu().numpy(), want_n, atol=1e-6, rtol=0)


@pytest.mark.parametrize("shape", [(2, 3, 333), (3, 5)])  # 999 and 5 elements per sample: not quads
def test_step_noise_is_the_stream_at_counter_t(shape):
    got = kernel_noise(shape[0], int(np.prod(shape[1:])), SEED, 321, sample_offset=11)
    want, _ = oracle.randn(shape, SEED, counter=321, stream=N.STREAM_STEP, sample_offset=11)
    np.testing.assert_allclose(got.cpu().numpy(), want.reshape(shape[0], -1), atol=1e-6, rtol=0)


def test_sample_noise_is_the_same_in_a_batch_of_1_and_64():
    batch = kernel_noise(64, 18, SEED, 42)  # 18 = 4 quads + half of a fifth
    for i in (0, 17, 63):
        alone = kernel_noise(1, 18, SEED, 42, sample_offset=i)
        assert torch.equal(alone[0], batch[i])
    assert not torch.equal(batch[0], batch[1])
    # quads restart at every sample: a shorter sample is a prefix of a longer one, tail included
    assert torch.equal(kernel_noise(2, 20, SEED, 42)[:, :18], batch[:2])


def test_noise_mean_and_variance():
    n = kernel_noise(1, 60_000, SEED, 7).double()
    assert abs(n.mean().item()) < 4 / 60_000**0.5  # 4 standard errors
    assert abs(n.var().item() - 1) < 4 * (2 / 60_000) ** 0.5


# ----------------------------------------------------------------------------- q_sample, cfg_combine
@pytest.mark.parametrize("dtype", (torch.float32, *LOWP))
def test_q_sample_explicit_noise(dtype):
    x0, n = rand(3, 2, 5, 7, dtype=dtype, gen_seed=4), rand(3, 2, 5, 7, dtype=dtype, gen_seed=5)
    ts = torch.tensor([0, 500, 999], device=DEV)
    ac = ABAR.to(DEV)
    xt, nout, v = K.q_sample(x0, ts, ac, n, 0, 0, True, True)
    if dtype == torch.float32:
        assert_fp32_close(xt, R.q_sample(x0, ts, ac, n))
        assert_fp32_close(v, R.v_target(x0, n, ts, ac))
    else:
        assert_lowp_close(xt, R.q_sample(x0.float(), ts, ac, n.float()), R.q_sample(x0, ts, ac, n))
        assert_lowp_close(v, R.v_target(x0.float(), n.float(), ts, ac), R.v_target(x0, n, ts, ac))
    assert torch.equal(nout, n) and nout.data_ptr() != n.data_ptr()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_q_sample_in_kernel_noise_matches_eager(dtype):
    x0, ts, ac = rand(2, 3, 4, 5, dtype=dtype), torch.tensor([10, 900], device=DEV, dtype=torch.int32), ABAR.to(DEV)
    (xt, n, v), (xt_r, n_r, v_r) = both("q_sample", (x0, ts, ac, None, SEED, 9, True, True),
                                        (x0, ts.long(), ac, None, SEED, 9, True, True))
    torch.testing.assert_close(n, n_r, atol=1e-6, rtol=0)
    for got, want in ((xt, xt_r), (v, v_r)):
        torch.testing.assert_close(got, want, atol=1e-6 if dtype == torch.float32 else 2e-3, rtol=1e-5)
    empty = K.q_sample(x0, ts, ac, None, SEED, 9, False, False)
    assert empty[1].shape == empty[2].shape == (0,)
    assert torch.equal(empty[0], xt)


def test_q_sample_timestep_outside_the_table_gives_nan():
    x0 = rand(2, 8)
    xt = K.q_sample(x0, torch.tensor([1000, 3], device=DEV), ABAR.to(DEV), None, 0, 0, False, False)[0]
    assert torch.isnan(xt[0]).all() and torch.isfinite(xt[1]).all()


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_cfg_combine(dtype):
    u, c = rand(2, 3, 7, 9, dtype=dtype, gen_seed=6), rand(2, 3, 7, 9, dtype=dtype, gen_seed=7)
    got = K.cfg_combine(u, c.to(memory_format=torch.channels_last), 7.5)
    assert got.is_contiguous(memory_format=torch.channels_last)
    if dtype == torch.float32:
        assert_fp32_close(got, R.cfg_combine(u, c, 7.5))
    else:
        assert_lowp_close(got, R.cfg_combine(u.float(), c.float(), 7.5), R.cfg_combine(u, c, 7.5))


# ----------------------------------------------------------------------------- index math and errors
def test_grid_chunks_respect_cuda_y_limit():
    chunks = KC.step_grid(200_000, 3 * 64 * 64)
    assert [b0 for b0, _ in chunks] == [0, 65535, 131070, 196605]
    assert all(grid == (12, min(65535, 200_000 - b0)) for b0, grid in chunks)
    assert sum(grid[1] for _, grid in chunks) == 200_000


def test_offsets_past_int32_without_allocating():
    """b * per_sample + i is int64 inside the kernel: samples 70000.. of 100003 elements start past 2^32."""
    per_sample, b0, samples = 100_003, 70_000, 2
    blocks = -(-per_sample // KC.BLOCK)
    out = torch.empty(samples * blocks * 2, dtype=torch.int64, device=DEV)
    KC._offsets_debug_kernel[(blocks, samples)](out, per_sample, b0, BLOCK=KC.BLOCK)
    got = out.view(samples, blocks, 2).cpu()
    b = torch.arange(b0, b0 + samples, dtype=torch.int64)[:, None]
    first = b * per_sample + torch.arange(blocks) * KC.BLOCK
    last = torch.minimum(first + KC.BLOCK, (b + 1) * per_sample) - 1
    assert got[-1, -1, 1].item() > 2**32
    assert torch.equal(got[..., 0], first) and torch.equal(got[..., 1], last)


def test_input_errors_name_the_argument():
    mo, x, n = step_inputs((2, 3, 4, 5))
    row = ddpm_row()
    base = dict(model_output=mo, sample=x, coefs=row, noise=n, seed=0, sample_offset=0, prediction_type="epsilon",
                variance_type="fixed_small", clip_sample_range=None, threshold=None, guidance_scale=None,
                write_x0=True)
    cases = [
        (dict(sample=x.double(), model_output=mo.double()), TypeError, "sample has dtype torch.float64"),
        (dict(model_output=mo[:, :2]), ValueError, "model_output has shape"),
        (dict(variance_type="learned"), ValueError, "2x the sample's channels"),
        (dict(guidance_scale=2.0), ValueError, "uncond; cond"),
        (dict(noise=n[:1]), ValueError, "noise has shape"),
        (dict(threshold=torch.ones(3, device=DEV)), ValueError, "threshold has shape"),
        (dict(coefs=row[:5]), ValueError, "coefs has shape"),
        (dict(prediction_type="eps"), ValueError, "prediction_type must be one of"),
        (dict(variance_type="fixed"), ValueError, "variance_type must be one of"),
        (dict(noise=None, seed=-1), ValueError, "seed must be an int"),
    ]
    for change, error, match in cases:
        with pytest.raises(error, match=match):
            K.ddpm_step(**{**base, **change})
    with pytest.raises(TypeError, match="out has dtype"):
        K.ddpm_step(**base, out=torch.empty_like(x, dtype=torch.float16))
    with pytest.raises(ValueError, match="eta must be >= 0"):
        K.ddim_step(mo, x, ddim_row(), n, 0, 0, "epsilon", -1.0, False, None, None, None, True)
    with pytest.raises(TypeError, match="timesteps has dtype"):
        K.q_sample(x, torch.zeros(2, device=DEV), ABAR.to(DEV), None, 0, 0, False, False)
    with pytest.raises(ValueError, match="uncond has shape"):
        K.cfg_combine(x[:1], x, 2.0)


# ----------------------------------------------------------------------------- through fastdiff.ops
@pytest.fixture
def triton_backend(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "triton")
    from fastdiff import ops
    assert backends.select("ddpm_step", torch.empty(1, device=DEV)) is K
    return ops


def test_opcheck_every_op(triton_backend):
    ops = triton_backend
    mo, x, n = step_inputs((2, 2, 3, 4), learned=True, cfg=True)
    thr = torch.tensor([1.5, 2.0], device=DEV)
    cases = [
        (ops.ddpm_step, (mo, x, ddpm_row("learned_range"), None, SEED, 0, "epsilon", "learned_range", 1.0, thr, 3.0,
                         True)),
        (ops.ddpm_step, (mo[:2, :2], x, ddpm_row(), n, SEED, 0, "sample", "fixed_small", None, None, None, False)),
        (ops.ddim_step, (mo[:, :2], x, ddim_row(), None, SEED, 4, "v_prediction", 1.0, True, 1.0, None, 5.0, True)),
        (ops.q_sample, (x, torch.tensor([3, 700], device=DEV), ABAR.to(DEV), None, SEED, 0, True, True)),
        (ops.cfg_combine, (x, n, 7.5)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_compiled_loop_has_no_graph_break_or_recompile(triton_backend):
    """torch.compile(fullgraph=True) over a loop of ops.ddpm_step, rows gathered on the device."""
    ops = triton_backend
    table = T.ddpm_table(ABAR, list(range(990, -1, -10)), "fixed_small").to(DEV)

    def loop(x, timesteps):
        for i in range(timesteps.shape[0]):
            eps = torch.tanh(x)  # a stand-in denoiser
            row = table.index_select(0, timesteps[i:i + 1])[0]  # a device gather (no .item())
            x, _ = ops.ddpm_step(eps, x, row, None, SEED, 0, "epsilon", "fixed_small", 1.0, None,
                                 None, False)
        return x

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(loop, fullgraph=True, backend="aot_eager")
    x = rand(2, 3, 4, 4)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for ts in ([990, 980, 970], [500, 490, 480], [20, 10, 0]):
            steps = torch.tensor(ts, device=DEV)
            torch.testing.assert_close(compiled(x, steps), loop(x, steps), atol=1e-6, rtol=1e-5)
    assert not torch._dynamo.utils.counters["graph_break"]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
