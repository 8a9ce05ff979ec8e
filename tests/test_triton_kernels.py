"""The Triton kernels (fastdiff/kernels/) against the reference backend (fastdiff.eager) and the numpy Philox oracle.

On CPU they run under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1), which is
slow: tensors stay small (a few hundred elements; a few thousand where a tile boundary matters) and
every launch uses few programs. With a GPU the same tests run on CUDA.

Every comparison runs both backends on identical inputs and state (history and index cloned), so
a test checks each output the op writes: out, x0_out, every history slot, the index.
"""
import importlib

import numpy as np
import pytest
import torch
import triton

import fastdiff
import philox_oracle as oracle
from fastdiff import backends
from fastdiff import eager as E
from fastdiff import noise as N
from fastdiff import tables as T

K = backends.load("triton")
KC = importlib.import_module("fastdiff.kernels._common")
KS = importlib.import_module("fastdiff.kernels.step")
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
LOWP = (torch.float16, torch.bfloat16)
SEED = 20240611
SLOTS = 6  # history slots of the synthetic rows: READ_SLOT = 0..3, HIST_SLOT = 4, OUT2_SLOT = 5
SHAPE = (2, 3, 5, 7)  # 105 elements per sample: not a multiple of 4 (the last quad is cut)


# ----------------------------------------------------------------------------- helpers
def rand(*shape, dtype=torch.float32, gen_seed=0, scale=1.0):
    g = torch.Generator().manual_seed(gen_seed)
    return (scale * torch.randn(*shape, generator=g)).to(DEV, dtype)


def synthetic_table(num_rows=3, *, gen_seed=0, **columns):
    """Rows with every coefficient random (in [-1, 1); X0_SCALE in [0.5, 1.5), NOISE_STD in [0.2, 1.2)),
    history slots READ_SLOT = 0..3, HIST_SLOT = 4, OUT2_SLOT = 5, Philox counters 17, 400, 2^20, ...;
    `columns` override."""
    g = torch.Generator().manual_seed(gen_seed)

    def uniform(low, high):
        return low + (high - low) * torch.rand(num_rows, generator=g, dtype=torch.float64)

    cols = {name: uniform(-1, 1) for name in T.COLUMNS if "slot" not in name and name != "noise_counter"}
    cols.update(x0_scale=uniform(0.5, 1.5), noise_std=uniform(0.2, 1.2), var_bias=uniform(-0.5, 0.5),
                var_slope=uniform(-0.5, 0.5), read_slot1=0, read_slot2=1, read_slot3=2, read_slot4=3, hist_slot=4,
                out2_slot=5, noise_counter=torch.tensor([17, 400, 2**20, 3, 4, 5, 6, 7, 8, 9][:num_rows]))
    cols.update(columns)
    return T.step_table(num_rows, **cols).to(DEV)


def two_slot_table(num_rows=3, **columns):
    """synthetic_table for a 2-slot history: every READ_SLOT 0, HIST_SLOT 1."""
    return synthetic_table(num_rows, **{"read_slot1": 0, "read_slot2": 0, "read_slot3": 0, "read_slot4": 0,
                                        "hist_slot": 1, **columns})


def step_inputs(shape=SHAPE, *, guidance=0, variance_channels=False, dtype=torch.float32, mo_dtype=None,
                extra_dtype=None, history_dtype=None, noise_dtype=None, slots=SLOTS, scale=1.0):
    """Inputs of a step on `shape` laid out as the op expects (guidance 0/1/2: none, CFG, CFG + extra)."""
    b = shape[0]
    channels = shape[1:2] if len(shape) > 1 else ()
    mo_shape = (2 * b if guidance else b, *((2 * channels[0],) if variance_channels else channels), *shape[2:])
    return dict(
        model_output=rand(*mo_shape, dtype=mo_dtype or dtype, gen_seed=1, scale=scale),
        sample=rand(*shape, dtype=dtype, gen_seed=2),
        noise=rand(*shape, dtype=noise_dtype or dtype, gen_seed=3),
        guidance_extra=rand(b, *mo_shape[1:], dtype=extra_dtype or dtype, gen_seed=4, scale=scale) if guidance == 2
        else None,
        history=rand(slots, *shape, dtype=history_dtype or dtype, gen_seed=5) if slots else torch.empty(0, device=DEV),
    )


def step_args(inputs, table, *, index=1, noise="given", seed=SEED, sample_offset=0, guidance_scale=None,
              extra_scale=0.0, variance=T.VAR_FIXED, clip_range=None, threshold=None, history_reads=0,
              write_history=False, write_out2=False, advance=False, write_x0=True, out=None, x0_out=None):
    """Keyword arguments of the backend `step` (fastdiff/ops.py); noise: 'given', 'philox' or 'none'."""
    sample = inputs["sample"]
    index = index if isinstance(index, torch.Tensor) else torch.tensor([index], device=DEV)
    return dict(model_output=inputs["model_output"], sample=sample, table=table, index=index,
                history=inputs["history"], out=torch.empty_like(sample) if out is None else out,
                x0_out=(torch.empty_like(sample) if write_x0 else None) if x0_out is None else x0_out,
                noise=inputs["noise"] if noise == "given" else None, seed=seed if noise == "philox" else None,
                sample_offset=sample_offset, guidance_scale=guidance_scale,
                guidance_extra=inputs["guidance_extra"] if guidance_scale is not None else None,
                extra_scale=extra_scale, variance=variance, clip_range=clip_range, threshold=threshold,
                history_reads=history_reads, write_history=write_history, write_out2=write_out2, advance=advance)


