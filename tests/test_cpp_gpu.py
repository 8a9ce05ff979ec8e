"""CUDA kernels of fastdiff._C against fastdiff.reference and the Philox stream (GPU only: the
`cuda` marker skips these on CPU-only machines, with that reason, via tests/conftest.py)."""
import numpy as np
import pytest
import torch

import philox_oracle as O
from fastdiff import eager as E
from fastdiff import noise as N
from fastdiff import schedules as S
from fastdiff import tables as T

pytestmark = pytest.mark.cuda
ABAR = S.alphas_cumprod_from_betas(S.linear_betas(1000, 1e-4, 0.02))
STEPS = list(range(980, -1, -20))


@pytest.fixture(scope="module")
def C():
    from fastdiff import _cpp
    reason = _cpp.unavailable_reason("cuda")
    assert reason is None, reason  # a GPU machine must have the CUDA build
    return _cpp


def _inputs(shape, dtype, model_batch=1, model_channels=1):
    g = torch.Generator().manual_seed(0)
    mshape = (shape[0] * model_batch, shape[1] * model_channels, *shape[2:])
    return [torch.randn(s, generator=g).to("cuda", dtype) for s in (mshape, shape, shape)]


def _close(out, ref, dtype):
    tol = dict(atol=1e-6, rtol=1e-5) if dtype in (torch.float32, torch.float64) else dict(atol=2e-2, rtol=1e-2)
    for o, r in zip(out, ref):
        assert o.shape == r.shape and o.dtype == r.dtype
        torch.testing.assert_close(o, r, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("variance_type", T.VARIANCE_TYPES)
@pytest.mark.parametrize("prediction_type", T.PREDICTION_TYPES)
@pytest.mark.parametrize("given_noise", [True, False])
@pytest.mark.parametrize("shape", [(2, 4, 16, 16), (1, 3, 17, 23), (1, 1023)])
def test_ddpm_cuda(C, dtype, variance_type, prediction_type, given_noise, shape):
    learned = variance_type in T.LEARNED_VARIANCE_TYPES
    model, sample, noise = _inputs(shape, dtype, 2, 2 if learned else 1)
    row = T.ddpm_table(ABAR, STEPS, variance_type)[500].cuda()
    args = (model, sample, row, noise if given_noise else None, 5, 2, prediction_type, variance_type, 1.0, None, 3.0,
            True)
    _close(C.ddpm_step(*args), E.ddpm_step(*args), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("threshold", [False, True])
def test_ddim_cuda(C, dtype, eta, threshold):
    model, sample, noise = _inputs((2, 4, 16, 16), dtype)
    row = T.ddim_table(ABAR, 20, float(ABAR[0]))[500].cuda()
    thr = torch.tensor([1.5, 2.0], device="cuda") if threshold else None
    args = (model, sample, row, None, 9, 0, "epsilon", eta, True, None, thr, None, True)
    _close(C.ddim_step(*args), E.ddim_step(*args), dtype)


def test_q_sample_and_cfg_cuda(C):
    x0, u, noise = _inputs((4, 3, 8, 8), torch.float32)
    t, abar = torch.tensor([0, 10, 500, 999], device="cuda"), ABAR.cuda()
    _close(C.q_sample(x0, t, abar, None, 3, 1, True, True), E.q_sample(x0, t, abar, None, 3, 1, True, True),
           torch.float32)
    _close((C.cfg_combine(u, x0, 7.5),), (E.cfg_combine(u, x0, 7.5),), torch.float32)


@pytest.mark.parametrize("per_sample", [4099, 4096, 3])
def test_cuda_philox_matches_oracle_and_noise_randn(C, per_sample):
    """Per element its Philox word and partner bit for bit (randn4x layout), normals within 1e-6."""
    shape = (3, per_sample)
    normal, bits = C.philox_randn(torch.empty(shape, device="cuda"), 2**40 + 3, 17, 0, 5)
    want, (words, partners) = O.randn(shape, 2**40 + 3, 17, 0, 5)
    assert np.array_equal(bits[0].cpu().numpy().astype(np.uint32), words)
    assert np.array_equal(bits[1].cpu().numpy().astype(np.uint32), partners)
    np.testing.assert_allclose(normal.cpu().numpy(), want, atol=1e-6, rtol=0)
    torch.testing.assert_close(normal, N.randn(shape, 2**40 + 3, counter=17, sample_offset=5, device="cuda"),
                               atol=1e-6, rtol=0)
    cpu_normal, _ = C.philox_randn(torch.empty(shape), 2**40 + 3, 17, 0, 5)
    torch.testing.assert_close(normal.cpu(), cpu_normal, atol=1e-6, rtol=0)  # same polynomials on both


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("shape,offset", [((3, 4096), 0), ((3, 4099), 0), ((2, 1025), 0), ((3, 4096), 1)],
                         ids=["packed", "tail", "odd_tail", "unaligned"])
def test_cuda_in_kernel_noise_is_the_stream(C, dtype, shape, offset):
    """Whole quads with vector loads, samples ending in a partial quad, and misaligned tensors (a view
    one element in) all draw noise.randn: DDPM, DDIM and q_sample, against the same op on the CPU."""
    g = torch.Generator().manual_seed(0)
    numel = shape[0] * shape[1]
    model, sample = (torch.randn(numel + offset, generator=g).to("cuda", dtype)[offset:].view(shape) for _ in range(2))
    assert sample.is_contiguous() and (sample.data_ptr() % 16 != 0) == (offset != 0)  # offset: misaligned views
    row = T.ddpm_table(ABAR, STEPS, "fixed_large")[500]
    expected = N.randn(shape, 7, counter=500, sample_offset=3).double()
    prev, _ = C.ddpm_step(model, sample, row.cuda(), None, 7, 3, "epsilon", "fixed_large", None, None, None, False)
    mean, _ = C.ddpm_step(model, sample, row.cuda(), torch.zeros_like(sample), 0, 0, "epsilon", "fixed_large", None,
                          None, None, False)
    got = (prev.double() - mean.double()).cpu() / row[T.DDPM_STD].double()
    tol = 1e-6 if dtype != torch.float16 else 2e-2  # fp16: prev and mean each rounded, / std ~ 0.1
    torch.testing.assert_close(got, expected, atol=tol * 10, rtol=tol)
    close = dict(atol=1e-5, rtol=1e-5) if dtype != torch.float16 else dict(atol=1e-3, rtol=2e-3)  # 2 fp16 ulp
    cpu_prev, _ = C.ddpm_step(model.cpu(), sample.cpu(), row, None, 7, 3, "epsilon", "fixed_large", None, None, None,
                              False)
    torch.testing.assert_close(prev.cpu(), cpu_prev, **close)
    drow = T.ddim_table(ABAR, 20, float(ABAR[0]))[500]
    out = C.ddim_step(model, sample, drow.cuda(), None, 7, 3, "epsilon", 1.0, False, None, None, None, True)
    ref = C.ddim_step(model.cpu(), sample.cpu(), drow, None, 7, 3, "epsilon", 1.0, False, None, None, None, True)
    for o, r in zip(out, ref):
        torch.testing.assert_close(o.cpu(), r, **close)
    t = torch.tensor([10, 900, 500][:shape[0]])
    x_t, noise, v = C.q_sample(sample, t.cuda(), ABAR.cuda(), None, 7, 3, True, True)
    torch.testing.assert_close(noise.cpu(), N.randn(shape, 7, stream=N.STREAM_Q_SAMPLE, sample_offset=3).to(dtype),
                               **close)
    for o, r in zip((x_t, noise, v), C.q_sample(sample.cpu(), t, ABAR, None, 7, 3, True, True)):
        torch.testing.assert_close(o.cpu(), r, **close)
