"""The compiled Triton kernels on a real GPU: agreement with the reference at sizes the interpreter
cannot reach, the Philox stream on the device, CUDA-graph capture + replay of a step, a launch on a
non-default stream, batches past CUDA's grid-y limit and past 2^31 elements.

Every test carries the `cuda` marker: skipped (with that reason) where torch.cuda is unavailable.
"""
import numpy as np
import pytest
import torch

import philox_oracle as oracle
from fastdiff import eager as E
from fastdiff import noise as N
from fastdiff import reference as R
from fastdiff import tables as T
from test_triton_kernels import ABAR, SEED, K, KC, assert_fp32_close, assert_lowp_close

pytestmark = pytest.mark.cuda
CUDA = torch.device("cuda")
TABLE_STEPS = list(range(990, -1, -10))


def ddpm_table(variance_type="fixed_small"):
    return T.ddpm_table(ABAR, TABLE_STEPS, variance_type).to(CUDA)


def randn(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator(device=CUDA).manual_seed(seed)
    return torch.randn(*shape, generator=g, device=CUDA).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("variance_type", ["fixed_small", "learned_range"])
def test_ddpm_agrees_with_reference(dtype, variance_type):
    learned = variance_type in T.LEARNED_VARIANCE_TYPES
    mo = randn(8, 8 if learned else 4, 64, 64, dtype=dtype, seed=1)
    x, n = randn(4, 4, 64, 64, dtype=dtype, seed=2), randn(4, 4, 64, 64, dtype=dtype, seed=3)
    row = ddpm_table(variance_type)[500]
    args = (mo, x, row, n, SEED, 0, "epsilon", variance_type, 1.0, None, 7.5, True)
    prev, x0 = K.ddpm_step(*args)
    kw = dict(prediction_type="epsilon", variance_type=variance_type, clip_sample_range=1.0, guidance_scale=7.5)
    if dtype == torch.float32:
        want = R.ddpm_step(mo, x, row, noise=n, **kw)
        assert_fp32_close(prev, want[0])
        assert_fp32_close(x0, want[1])
    else:
        ref32 = R.ddpm_step(mo.float(), x.float(), row, noise=n.float(), **kw)
        ref_lowp = R.ddpm_step(mo, x, row, noise=n, **kw)
        assert_lowp_close(prev, ref32[0], ref_lowp[0])
        assert_lowp_close(x0, ref32[1], ref_lowp[1])


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_and_q_sample_agree_with_reference(eta):
    mo, x = randn(2, 4, 96, 96, seed=1), randn(2, 4, 96, 96, seed=2)
    row = T.ddim_table(ABAR, 20, float(ABAR[0])).to(CUDA)[501]
    args = (mo, x, row, None, SEED, 0, "v_prediction", eta, True, 1.0, torch.tensor([1.5, 2.0], device=CUDA),
            None, True)
    got, want = K.ddim_step(*args), E.ddim_step(*args)
    for g, w in zip(got, want):  # eager's noise is torch math on the GPU: compare with a noise-sized slack
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    ts = torch.tensor([0, 999], device=CUDA)
    q_args = (x, ts, ABAR.to(CUDA), None, SEED, 3, True, True)
    for g, w in zip(K.q_sample(*q_args), E.q_sample(*q_args)):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_philox_on_device_matches_oracle():
    per_sample = 5001  # not a multiple of 4: the last quad of each sample is cut after one element
    words, partners, n = KC.philox_debug(4, per_sample, 2**40 + 7, 321, N.STREAM_STEP, sample_offset=2**32 - 2,
                                         device=CUDA)
    want_n, (want_words, want_partners) = oracle.randn((4, per_sample), 2**40 + 7, 321, N.STREAM_STEP,
                                                       sample_offset=2**32 - 2)
    assert np.array_equal(words.cpu().numpy().view(np.uint32), want_words)
    assert np.array_equal(partners.cpu().numpy().view(np.uint32), want_partners)
    # tl.randn's sqrt is sqrt.approx on the GPU (log / cos / sin are libdevice): a few 1e-7 relative.
    np.testing.assert_allclose(n.cpu().numpy(), want_n, atol=1e-6, rtol=1e-6)


def _graph_step(mo, x, table, idx, out):
    row = table.index_select(0, idx)[0]  # device-side gather of the step's row: no host sync
    return K.ddpm_step(mo, x, row, None, SEED, 0, "epsilon", "fixed_small", 1.0, None, 3.0, False, out=out)


def test_cuda_graph_capture_and_replay():
    table, idx = ddpm_table(), torch.zeros(1, dtype=torch.int64, device=CUDA)
    mo, x = randn(4, 4, 32, 32, seed=1), randn(2, 4, 32, 32, seed=2)
    out = torch.empty_like(x)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up: Triton compiles on the first launch, never during capture
        for _ in range(2):
            _graph_step(mo, x, table, idx, out)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _graph_step(mo, x, table, idx, out)
    for t, seed in ((990, 5), (500, 6), (0, 7)):
        idx.fill_(t)
        mo.copy_(randn(4, 4, 32, 32, seed=seed))
        graph.replay()
        torch.cuda.synchronize()
        want = E.ddpm_step(mo, x, table[t], None, SEED, 0, "epsilon", "fixed_small", 1.0, None, 3.0, False)[0]
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_runs_on_the_current_non_default_stream():
    x_src, mo = randn(2, 4, 64, 64, seed=2), randn(2, 4, 64, 64, seed=1)
    row = ddpm_table()[500]
    x = torch.zeros_like(x_src)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)  # keep `side` busy: a launch on another stream would read zeros
        x.copy_(x_src)
        prev, _ = K.ddpm_step(mo, x, row, None, SEED, 0, "epsilon", "fixed_small", None, None, None, False)
    side.synchronize()
    want = E.ddpm_step(mo, x_src, row, None, SEED, 0, "epsilon", "fixed_small", None, None, None, False)[0]
    torch.testing.assert_close(prev, want, atol=1e-5, rtol=1e-5)