def run(backend, args, in_place=False):
    """Run `backend.step` on fresh copies of the mutable state; returns what the op wrote."""
    args = dict(args, history=args["history"].clone(), index=args["index"].clone())
    if in_place:  # out = sample: the step overwrites its input
        args["sample"] = args["sample"].clone()
        args["out"] = args["sample"]
    else:
        args["out"] = torch.empty_strided(args["out"].shape, args["out"].stride(), dtype=args["out"].dtype,
                                          device=DEV)
    if args["x0_out"] is not None:
        args["x0_out"] = torch.empty_strided(args["x0_out"].shape, args["x0_out"].stride(),
                                             dtype=args["x0_out"].dtype, device=DEV)
    assert backend.step(**args) is None  # an out-variant
    return dict(out=args["out"], x0=args["x0_out"], history=args["history"], index=args["index"])


def assert_fp32_close(got, want, equal_nan=False):
    """DESIGN: fp32 step vs reference, atol=1e-6, rtol=1e-5 (the same expression up to FMA contraction)."""
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, want.dtype, got.shape, want.shape)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5, equal_nan=equal_nan)


def assert_lowp_close(got, ref32, ref_lowp):
    """DESIGN: error vs the fp32 reference <= 2x the error of the reference run in that dtype + 1e-3."""
    assert got.dtype == ref_lowp.dtype and got.shape == ref32.shape
    err = (got.float() - ref32.float()).abs().max().item()
    ref_err = (ref_lowp.float() - ref32.float()).abs().max().item()
    assert err <= 2 * ref_err + 1e-3, (err, ref_err)


def assert_ulp_close(got, want, ulps=4):
    """float32 normals within `ulps` units in the last place of the expected value (DESIGN: a few ulp)."""
    got, want = np.asarray(got, dtype=np.float32), np.asarray(want, dtype=np.float32)
    assert got.shape == want.shape
    diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
    tol = ulps * np.spacing(np.abs(want)).astype(np.float64)
    bad = diff > tol
    assert not bad.any(), f"{bad.sum()} of {bad.size} normals differ by more than {ulps} ulp, worst " \
                          f"{(diff / np.spacing(np.abs(want))).max():.1f} ulp"


def assert_same_step(args, in_place=False, equal_nan=False):
    """Triton and the reference backend write the same out, x0_out, history and index."""
    got, want = run(K, args, in_place), run(E, args, in_place)
    assert_fp32_close(got["out"], want["out"], equal_nan)
    if want["x0"] is not None:
        assert_fp32_close(got["x0"], want["x0"], equal_nan)
    if args["history"].numel():
        assert_fp32_close(got["history"], want["history"], equal_nan)
    assert torch.equal(got["index"], want["index"])
    return got


# ----------------------------------------------------------------------------- the per-element math
@pytest.mark.parametrize("variance", [T.VAR_FIXED, T.VAR_SQRT, T.VAR_EXP], ids=["fixed", "sqrt", "exp"])
@pytest.mark.parametrize("noise", ["none", "given", "philox"])
@pytest.mark.parametrize("guidance", [0, 1, 2], ids=["no-cfg", "cfg", "cfg-extra"])
def test_step_guidance_noise_variance(guidance, noise, variance):
    """Every guidance mode x noise source x variance mode; the clip mode cycles through the three, and a
    model output with variance channels also runs under the fixed mode (they are ignored)."""
    case = guidance * 9 + ["none", "given", "philox"].index(noise) * 3 + variance
    clip = ("none", "range", "threshold")[case % 3]
    inputs = step_inputs(guidance=guidance, variance_channels=variance != T.VAR_FIXED or guidance == 1, scale=2.0)
    args = step_args(inputs, synthetic_table(gen_seed=case), noise=noise, sample_offset=case,
                     guidance_scale=(7.5 if guidance else None), extra_scale=(-0.75 if guidance == 2 else 0.0),
                     variance=variance, clip_range=0.8 if clip == "range" else None,
                     threshold=torch.tensor([0.7, 1.6], device=DEV) if clip == "threshold" else None,
                     write_x0=case % 2 == 0)
    assert_same_step(args)


