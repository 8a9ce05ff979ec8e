"""CUDA kernels of fastdiff._C against fastdiff.eager (the reference backend, run on the same GPU) and
the Philox stream against the numpy oracle. GPU only: the `cuda` marker skips these on machines
without a GPU (tests/conftest.py). On a GPU machine whose extension was built without CUDA they
skip with that reason, unless FASTDIFF_REQUIRE_CUDA_EXT=1 (CI on GPU runners) makes that a failure.

Tolerances: fp32 atol 1e-6 rtol 1e-5 (the GPU contracts a * b + c into FMAs); fp16/bf16 as the
DESIGN rule (error vs an fp32 reference <= 2x the reference's own error in that dtype + 1e-3).
"""
import os

import numpy as np
import pytest
import torch

import philox_oracle as O
from test_noise import assert_ulp_close
from fastdiff import eager as E
from fastdiff import noise as N
from fastdiff import tables as T
from test_cpp_ops import CLIPS, GUIDANCE, LOW, _q_call, _q_case, call, make_case, upcast

pytestmark = pytest.mark.cuda
REQUIRE = os.environ.get("FASTDIFF_REQUIRE_CUDA_EXT") == "1"


@pytest.fixture(scope="module")
def C():
    try:
        from fastdiff import _cpp
        reason = _cpp.unavailable_reason("cuda")
    except Exception as error:  # the wrapper itself failed
        _cpp, reason = None, f"fastdiff._cpp failed to import: {error}"
    if reason is not None:
        if REQUIRE:
            pytest.fail(f"FASTDIFF_REQUIRE_CUDA_EXT=1 but the CUDA extension cannot run: {reason}")
        pytest.skip(f"CUDA extension unavailable: {reason}")
    return _cpp


def cuda(case):
    return {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in case.items()}


def check(got, case, philox=False):
    """GPU op outputs vs the reference backend on the same GPU inputs."""
    dtype = case["sample"].dtype
    want = call(E, case)
    assert torch.equal(got[3].cpu(), want[3].cpu())
    if dtype in LOW:
        want32 = call(E, upcast(case))
        for o, r32, rlo in zip(got[:3], want32[:3], want[:3]):
            if o is not None:
                err, ref_err = (o.float() - r32).abs().max(), (rlo.float() - r32).abs().max()
                assert err <= 2 * ref_err + 1e-3, f"{dtype}: error {err} vs the reference's own {ref_err}"
        return
    for o, r in zip(got[:3], want[:3]):
        assert (o is None) == (r is None)
        if o is not None:
            assert o.dtype == r.dtype and o.shape == r.shape and o.device == r.device
            torch.testing.assert_close(o, r, atol=1e-6, rtol=1e-5, equal_nan=True)


@pytest.mark.parametrize("clip", CLIPS)
@pytest.mark.parametrize("noise", ["none", "given", "philox"])
@pytest.mark.parametrize("variance", [T.VAR_FIXED, T.VAR_SQRT, T.VAR_EXP], ids=["fixed", "sqrt", "exp"])
@pytest.mark.parametrize("guidance", list(GUIDANCE))
def test_step_every_flag_cuda(C, guidance, variance, noise, clip):
    for reads in range(5):
        for writes in (False, True):
            case = cuda(make_case(guidance=guidance, variance=variance, noise=noise, clip=clip, reads=reads,
                                  write_history=writes, write_out2=writes, row=reads % 4, seed=reads))
            check(call(C, case), case, philox=noise == "philox")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,offset", [((2, 4, 16, 16), 0), ((1, 3, 17, 23), 0), ((3, 1023), 0),
                                          ((2, 4, 16, 16), 1)], ids=["packed", "tail", "odd", "misaligned"])
@pytest.mark.parametrize("noise", ["given", "philox"])
def test_step_dtypes_packed_and_unpacked_cuda(C, dtype, shape, offset, noise):
    """Vector loads (whole aligned items: 16 bytes of fp16/bf16, one quad of fp32/fp64), per-sample
    tails and misaligned views (element loads): against the reference and the same op on the CPU."""
    case = make_case(shape, dtype, guidance="cfg_extra", variance=T.VAR_SQRT, noise=noise, clip="threshold",
                     reads=4)
    gpu = cuda(case)
    if offset:  # views one element into a device buffer: not 16-byte aligned
        for k in ("model_output", "sample"):
            flat = torch.cat([torch.zeros(offset, dtype=dtype, device="cuda"), gpu[k].reshape(-1)])
            gpu[k] = flat[offset:].view(gpu[k].shape)
        assert gpu["sample"].data_ptr() % 16 != 0
    got = call(C, gpu)
    check(got, gpu, philox=noise == "philox")
    cpu = call(C, case)
    close = dict(atol=1e-5, rtol=1e-5) if dtype not in LOW else dict(atol=2e-2, rtol=1e-2)
    for o, r in zip(got[:3], cpu[:3]):
        torch.testing.assert_close(o.cpu(), r, **close)


