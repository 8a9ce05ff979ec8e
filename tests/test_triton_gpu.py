"""The compiled Triton kernels on a real GPU: agreement with the reference backend run on the same GPU at
sizes the interpreter cannot reach, the Philox stream on the device, no host synchronisation,
CUDA-graph capture + replay of an advancing step, a launch on a non-default stream, batches past
CUDA's grid-y limit and tensors past 2^31 elements.

Every test carries the `cuda` marker: skipped (with that reason) where torch.cuda is unavailable.
"""
import numpy as np
import pytest
import torch

import fastdiff
import philox_oracle as oracle
from fastdiff import eager as E
from fastdiff import noise as N
from fastdiff import tables as T
from test_triton_kernels import (SEED, K, KC, assert_fp32_close, assert_lowp_close, assert_ulp_close, run,
                                 step_args, step_inputs, synthetic_table, training_table, two_slot_table)

pytestmark = pytest.mark.cuda
CUDA = torch.device("cuda")
GPU_ULPS = 8  # libdevice log / sin / cos and sqrt.approx (Triton's Box-Muller) vs numpy: a few ulp


def randn(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator(device=CUDA).manual_seed(seed)
    return torch.randn(*shape, generator=g, device=CUDA).to(dtype)


def assert_close_noisy(got, want):
    """Outputs made with Philox noise: the reference backend draws it with torch's CUDA math, the kernel
    with libdevice and an approximate sqrt, a few ulp apart: compare with a noise-sized slack."""
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("config", ["ddpm-learned-cfg", "multistep-history-extra"])
def test_step_agrees_with_reference(dtype, config):
    """Latent-sized steps (4 x 4 x 64 x 64, aligned: the vectorised variant) with given noise."""
    learned = config.startswith("ddpm")
    inputs = step_inputs((4, 4, 64, 64), guidance=1 if learned else 2, variance_channels=learned, dtype=dtype)
    table = synthetic_table()
    opts = dict(noise="given", guidance_scale=7.5, extra_scale=0.0 if learned else 0.5,
                variance=T.VAR_EXP if learned else T.VAR_FIXED, clip_range=1.0 if learned else None,
                threshold=None if learned else torch.tensor([1.1, 1.5, 2.0, 2.5], device=CUDA),
                history_reads=0 if learned else 3, write_history=not learned, write_out2=not learned)
    got = run(K, step_args(inputs, table, **opts))
    if dtype == torch.float32:
        want = run(E, step_args(inputs, table, **opts))
        for name in ("out", "x0", "history"):
            assert_fp32_close(got[name], want[name])
    else:
        ref_lowp = run(E, step_args(inputs, table, **opts))
        inputs32 = {k: (v.float() if v is not None else None) for k, v in inputs.items()}
        ref32 = run(E, step_args(inputs32, table, **opts))
        for name in ("out", "x0", "history"):
            assert_lowp_close(got[name], ref32[name], ref_lowp[name])


@pytest.mark.parametrize("shape", [(2, 4, 96, 96), (3, 3, 37, 41)])  # aligned; odd (105 % 4 != 0 style tails)
def test_step_in_kernel_noise_and_real_rows_agree_with_reference(shape):
    sampler = fastdiff.DDIMSampler(prediction_type="v_prediction")
    sampler.set_timesteps(20)
    table = sampler._table(torch.device("cpu"), eta=1.0, use_clipped_model_output=True).to(CUDA)
    inputs = step_inputs(shape, guidance=1, slots=0)
    args = step_args(inputs, table, index=int(sampler.timesteps[5]), noise="philox", guidance_scale=5.0,
                     threshold=torch.full((shape[0],), 1.5, device=CUDA))
    got, want = run(K, args), run(E, args)
    assert_close_noisy(got["out"], want["out"])
    assert_fp32_close(got["x0"], want["x0"])


def test_philox_on_device_matches_oracle():
    per_sample = 5001  # not a multiple of 4: the last quad of each sample is cut after one element
    words, partners, n = KC.philox_debug(4, per_sample, 2**40 + 7, 321, N.STREAM_STEP, sample_offset=2**32 - 2,
                                         device=CUDA)
    want_n, (want_words, want_partners) = oracle.randn((4, per_sample), 2**40 + 7, 321, N.STREAM_STEP,
                                                       sample_offset=2**32 - 2)
    assert np.array_equal(words.cpu().numpy().view(np.uint32), want_words)
    assert np.array_equal(partners.cpu().numpy().view(np.uint32), want_partners)
    assert_ulp_close(n.cpu().numpy(), want_n, ulps=GPU_ULPS)


def test_step_noise_on_device_is_the_stream_at_the_rows_counter():
    shape = (3, 4, 33, 35)
    zeros = torch.zeros(shape, device=CUDA)
    out = torch.empty_like(zeros)
    table = T.step_table(2, noise_std=1.0, x0_scale=0.0, noise_counter=777).to(CUDA)
    K.step(zeros, zeros, table, torch.tensor([1], device=CUDA), torch.empty(0, device=CUDA), out, None, None, SEED,
           2**32 + 5, None, None, 0.0, T.VAR_FIXED, None, None, 0, False, False, False)
    want, _ = oracle.randn(shape, SEED, counter=777, stream=N.STREAM_STEP, sample_offset=2**32 + 5)
    assert_ulp_close(out.cpu().numpy(), want, ulps=GPU_ULPS)


def test_no_host_synchronisation():
    """The step (row gather, history slots, Philox, advance) and q_sample never synchronise with the host."""
    inputs = step_inputs((2, 4, 32, 32), guidance=2, variance_channels=True)
    args = step_args(inputs, synthetic_table(), noise="philox", guidance_scale=3.0, extra_scale=0.5,
                     variance=T.VAR_EXP, threshold=torch.tensor([1.5, 2.0], device=CUDA), history_reads=4,
                     write_history=True, write_out2=True, advance=True)
    x0 = inputs["sample"]
    q = dict(x0=x0, table=training_table(), index=torch.tensor([3, 900], device=CUDA), noise=None, seed=SEED,
             sample_offset=0, x_t=torch.empty_like(x0), target=torch.empty_like(x0), noise_out=torch.empty_like(x0))
    K.step(**args)  # compile outside the check
    K.q_sample(**q)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            K.step(**args)
            K.q_sample(**q)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert args["index"].item() == 1 + 4


def test_cuda_graph_capture_and_replay_of_an_advancing_step():
    """One captured step (row gathered at the device index, index advanced on the device) replays as the
    next step each time, with the history it wrote read back."""
    table = two_slot_table(8, gen_seed=2)
    inputs = step_inputs((2, 4, 32, 32), guidance=1, slots=2)
    x, mo, history = inputs["sample"].clone(), inputs["model_output"], torch.zeros_like(inputs["history"])
    index = torch.zeros(1, dtype=torch.int64, device=CUDA)
    out = torch.empty_like(x)

    def step():
        K.step(mo, x, table, index, history, out, None, None, SEED, 0, 3.0, None, 0.0, T.VAR_FIXED, 1.0, None, 1,
               True, False, True)
        x.copy_(out)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up: Triton compiles on the first launch, never during capture
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    # reference: the same steps eagerly from the same start
    x_ref, history_ref = inputs["sample"].clone(), torch.zeros_like(history)
    index_ref = torch.zeros(1, dtype=torch.int64, device=CUDA)
    E.step(mo, x_ref, table, index_ref, history_ref, x_ref, None, None, SEED, 0, 3.0, None, 0.0, T.VAR_FIXED, 1.0,
           None, 1, True, False, True)
    x.copy_(x_ref)
    history.copy_(history_ref)
    index.copy_(index_ref)
    for _ in range(4):
        graph.replay()
        E.step(mo, x_ref, table, index_ref, history_ref, x_ref, None, None, SEED, 0, 3.0, None, 0.0, T.VAR_FIXED,
               1.0, None, 1, True, False, True)
        torch.cuda.synchronize()
        assert index.item() == index_ref.item()
        assert_close_noisy(x, x_ref)
        assert_close_noisy(history, history_ref)


def test_runs_on_the_current_non_default_stream():
    inputs = step_inputs((2, 4, 64, 64), slots=0)
    x_src = inputs["sample"]
    x = torch.zeros_like(x_src)
    table = synthetic_table()
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)  # keep `side` busy: a launch on another stream would read zeros
        x.copy_(x_src)
        got = run(K, step_args(dict(inputs, sample=x), table, noise="philox"))
    side.synchronize()
    want = run(E, step_args(inputs, table, noise="philox"))
    assert_close_noisy(got["out"], want["out"])