@pytest.mark.parametrize("clip", ["range", "threshold", "both"])
def test_step_clip_and_threshold(clip):
    """Clipping clamps; thresholding clamps to [-s, s] then divides by s (Imagen) and wins over clipping."""
    inputs = step_inputs(guidance=1, scale=4.0)
    table = synthetic_table(x0_x=0.0, x0_m=1.0, x0_scale=1.0)  # x0 = m: most of it outside the clip range
    thr = torch.tensor([0.5, 2.5], device=DEV) if clip != "range" else None
    args = step_args(inputs, table, guidance_scale=3.0, clip_range=1.0 if clip != "threshold" else None, threshold=thr)
    got = assert_same_step(args)
    x0 = got["x0"]
    if clip == "range":
        assert x0.abs().max() == 1.0
    else:  # sample 0: clamp to 0.5, / 0.5 -> in [-1, 1], reached; sample 1 likewise with 2.5
        assert x0[0].abs().max() == 1.0 and x0[1].abs().max() == 1.0


@pytest.mark.parametrize("writes", ["none", "hist", "out2", "both"])
@pytest.mark.parametrize("reads", [0, 1, 2, 3, 4])
def test_step_history_reads_and_writes(reads, writes):
    """out / out2 add OUT_H[k] h_k for the first `history_reads` READ_SLOTs; hist and out2 land in the slots
    the row names and every other slot is left as it was."""
    inputs = step_inputs((2, 2, 3, 5))
    table = synthetic_table(gen_seed=reads)
    args = step_args(inputs, table, index=2, noise="philox" if reads % 2 else "given", history_reads=reads,
                     write_history=writes in ("hist", "both"), write_out2=writes in ("out2", "both"))
    got = assert_same_step(args)
    untouched = [s for s in range(SLOTS) if not (s == 4 and writes in ("hist", "both"))
                 and not (s == 5 and writes in ("out2", "both"))]
    assert torch.equal(got["history"][untouched], inputs["history"][untouched])


def test_step_history_slots_from_the_row_are_clamped():
    """Slot numbers are floats in the row: NaN -> 0, truncated, clamped into [0, slots)."""
    inputs = step_inputs((2, 2, 3, 5), slots=4)
    table = synthetic_table(read_slot1=7.0, read_slot2=-2.0, read_slot3=float("nan"), read_slot4=0.9,
                            hist_slot=1.5, out2_slot=2.99)  # -> reads 3, 0, 0, 0; writes 1, 2
    args = step_args(inputs, table, index=0, history_reads=4, write_history=True, write_out2=True)
    got = assert_same_step(args)
    assert torch.equal(got["history"][[0, 3]], inputs["history"][[0, 3]])
    assert not torch.equal(got["history"][1], inputs["history"][1])
    assert not torch.equal(got["history"][2], inputs["history"][2])


def test_step_hist_and_out2_into_one_slot_is_refused():
    """Tables never name one slot for both writes (which would make the kernels' write order matter)."""
    with pytest.raises(ValueError, match="writes hist and out2 into the same history slot 4"):
        synthetic_table(hist_slot=4, out2_slot=4)


@pytest.mark.parametrize("index", [-1, 3, 4, 2**40], ids=["negative", "sentinel", "past-end", "huge"])
def test_step_index_outside_the_table_reads_the_nan_row(index):
    """A bad device index gives NaN everywhere (never an out-of-bounds read), writes NaN history into slot 0
    (the clamped NaN slot), and still advances."""
    inputs = step_inputs((2, 2, 3, 5))
    table = synthetic_table()  # 3 rows + the NaN sentinel (row 3)
    args = step_args(inputs, table, index=index, noise="philox", history_reads=2, write_history=True,
                     write_out2=True, advance=True)
    got = assert_same_step(args, equal_nan=True)
    assert torch.isnan(got["out"]).all() and torch.isnan(got["x0"]).all()
    assert torch.isnan(got["history"][0]).all()
    assert torch.equal(got["history"][1:], inputs["history"][1:])
    assert got["index"].item() == index + 1


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_step_advance_increments_the_device_index(dtype):
    inputs = step_inputs((1, 2, 3, 3))
    table = synthetic_table()
    index = torch.tensor([0], dtype=dtype, device=DEV)
    for advance in (True, False):
        args = step_args(inputs, table, index=index, advance=advance)
        got = assert_same_step(args)
        assert got["index"].dtype == dtype and got["index"].item() == int(advance)
    # a loop: each step reads the row its index points at
    for i in range(3):
        args = step_args(inputs, table, index=index, advance=True, noise="philox")
        got = run(K, args)
        want = run(E, dict(args, index=torch.tensor([i], dtype=dtype, device=DEV), advance=False))
        assert_fp32_close(got["out"], want["out"])
        index = got["index"]
    assert index.item() == 3


# ----------------------------------------------------------------------------- layouts and dtypes
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_step_in_place(layout):
    """out = sample: each element is read before it is written (history written in the same pass)."""
    inputs = step_inputs((2, 3, 4, 5), guidance=1)
    if layout == "channels_last":
        inputs["sample"] = inputs["sample"].to(memory_format=torch.channels_last)
    args = step_args(inputs, synthetic_table(), noise="philox", guidance_scale=2.0, history_reads=1,
                     write_history=True, write_out2=True)
    got = assert_same_step(args, in_place=True)
    assert not torch.equal(got["out"], inputs["sample"])
    if layout == "channels_last":
        assert got["out"].is_contiguous(memory_format=torch.channels_last)