def test_batch_past_grid_y_limit():
    batch = KC.MAX_GRID_Y + 1000
    x0 = randn(batch, 4, seed=4)
    ts = torch.randint(0, 1000, (batch,), device=CUDA)
    got = K.q_sample(x0, ts, ABAR.to(CUDA), None, SEED, 0, True, False)
    want = E.q_sample(x0, ts, ABAR.to(CUDA), None, SEED, 0, True, False)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)


def test_more_than_2_31_elements():
    per_sample, batch = 2**20, 2**11 + 1  # 2^31 + 2^20 fp16 elements: ~4.3 GB per tensor
    if torch.cuda.mem_get_info()[0] < 16 * 2**30:
        pytest.skip("needs 16 GiB of free GPU memory for three 4.3 GB tensors")
    x = torch.full((batch, per_sample), 0.5, dtype=torch.float16, device=CUDA)
    mo = torch.full_like(x, -0.25)
    row = ddpm_table()[500]
    prev = K.ddpm_step(mo, x, row, None, SEED, 0, "epsilon", "fixed_small", None, None, None, False)[0]
    last = slice(batch - 1, batch)  # the last sample lies past 2^31: same as alone, at its global index
    want = E.ddpm_step(mo[last].float(), x[last].float(), row, None, SEED, batch - 1, "epsilon", "fixed_small",
                       None, None, None, False)[0]
    torch.testing.assert_close(prev[last].float(), want, atol=2e-3, rtol=2e-3)
    del x, mo, prev
    u = torch.zeros(2**31 + 5, dtype=torch.float16, device=CUDA)
    c = torch.ones_like(u)
    out = K.cfg_combine(u, c, 2.0)
    assert out[-5:].eq(2.0).all() and out[:5].eq(2.0).all()