def test_in_kernel_noise_is_the_stream_cuda(C):
    table = T.step_table(2, out_x=1.0, noise_std=1.0, noise_counter=[500.0, 1.0])
    for dtype, shape in ((torch.float32, (3, 4099)), (torch.float64, (2, 1025)), (torch.float16, (3, 4096))):
        case = cuda(make_case(shape, dtype, table=table, row=0, noise="philox", reads=0, write_history=False,
                              write_out2=False))
        delta = (call(C, case)[0].double() - case["sample"].double()).cpu()
        expected = N.randn(shape, case["seed"], counter=500, sample_offset=3).double()
        tol = 1e-6 if dtype != torch.float16 else 2e-2
        torch.testing.assert_close(delta, expected, atol=tol * 10, rtol=tol)


def test_advance_on_device_without_sync_and_nan_sentinel_cuda(C):
    """index += 1 on the device after the step (no host sync); past the table: the NaN row."""
    case = cuda(make_case(noise="philox", reads=4, row=3))
    index, history, out = case["index"].clone(), case["history"].clone(), torch.empty_like(case["sample"])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):  # rows 3, 4 (the last real row), 5 (the sentinel)
            C.step(case["model_output"], case["sample"], case["table"], index, history, out, None, None,
                   case["seed"], 3, None, None, 0.0, T.VAR_FIXED, None, None, 4, True, True, True)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert int(index) == 6
    assert out.isnan().all() and history[0].isnan().all()


def test_cuda_graph_replays_advance_the_step(C):
    """One captured step (reads its row from the device index, advances it) replays rows 0, 1, 2."""
    case = cuda(make_case(guidance="cfg", noise="philox", reads=2, row=0))
    index, history, out = case["index"].clone(), case["history"].clone(), torch.empty_like(case["sample"])
    args = lambda: (case["model_output"], case["sample"], case["table"], index, history, out, None, None,  # noqa: E731
                    case["seed"], 3, 7.5, None, 0.0, T.VAR_FIXED, None, None, 2, True, True, True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        C.step(*args())  # warm-up (row 0)
    torch.cuda.current_stream().wait_stream(stream)
    index.fill_(0)
    history.copy_(case["history"])
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        C.step(*args())
    index.fill_(0)
    history.copy_(case["history"])
    ref = {**case, "history": case["history"].clone(), "guidance_scale": 7.5, "write_x0": False}
    for row in range(3):
        graph.replay()
        want = call(E, {**ref, "index": torch.tensor([row], device="cuda")})
        ref["history"] = want[2]
        torch.testing.assert_close(out, want[0], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(history, want[2], atol=1e-6, rtol=1e-5)
    assert int(index) == 3


def test_in_place_step_cuda(C):
    case = cuda(make_case(noise="philox", reads=2, guidance="cfg"))
    want = call(C, case)
    sample = case["sample"].clone()
    got = call(C, {**case, "sample": sample}, out=sample)
    for o, r in zip(got[:3], want[:3]):
        assert torch.equal(o, r)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("given", [True, False])
def test_q_sample_cuda(C, dtype, given):
    x0, table, index, noise = _q_case((4, 3, 9, 9), dtype, given)
    x0, table, index = x0.cuda(), table.cuda(), index.cuda()
    noise = noise.cuda() if noise is not None else None
    got, want = _q_call(C, x0, table, index, noise), _q_call(E, x0, table, index, noise)
    tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-3, rtol=2e-3)
    for o, r in zip(got, want):
        torch.testing.assert_close(o, r, equal_nan=True, **tol)
    assert got[0][0].isnan().all()  # index -1: the sentinel row


def test_cfg_combine_cuda(C):
    u, c = torch.randn(2, 3, 8, 8, device="cuda"), torch.randn(2, 3, 8, 8, device="cuda")
    torch.testing.assert_close(C.cfg_combine(u, c, 7.5), E.cfg_combine(u, c, 7.5), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("per_sample", [4099, 4096, 3])
def test_cuda_philox_matches_oracle_and_noise_randn(C, per_sample):
    """Per element its Philox word and partner bit for bit (randn4x layout), normals within a few float32 ulp
    (nvcc contracts FMAs; tests/test_noise.py's ulp measure)."""
    shape = (3, per_sample)
    normal, bits = C.philox_randn(torch.empty(shape, device="cuda"), 2**40 + 3, 17, 0, 5)
    want, (words, partners) = O.randn(shape, 2**40 + 3, 17, 0, 5)
    assert np.array_equal(bits[0].cpu().numpy().astype(np.uint32), words)
    assert np.array_equal(bits[1].cpu().numpy().astype(np.uint32), partners)
    assert_ulp_close(normal, want, what="CUDA normals vs the numpy oracle")
    cpu_normal, _ = C.philox_randn(torch.empty(shape), 2**40 + 3, 17, 0, 5)
    assert_ulp_close(normal, cpu_normal, what="CUDA vs CPU normals (same polynomials)")


def test_opcheck_step_cuda(C):
    case = cuda(make_case(guidance="cfg_extra", variance=T.VAR_EXP, noise="philox", clip="threshold", reads=4))
    args = (case["model_output"], case["sample"], case["table"], case["index"].clone(), case["history"].clone(),
            torch.empty_like(case["sample"]), torch.empty_like(case["sample"]), None,
            N.seed_tensor(case["seed"], "cuda"), 3,
            case["guidance_scale"], case["guidance_extra"], case["extra_scale"], case["variance"], None,
            case["threshold"], 4, True, True, True)
    torch.library.opcheck(torch.ops.fastdiff_C.step.default, args)