def test_step_strided_and_channels_last_inputs_and_outputs():
    inputs = step_inputs((2, 3, 6, 5), guidance=2, variance_channels=True)
    strided = dict(
        inputs,
        sample=inputs["sample"].to(memory_format=torch.channels_last),
        model_output=inputs["model_output"].transpose(2, 3).contiguous().transpose(2, 3),  # same values, strided
        noise=inputs["noise"].transpose(0, 1).contiguous().transpose(0, 1),
        guidance_extra=inputs["guidance_extra"].to(memory_format=torch.channels_last),
    )
    out = torch.empty(2, 3, 6, 5, device=DEV).to(memory_format=torch.channels_last)
    x0_out = torch.empty(2, 3, 5, 6, device=DEV).transpose(2, 3)  # a non-contiguous view
    table = synthetic_table()
    common = dict(guidance_scale=4.0, extra_scale=0.3, variance=T.VAR_EXP, clip_range=1.5, history_reads=2,
                  write_history=True)
    got = run(K, step_args(strided, table, out=out, x0_out=x0_out, **common))
    want = run(E, step_args(inputs, table, **common))
    assert got["out"].stride() == out.stride() and got["x0"].stride() == x0_out.stride()
    for name in ("out", "x0", "history"):
        assert_fp32_close(got[name].contiguous(), want[name])


@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("config", ["cfg-exp-philox-threshold-history", "sqrt-given-clip"])
def test_step_low_precision(dtype, config):
    """fp16 / bf16 storage, fp32 math: DESIGN's tolerance against the reference computed in fp32."""
    heavy = config.startswith("cfg")
    inputs = step_inputs((2, 3, 8, 9), guidance=2 if heavy else 0, variance_channels=True, dtype=dtype)
    table = synthetic_table()
    opts = dict(noise="philox" if heavy else "given", guidance_scale=5.0 if heavy else None,
                extra_scale=0.5 if heavy else 0.0, variance=T.VAR_EXP if heavy else T.VAR_SQRT,
                clip_range=None if heavy else 1.0,
                threshold=torch.tensor([1.1, 1.7], device=DEV) if heavy else None,
                history_reads=2 if heavy else 0, write_history=heavy, write_out2=heavy)
    got = run(K, step_args(inputs, table, **opts))
    ref_lowp = run(E, step_args(inputs, table, **opts))
    inputs32 = {k: (v.float() if v is not None else None) for k, v in inputs.items()}
    ref32 = run(E, step_args(inputs32, table, **opts))
    for name in ("out", "x0", "history"):
        assert_lowp_close(got[name], ref32[name], ref_lowp[name])


def test_step_mixed_input_dtypes():
    """Each pointer has its own element type: bf16 model output, fp16 noise / extra, fp32 history."""
    inputs = step_inputs(guidance=2, mo_dtype=torch.bfloat16, noise_dtype=torch.float16, extra_dtype=torch.float16,
                         history_dtype=torch.float32)
    args = step_args(inputs, synthetic_table(), guidance_scale=3.0, extra_scale=0.5, history_reads=3,
                     write_history=True, write_out2=True)
    assert_same_step(args)
    # a fp16 sample with fp32 model output and bf16 history: fp32 math on the stored values, then rounding
    inputs = step_inputs(dtype=torch.float16, mo_dtype=torch.float32, history_dtype=torch.bfloat16)
    args = step_args(inputs, synthetic_table(), noise="philox", history_reads=1, write_history=True)
    got, want = run(K, args), run(E, args)
    for name in ("out", "x0", "history"):  # identical fp32 values up to FMA, rounded once: 1 ulp at most
        torch.testing.assert_close(got[name], want[name], atol=0, rtol=2**-7)


@pytest.mark.parametrize("shape", [(1,), (3,), (2, 5), (1, 3, 1, 1), (2, 1023), (1, 1025), (1, 4 * 1024 + 3)])
def test_step_sample_tails(shape):
    """Per-sample sizes that are not a multiple of 4 (the last Philox quad is cut), batch 1, 1-D samples,
    sizes around a program's BLOCK."""
    guidance = 1 if len(shape) > 1 else 0
    inputs = step_inputs(shape, guidance=guidance, variance_channels=len(shape) > 1, slots=2)
    table = two_slot_table()
    args = step_args(inputs, table, noise="philox", sample_offset=5, guidance_scale=2.0 if guidance else None,
                     variance=T.VAR_SQRT if len(shape) > 1 else T.VAR_FIXED, history_reads=1, write_history=True)
    assert_same_step(args)