def test_batch_past_grid_y_limit():
    batch = KC.MAX_GRID_Y + 1000
    x0 = randn(batch, 4, seed=4)
    index = torch.randint(0, 1000, (batch,), device=CUDA)
    table = training_table()
    q = dict(x0=x0, table=table, index=index, noise=None, seed=SEED, sample_offset=0)
    got = [torch.empty_like(x0) for _ in range(3)]
    want = [torch.empty_like(x0) for _ in range(3)]
    K.q_sample(**q, x_t=got[0], target=got[1], noise_out=got[2])
    E.q_sample(**q, x_t=want[0], target=want[1], noise_out=want[2])
    for g, w in zip(got, want):
        assert_close_noisy(g, w)
    inputs = step_inputs((batch, 3), slots=0)
    args = step_args(inputs, synthetic_table(), noise="philox", sample_offset=3)
    got, want = run(K, args), run(E, args)
    assert_close_noisy(got["out"], want["out"])


def test_more_than_2_31_elements():
    """fp16 tensors of 2^31 + 2^20 elements with values that depend on their position (sample and element):
    the last sample, past 2^31, equals the reference run on it alone at its global sample index."""
    per_sample, batch = 2**20, 2**11 + 1
    if torch.cuda.mem_get_info()[0] < 32 * 2**30:
        pytest.skip("needs 32 GiB of free GPU memory for four 4.3 GB tensors and an 8.6 GB temporary")
    i = torch.arange(per_sample, device=CUDA, dtype=torch.float32)
    b = torch.arange(batch, device=CUDA, dtype=torch.float32)[:, None]
    x = torch.sin(i * 1e-3 + b * 0.37).half()
    mo = torch.cos(i * 2e-3 - b * 0.11).half()
    out, x0_out = torch.empty_like(x), torch.empty_like(x)
    table = synthetic_table()
    kw = dict(noise=None, seed=SEED, guidance_scale=None, guidance_extra=None, extra_scale=0.0,
              variance=T.VAR_FIXED, clip_range=1.0, threshold=None, history_reads=0, write_history=False,
              write_out2=False, advance=False)
    K.step(mo, x, table, torch.tensor([1], device=CUDA), torch.empty(0, device=CUDA), out, x0_out, sample_offset=0,
           **kw)
    for s in (0, batch - 1):  # the first sample and the last, past 2^31
        one = slice(s, s + 1)
        out_ref, x0_ref = torch.empty_like(x[one]), torch.empty_like(x[one])
        E.step(mo[one], x[one], table, torch.tensor([1], device=CUDA), torch.empty(0, device=CUDA), out_ref, x0_ref,
               sample_offset=s, **kw)
        torch.testing.assert_close(out[one].float(), out_ref.float(), atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(x0_out[one].float(), x0_ref.float(), atol=1e-3, rtol=2**-10)  # FMA: 1 fp16 ulp
    del x, mo, out, x0_out
    n = 4099 * (2**31 // 4099 + 3)  # past 2^31
    period = torch.arange(4099, device=CUDA, dtype=torch.float16)  # 4099: not a divisor of any block size
    u = period.repeat(n // 4099)
    c = (u * 0.5 + 1.0).flip(0)
    got = K.cfg_combine(u, c, 2.0)
    tail = slice(n - 5000, n)
    want = u[tail].float() + 2.0 * (c[tail].float() - u[tail].float())
    torch.testing.assert_close(got[tail].float(), want, atol=0, rtol=2**-10)