# ----------------------------------------------------------------------------- real sampler rows
def test_ddpm_rows_learned_range_cfg_and_fixed_small():
    """DDPMSampler's own table rows (diffusers' float32 coefficients), keyed by the timestep."""
    for variance_type, channels, cfg in (("fixed_small", 3, None), ("learned_range", 6, 4.0)):
        sampler = fastdiff.DDPMSampler(variance_type=variance_type, prediction_type="epsilon")
        sampler.set_timesteps(20)
        table = sampler._table(torch.device("cpu")).to(DEV)
        inputs = step_inputs((2, 3, 4, 5), guidance=int(cfg is not None), variance_channels=channels == 6, slots=0)
        for t in (int(sampler.timesteps[3]), 0):  # t = 0: no noise (NOISE_STD = 0: Philox skipped)
            args = step_args(inputs, table, index=t, noise="philox", guidance_scale=cfg,
                             variance=sampler.variance_mode, clip_range=1.0)
            assert_same_step(args)


def test_ddim_rows_v_prediction_eta():
    sampler = fastdiff.DDIMSampler(prediction_type="v_prediction")
    sampler.set_timesteps(10)
    table = sampler._table(torch.device("cpu"), eta=0.7, use_clipped_model_output=True).to(DEV)
    inputs = step_inputs((2, 4, 3, 3), guidance=1, slots=0)
    args = step_args(inputs, table, index=int(sampler.timesteps[2]), noise="philox", guidance_scale=6.0,
                     threshold=torch.tensor([1.2, 3.0], device=DEV))
    assert_same_step(args)


def test_sampler_step_through_the_triton_backend():
    """DDPMSampler.step with the triton backend forced gives the reference backend's result."""
    x = rand(2, 3, 4, 4, gen_seed=7)
    results = {}
    for name in ("triton", "reference"):
        sampler = fastdiff.DDPMSampler()
        sampler.set_timesteps(10, device=DEV)
        with backends.forced(name):
            sample = x
            for t in sampler.timesteps[:3]:
                sample = sampler.step(torch.tanh(sample), int(t), sample, seed=SEED).prev_sample
        results[name] = sample
    assert_fp32_close(results["triton"], results["reference"])


# ----------------------------------------------------------------------------- the Philox stream
@pytest.mark.parametrize("seed,counter,stream,offset", [
    (0, 0, N.STREAM_STEP, 0), (2**32 - 1, 999, N.STREAM_Q_SAMPLE, 7), (2**63 - 1, 17, N.STREAM_STEP, 2**32 - 3)])
def test_philox_integers_bit_exact_and_normals_within_ulps(seed, counter, stream, offset):
    per_sample = 2 * KC.BLOCK + 7  # three programs per sample, the last quad cut after 3 elements
    words, partners, n = KC.philox_debug(3, per_sample, seed, counter, stream, sample_offset=offset, device=DEV)
    want_n, (want_words, want_partners) = oracle.randn((3, per_sample), seed, counter, stream, sample_offset=offset)
    assert np.array_equal(words.cpu().numpy().view(np.uint32), want_words)
    assert np.array_equal(partners.cpu().numpy().view(np.uint32), want_partners)
    assert_ulp_close(n.cpu().numpy(), want_n)


def noise_table(counter):
    """Rows whose step is out = 1 * n: the output is exactly the step's noise (counter = the row's)."""
    return T.step_table(2, noise_std=1.0, x0_scale=0.0, noise_counter=counter).to(DEV)


def kernel_noise(batch, per_sample, seed, counter, sample_offset=0):
    zeros = torch.zeros(batch, per_sample, device=DEV)
    out = torch.empty_like(zeros)
    K.step(zeros, zeros, noise_table(counter), torch.tensor([0], device=DEV), torch.empty(0, device=DEV), out, None,
           None, seed, sample_offset, None, None, 0.0, T.VAR_FIXED, None, None, 0, False, False, False)
    return out


@pytest.mark.parametrize("shape", [(2, 3, 333), (3, 5)])  # 999 and 5 elements per sample: not quads
def test_step_noise_is_the_stream_at_the_rows_counter(shape):
    got = kernel_noise(shape[0], int(np.prod(shape[1:])), SEED, 321, sample_offset=11)
    want, _ = oracle.randn(shape, SEED, counter=321, stream=N.STREAM_STEP, sample_offset=11)
    assert_ulp_close(got.cpu().numpy(), want.reshape(shape[0], -1))


def test_sample_noise_is_the_same_in_a_batch_of_1_and_32():
    batch = kernel_noise(32, 18, SEED, 42)  # 18 = 4 quads + half of a fifth
    for i in (0, 17, 31):
        alone = kernel_noise(1, 18, SEED, 42, sample_offset=i)
        assert torch.equal(alone[0], batch[i])
    assert not torch.equal(batch[0], batch[1])
    # quads restart at every sample: a shorter sample is a prefix of a longer one, tail included
    assert torch.equal(kernel_noise(2, 20, SEED, 42)[:, :18], batch[:2])


def test_step_without_noise_in_its_row_skips_philox():
    """NOISE_STD = PRE_NOISE = 0 (DDPM's last step) under the fixed mode: the same values as no noise at all."""
    inputs = step_inputs()
    table = synthetic_table(noise_std=0.0, pre_noise=0.0)
    with_seed = run(K, step_args(inputs, table, noise="philox"))
    without = run(K, step_args(inputs, table, noise="none"))
    assert torch.equal(with_seed["out"], without["out"]) and torch.equal(with_seed["x0"], without["x0"])
    assert_same_step(step_args(inputs, table, noise="philox"))
    # a learned mode draws the noise whatever NOISE_STD is (std = NOISE_STD * f(v))
    inputs = step_inputs(variance_channels=True)
    assert_same_step(step_args(inputs, table, noise="philox", variance=T.VAR_EXP))


# ----------------------------------------------------------------------------- q_sample, cfg_combine
def q_args(x0, table, index, noise=None, seed=SEED, sample_offset=0, target=True, noise_out=True):
    return dict(x0=x0, table=table, index=index, noise=noise, seed=seed, sample_offset=sample_offset,
                x_t=torch.empty_like(x0), target=torch.empty_like(x0) if target else None,
                noise_out=torch.empty_like(x0) if noise_out else None)


def run_q(backend, args):
    args = dict(args, **{k: (torch.empty_like(args[k]) if args[k] is not None else None)
                         for k in ("x_t", "target", "noise_out")})
    assert backend.q_sample(**args) is None
    return args["x_t"], args["target"], args["noise_out"]


def training_table(prediction_type="v_prediction"):
    return fastdiff.DDPMSampler(prediction_type=prediction_type).training_table(DEV)


@pytest.mark.parametrize("dtype", (torch.float32, *LOWP))
def test_q_sample_explicit_noise(dtype):
    x0, n = rand(3, 2, 5, 7, dtype=dtype, gen_seed=4), rand(3, 2, 5, 7, dtype=dtype, gen_seed=5)
    table, index = training_table(), torch.tensor([0, 500, 999], device=DEV)
    args = q_args(x0, table, index, noise=n)
    got = run_q(K, args)
    if dtype == torch.float32:
        for g, w in zip(got, run_q(E, args)):
            assert_fp32_close(g, w)
    else:
        ref32 = run_q(E, q_args(x0.float(), table, index, noise=n.float()))
        for g, r32, rl in zip(got, ref32, run_q(E, args)):
            assert_lowp_close(g, r32, rl)
    assert torch.equal(got[2], n)


@pytest.mark.parametrize("dtype", (torch.float32, *LOWP))
def test_q_sample_in_kernel_noise_matches_eager(dtype):
    """Philox noise (counter 0, stream STREAM_Q_SAMPLE) rounded to x0's dtype; x_t made of exactly that noise."""
    x0 = rand(2, 3, 4, 5, dtype=dtype)
    table, index = training_table("epsilon"), torch.tensor([10, 900], device=DEV, dtype=torch.int32)
    x_t, target, noise = run_q(K, q_args(x0, table, index, sample_offset=9))
    want_n, _ = oracle.randn(x0.shape, SEED, counter=0, stream=N.STREAM_Q_SAMPLE, sample_offset=9)
    want_n = torch.from_numpy(want_n).to(DEV)
    if dtype == torch.float32:
        assert_ulp_close(noise.cpu().numpy(), want_n.cpu().numpy())
    else:  # the oracle's normals, rounded to the dtype: equal unless a few ulp straddle a rounding boundary
        torch.testing.assert_close(noise, want_n.to(dtype), atol=0, rtol=2**-7)
    assert torch.equal(target, noise)  # epsilon-prediction: target = 0 x0 + 1 n, the noise itself
    x_t_r, _, _ = run_q(E, q_args(x0, table, index.long(), noise=noise, sample_offset=9))
    torch.testing.assert_close(x_t, x_t_r, atol=1e-6, rtol=1e-5 if dtype == torch.float32 else 2**-7)
    x_t_only = run_q(K, q_args(x0, table, index, sample_offset=9, target=False, noise_out=False))
    assert x_t_only[1] is None and x_t_only[2] is None and torch.equal(x_t_only[0], x_t)


def test_q_sample_index_outside_the_table_gives_nan():
    x0 = rand(4, 8)
    table = training_table()  # 1000 rows + the sentinel
    x_t, target, _ = run_q(K, q_args(x0, table, torch.tensor([1000, 3, -1, 2**40], device=DEV)))
    for value in (x_t, target):
        assert torch.isnan(value[[0, 2, 3]]).all() and torch.isfinite(value[1]).all()


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_cfg_combine(dtype):
    from fastdiff import reference as R
    u, c = rand(2, 3, 7, 9, dtype=dtype, gen_seed=6), rand(2, 3, 7, 9, dtype=dtype, gen_seed=7)
    got = K.cfg_combine(u, c.to(memory_format=torch.channels_last), 7.5)
    assert got.is_contiguous(memory_format=torch.channels_last)
    if dtype == torch.float32:
        assert_fp32_close(got, R.cfg_combine(u, c, 7.5))
    else:
        assert_lowp_close(got, R.cfg_combine(u.float(), c.float(), 7.5), R.cfg_combine(u, c, 7.5))


# ----------------------------------------------------------------------------- index math
def test_grid_chunks_respect_cuda_y_limit():
    chunks = KC.step_grid(200_000, 3 * 64 * 64)
    assert [b0 for b0, _ in chunks] == [0, 65535, 131070, 196605]
    assert all(grid == (12, min(65535, 200_000 - b0)) for b0, grid in chunks)
    assert sum(grid[1] for _, grid in chunks) == 200_000


def test_offsets_past_int32_without_allocating():
    """b * per_sample + i is int64 inside the kernel: samples 1047810.. of 4099 elements start past 2^32."""
    per_sample, b0, samples = 4099, 2**32 // 4099 + 2, 2
    blocks = -(-per_sample // KC.BLOCK)
    out = torch.empty(samples * blocks * 2, dtype=torch.int64, device=DEV)
    KC._offsets_debug_kernel[(blocks, samples)](out, per_sample, b0, BLOCK=KC.BLOCK)
    got = out.view(samples, blocks, 2).cpu()
    b = torch.arange(b0, b0 + samples, dtype=torch.int64)[:, None]
    first = b * per_sample + torch.arange(blocks) * KC.BLOCK
    last = torch.minimum(first + KC.BLOCK, (b + 1) * per_sample) - 1
    assert got[-1, -1, 1].item() > 2**32
    assert torch.equal(got[..., 0], first) and torch.equal(got[..., 1], last)


@pytest.mark.skipif(DEV.type == "cuda", reason="on a GPU: test_triton_gpu.py::test_more_than_2_31_elements")
def test_step_past_2_31_elements_with_position_dependent_values(monkeypatch):
    """The real launcher on tensors of more than 2^31 elements (CFG model output and history past 2^32):
    reserved but never touched except the last sample, which the kernel alone runs (the launch grid is
    cut to that sample). Its values depend on their global position, so an offset computed in int32
    would read other values (or fault), not the same ones."""
    per_sample = 4099  # an odd size: the sample's last quad is cut
    batch = 2**31 // per_sample + 2
    last = batch - 1
    assert last * per_sample >= 2**31 and (batch + last) * per_sample >= 2**32
    dt = torch.float16
    try:  # virtual memory only (~30 GB reserved): pages are committed where written
        x, mo = torch.empty(batch, per_sample, dtype=dt), torch.empty(2 * batch, per_sample, dtype=dt)
        history = torch.empty(2, batch, per_sample, dtype=dt)
        out, x0_out, thr = torch.empty_like(x), torch.empty_like(x), torch.empty(batch)
    except RuntimeError as error:
        pytest.skip(f"cannot reserve the address space of the 2^31-element tensors: {error}")
    position = torch.arange(per_sample, dtype=torch.float64) + last * per_sample  # global flat index

    def wave(k):  # a different value at every position: sin of the global index
        return torch.sin(position * k + k).to(dt)

    x[last], mo[last], mo[batch + last] = wave(1e-3), wave(3e-3), wave(7e-3)
    history[0, last], history[1, last], thr[last] = wave(5e-3), 0.0, 1.25
    table = two_slot_table()
    blocks = triton.cdiv(per_sample, KC.BLOCK)
    monkeypatch.setattr(KC, "step_grid", lambda b, n, block=KC.BLOCK: [(last, (blocks, 1))])
    kw = dict(noise=None, seed=SEED, guidance_scale=3.0, guidance_extra=None, extra_scale=0.0,
              variance=T.VAR_FIXED, clip_range=None, history_reads=1, write_history=True, write_out2=False,
              advance=False)
    K.step(mo, x, table, torch.tensor([1]), history, out, x0_out, sample_offset=7, threshold=thr, **kw)
    # the reference on that sample alone, at its global sample index
    h_ref = history[:, last:last + 1].clone()
    h_ref[1] = 0.0
    out_ref, x0_ref = torch.empty(1, per_sample, dtype=dt), torch.empty(1, per_sample, dtype=dt)
    E.step(mo[[last, batch + last]], x[last:last + 1], table, torch.tensor([1]), h_ref, out_ref, x0_ref,
           sample_offset=7 + last, threshold=thr[last:last + 1], **kw)
    for got, want in ((out[last], out_ref[0]), (x0_out[last], x0_ref[0]), (history[1, last], h_ref[1, 0])):
        assert torch.isfinite(want).all() and want.abs().max() > 0.1
        torch.testing.assert_close(got, want, atol=0, rtol=2**-10)  # fp16 results of the same fp32 values


# ----------------------------------------------------------------------------- input errors
def test_step_input_errors_name_the_argument():
    inputs = step_inputs((2, 3, 4, 5))
    x, mo = inputs["sample"], inputs["model_output"]
    base = step_args(inputs, synthetic_table(), history_reads=1)
    cases = [
        (dict(sample=x.double(), model_output=mo.double()), TypeError, "sample has dtype torch.float64"),
        (dict(model_output=mo[:, :2]), ValueError, "model_output has shape"),
        (dict(guidance_scale=2.0), ValueError, r"uncond; cond"),
        (dict(variance=T.VAR_SQRT), ValueError, "2x the sample's channels"),
        (dict(variance=7), ValueError, "variance must be one of"),
        (dict(noise=inputs["noise"][:1]), ValueError, "noise has shape"),
        (dict(noise=None, seed=-1), ValueError, "seed must be an int"),
        (dict(threshold=torch.ones(3, device=DEV)), ValueError, "threshold has shape"),
        (dict(table=base["table"][:, :5]), ValueError, "table has shape"),
        (dict(table=base["table"].double()), TypeError, "table has dtype"),
        (dict(index=torch.tensor([0, 1], device=DEV)), ValueError, "index has shape"),
        (dict(index=torch.tensor([0.0], device=DEV)), TypeError, "index has dtype"),
        (dict(history_reads=5), ValueError, r"history_reads must be an int in \[0, 4\]"),
        (dict(history=inputs["history"][:, :1]), ValueError, "history has shape"),
        (dict(history=inputs["history"].transpose(1, 2).contiguous().transpose(1, 2)), ValueError,
         "history must be contiguous"),
        (dict(out=torch.empty_like(x, dtype=torch.float16)), TypeError, "out has dtype"),
        (dict(out=None), TypeError, "out must be a tensor"),
        (dict(x0_out=x[:1]), ValueError, "x0_out has shape"),
        (dict(sample_offset=-1), ValueError, "sample_offset must be an int"),
        (dict(guidance_scale=2.0, model_output=torch.cat([mo, mo]), guidance_extra=mo[:, :2]), ValueError,
         "guidance_extra has shape"),
    ]
    for change, error, match in cases:
        with pytest.raises(error, match=match):
            K.step(**{**base, **change})


def test_q_sample_and_cfg_combine_input_errors():
    x = rand(2, 3, 4, 5)
    table, index = training_table(), torch.tensor([1, 2], device=DEV)
    base = q_args(x, table, index)
    cases = [
        (dict(index=index[:1]), ValueError, "index has shape"),
        (dict(index=index.float()), TypeError, "index has dtype"),
        (dict(table=table[:, :3]), ValueError, "table has shape"),
        (dict(noise=x[:1]), ValueError, "noise has shape"),
        (dict(x_t=None), TypeError, "x_t must be a tensor"),
        (dict(target=x[:, :1]), ValueError, "target has shape"),
        (dict(x0=x.double()), TypeError, "x0 has dtype"),
    ]
    for change, error, match in cases:
        with pytest.raises(error, match=match):
            K.q_sample(**{**base, **change})
    with pytest.raises(ValueError, match="uncond has shape"):
        K.cfg_combine(x[:1], x, 2.0)


# ----------------------------------------------------------------------------- through fastdiff.ops
@pytest.fixture
def triton_backend(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "triton")
    from fastdiff import ops
    assert backends.select("step", torch.empty(1, device=DEV)) is K
    return ops


def test_opcheck_every_op(triton_backend):
    ops = triton_backend
    inputs = step_inputs((2, 2, 3, 4), guidance=2, variance_channels=True)
    table = synthetic_table()
    x, n = inputs["sample"], inputs["noise"]
    index = torch.tensor([1], device=DEV)
    thr = torch.tensor([1.5, 2.0], device=DEV)
    cases = [
        (ops.step, (inputs["model_output"], x, table, index, inputs["history"], None, N.seed_tensor(SEED, DEV), 0, 3.0,
                    inputs["guidance_extra"], 0.5, T.VAR_EXP, None, thr, 4, True, True, True)),
        (ops.step, (inputs["model_output"][:2, :2], x, table, index, torch.empty(0, device=DEV), n, None, 0, None,
                    None, 0.0, T.VAR_FIXED, 1.0, None, 0, False, False, False)),
        (ops.q_sample, (x, training_table(), torch.tensor([3, 700], device=DEV), None, SEED, 0, True, True)),
        (ops.cfg_combine, (x, n, 7.5)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_compiled_loop_has_no_graph_break_or_recompile(triton_backend):
    """torch.compile(fullgraph=True) over a loop of ops.run_step (the registered op, then the index advanced
    on the device): rows gathered on the device, so one graph serves every starting step."""
    ops = triton_backend
    table = two_slot_table(9, gen_seed=3)

    def loop(x, index, history):
        for _ in range(3):
            eps = torch.tanh(x)  # a stand-in denoiser
            x, _ = ops.run_step(eps, x, table, index, history, None, SEED, 0, None, None, 0.0, T.VAR_FIXED, 1.0,
                                None, 1, True, False, True, False)
        return x

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(loop, fullgraph=True, backend="aot_eager")
    x = rand(2, 3, 4, 4)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for start in (0, 3, 6):
            index, history = torch.tensor([start], device=DEV), torch.zeros(2, *x.shape, device=DEV)
            got = compiled(x, index, history)
            assert index.item() == start + 3
            index_e, history_e = torch.tensor([start], device=DEV), torch.zeros(2, *x.shape, device=DEV)
            with backends.forced("reference"):
                want = loop(x, index_e, history_e)
            assert_fp32_close(got, want)
            assert_fp32_close(history, history_e)
    assert not torch._dynamo.utils.counters["graph_break"]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
