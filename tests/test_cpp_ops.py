"""The C++ CPU ops of fastdiff._C (the generic step, q_sample, cfg_combine) against fastdiff.eager (the
reference backend: fastdiff.reference behind the same out-variant signatures), and the Philox stream
against the numpy oracle.

Tolerances (DESIGN "Correctness"): fp32 atol=1e-6 rtol=1e-5; fp64 atol=1e-12 rtol=1e-10; fp16/bf16:
max error vs the fp32 reference <= 2x the reference's own error in that dtype + 1e-3. In-kernel
(Philox) noise: normals agree within a few float32 ulp (different log/sin/cos), so fp64 then uses the
fp32 tolerances. Where the math has no libm function (given noise, fixed or sqrt variance) the CPU
build (-ffp-contract=off) must equal the reference bit for bit. With FASTDIFF_REQUIRE_CPP=1 (CI) a
missing extension fails every test instead of skipping it.
"""
import math
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
from fastdiff import tables as T
from fastdiff.samplers.ddpm import VARIANCE_TYPES as DDPM_VARIANCE_TYPES

try:
    from fastdiff import _cpp as C
    REASON = C.unavailable_reason("cpu")
except Exception as error:  # the wrapper itself failed
    C, REASON = None, f"fastdiff._cpp failed to import: {error}"
REQUIRE = os.environ.get("FASTDIFF_REQUIRE_CPP") == "1"
pytestmark = pytest.mark.skipif(REASON is not None and not REQUIRE, reason=f"C++ extension unavailable: {REASON}")
from fastdiff import backends as B  # noqa: E402
ROOT = pathlib.Path(__file__).resolve().parent.parent

LOW = (torch.float16, torch.bfloat16)
SLOTS = 6  # history slots of the crafted tables: rows read 4 of them and write the other two
GUIDANCE = {"none": None, "cfg": 7.5, "cfg_extra": 4.0}
CLIPS = ("none", "range", "threshold")
SHAPES = [(2, 3, 17, 23), (1, 1023), (3, 1), (1, 4, 8, 8)]


def crafted_table(rows: int = 5, seed: int = 0) -> torch.Tensor:
    """A step table whose rows use every column: random coefficients, pre-noise, both outputs,
    4 history reads from slots that differ per row, writes to the two slots a row does not read."""
    g = torch.Generator().manual_seed(seed)

    def rand(lo, hi):
        return torch.rand(rows, generator=g, dtype=torch.float64) * (hi - lo) + lo

    perms = [torch.randperm(SLOTS, generator=g) for _ in range(rows)]
    slot = {name: torch.tensor([float(p[k]) for p in perms]) for k, name in
            enumerate(["read_slot1", "read_slot2", "read_slot3", "read_slot4", "hist_slot", "out2_slot"])}
    columns = {name: rand(-1.0, 1.0) for name in ("x0_x", "x0_m", "out_x", "out_m", "out_x0", "out2_x", "out2_m",
                                                  "out2_x0", "hist_x", "hist_m", "hist_x0", "out_h1", "out_h2",
                                                  "out_h3", "out_h4", "out2_h1", "out2_h2", "out2_h3", "out2_h4")}
    columns.update(x0_scale=rand(0.5, 2.0), pre_noise=rand(0.0, 0.5), noise_std=rand(0.1, 1.0),
                   var_bias=rand(-1.0, 0.0), var_slope=rand(0.1, 0.5),
                   noise_counter=torch.tensor([3.0, 999.0, 2.0**24 - 1, 0.0, 17.0])[:rows].double(), **slot)
    return T.step_table(rows, **columns)


def make_case(shape=(2, 3, 5, 7), dtype=torch.float32, *, guidance="none", variance=T.VAR_FIXED, noise="given",
              clip="none", reads=4, write_history=True, write_out2=True, advance=True, write_x0=True,
              model_channels=None, row=1, table=None, seed=0, sample_offset=3):
    """The arguments of one backend step call (fastdiff.ops signature) as a dict of inputs."""
    g = torch.Generator().manual_seed(seed)
    batch = shape[0]
    cfg = GUIDANCE[guidance]
    if model_channels is None:
        model_channels = 2 if variance != T.VAR_FIXED else 1
    mshape = (batch * (2 if cfg is not None else 1), *((shape[1] * model_channels,) if len(shape) > 1 else ()),
              *shape[2:])
    eshape = (batch, *((shape[1] + 1,) if len(shape) > 1 else ()), *shape[2:])  # extra: more channels than used
    rnd = lambda s: torch.randn(s, generator=g).to(dtype)  # noqa: E731
    return dict(
        model_output=rnd(mshape), sample=rnd(shape), table=crafted_table() if table is None else table,
        index=torch.tensor([row]), history=rnd((SLOTS, *shape)),
        noise=rnd(shape) if noise == "given" else None, seed=1234 + seed if noise == "philox" else None,
        sample_offset=sample_offset, guidance_scale=cfg,
        guidance_extra=rnd(eshape) if guidance == "cfg_extra" else None, extra_scale=0.75 if guidance == "cfg_extra" else 0.0,
        variance=variance, clip_range=1.0 if clip == "range" else None,
        threshold=(torch.rand(batch, generator=g) * 1.5 + 0.5) if clip == "threshold" else None,
        history_reads=reads, write_history=write_history, write_out2=write_out2, advance=advance, write_x0=write_x0)


def call(backend, case, out=None):
    """Runs backend.step on copies of the mutable arguments; returns (out, x0 or None, history, index)."""
    c = dict(case)
    index, history = c["index"].clone(), c["history"].clone()
    out = torch.empty_like(c["sample"]) if out is None else out
    x0 = torch.empty_like(c["sample"]) if c["write_x0"] else None
    backend.step(c["model_output"], c["sample"], c["table"], index, history, out, x0, c["noise"], c["seed"],
                 c["sample_offset"], c["guidance_scale"], c["guidance_extra"], c["extra_scale"], c["variance"],
                 c["clip_range"], c["threshold"], c["history_reads"], c["write_history"], c["write_out2"],
                 c["advance"])
    return out, x0, history, index


def upcast(case):
    return {k: (v.float() if isinstance(v, torch.Tensor) and v.dtype in LOW else v) for k, v in case.items()}


def assert_matches(got, case, philox=False, exact=False):
    """got (the C++ op's outputs) vs the reference backend on the same case, DESIGN tolerances."""
    dtype = case["sample"].dtype
    want = call(E, case)
    assert torch.equal(got[3], want[3])  # the step index (advance)
    if dtype in LOW:
        want32 = call(E, upcast(case))
        for o, r32, rlo in zip(got[:3], want32[:3], want[:3]):
            if o is None:
                continue
            assert o.dtype == dtype and o.shape == r32.shape
            err, ref_err = (o.float() - r32).abs().max(), (rlo.float() - r32).abs().max()
            assert err <= 2 * ref_err + 1e-3, f"{dtype}: error {err} vs the reference's own {ref_err}"
        return
    for o, r in zip(got[:3], want[:3]):
        assert (o is None) == (r is None)
        if o is None:
            continue
        assert o.dtype == r.dtype and o.shape == r.shape and o.stride() == r.stride()
        if exact:
            assert torch.equal(o.nan_to_num(7.0), r.nan_to_num(7.0)), (o - r).abs().max()
        elif dtype == torch.float64 and not philox:
            torch.testing.assert_close(o, r, atol=1e-12, rtol=1e-10, equal_nan=True)
        else:
            torch.testing.assert_close(o, r, atol=1e-6, rtol=1e-5, equal_nan=True)


@pytest.fixture(params=[None, 3], ids=["default_threads", "3_threads"])
def threads(request):
    """Runs a test with torch's thread count and with 3 threads: 3 parallel ranges over an even batch
    start inside samples, at elements that are not multiples of 4."""
    before = torch.get_num_threads()
    if request.param is not None:
        torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


# --- the generic step: every flag -----------------------------------------------------------------


@pytest.mark.parametrize("clip", CLIPS)
@pytest.mark.parametrize("noise", ["none", "given", "philox"])
@pytest.mark.parametrize("variance", [T.VAR_FIXED, T.VAR_SQRT, T.VAR_EXP], ids=["fixed", "sqrt", "exp"])
@pytest.mark.parametrize("guidance", list(GUIDANCE))
def test_step_every_flag(guidance, variance, noise, clip):
    """Guidance (none / CFG / CFG + extra term) x variance mode x noise source x clipping, each with
    0-4 history reads, with and without the out2 / hist writes, x0 written, index advanced."""
    for reads in range(5):
        for writes in (False, True):
            case = make_case(guidance=guidance, variance=variance, noise=noise, clip=clip, reads=reads,
                             write_history=writes, write_out2=writes, row=reads % 4, seed=reads)
            assert_matches(call(C, case), case, philox=noise == "philox")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("guidance", list(GUIDANCE))
def test_step_equals_reference_bit_for_bit(dtype, guidance):
    """No math function involved (given noise, fixed variance): with -ffp-contract=off the CPU op
    computes the reference's operations in its order, so outputs are identical. (Not the sqrt mode:
    torch's CPU float32 sqrt is not correctly rounded, ours is; nor exp, nor Philox's log/sin/cos.)"""
    for clip in CLIPS:
        for reads in (0, 2, 4):
            for noise in ("given", "none"):
                case = make_case(dtype=dtype, guidance=guidance, noise=noise, clip=clip, reads=reads, row=reads)
                assert_matches(call(C, case), case, exact=True)


def test_fixed_variance_ignores_variance_channels():
    """A model output with 2C channels in the fixed mode: the variance channels are not read."""
    case = make_case(model_channels=2, noise="philox", guidance="cfg")
    assert_matches(call(C, case), case, philox=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("noise", ["given", "philox"])
def test_step_dtypes_and_shapes(dtype, shape, noise):
    """Storage fp32/fp64/fp16/bf16 (math fp32, fp64 for fp64), per-sample sizes with partial Philox
    quads and scalar tails (1023, 1, 17 x 23 x 3), with CFG + extra, learned variance and history."""
    for variance, reads in ((T.VAR_SQRT, 4), (T.VAR_EXP, 1), (T.VAR_FIXED, 0)):
        case = make_case(shape, dtype, guidance="cfg_extra", variance=variance, noise=noise, clip="threshold",
                         reads=reads, row=2)
        assert_matches(call(C, case), case, philox=noise == "philox")


def test_write_x0_false_and_no_advance():
    case = make_case(write_x0=False, advance=False, noise="philox")
    got = call(C, case)
    assert got[1] is None and int(got[3]) == 1
    assert_matches(got, case, philox=True)
    with_x0 = call(C, {**case, "write_x0": True})
    assert torch.equal(with_x0[0], got[0]) and torch.equal(with_x0[2], got[2])


def test_history_writes_touch_only_the_named_slots():
    case = make_case(reads=4, row=0)
    _, _, history, _ = call(C, case)
    row = case["table"][0]
    written = {int(row[T.HIST_SLOT]), int(row[T.OUT2_SLOT])}
    for s in range(SLOTS):
        assert torch.equal(history[s], case["history"][s]) == (s not in written)
    assert_matches(call(C, case), case)


@pytest.mark.parametrize("index", [-1, 5, 6, 2**40], ids=["negative", "sentinel", "past_end", "huge"])
def test_index_outside_the_table_reads_the_nan_sentinel(index):
    """Every output of a step on the sentinel row is NaN; its history slots (NaN) clamp to slot 0."""
    case = make_case(row=index, noise="philox", reads=4)
    got = call(C, case)
    assert got[0].isnan().all() and got[1].isnan().all()
    assert got[2][0].isnan().all() and not got[2][1:].isnan().any()  # both writes went to slot 0
    assert int(got[3]) == index + 1
    assert_matches(got, case, philox=True)


def test_in_place_step_out_is_sample():
    """out=sample: each element is read before it is written (contiguous) or written through a work
    buffer (channels_last): the same outputs as an out-of-place step."""
    for layout in ("contiguous", "channels_last"):
        case = make_case((2, 3, 5, 7), guidance="cfg", noise="philox", reads=2)
        if layout == "channels_last":
            case = {k: (v.contiguous(memory_format=torch.channels_last) if k in ("sample", "model_output") else v)
                    for k, v in case.items()}
        want = call(C, case)
        sample = case["sample"].clone(memory_format=torch.preserve_format)
        got = call(C, {**case, "sample": sample}, out=sample)
        assert got[0] is sample
        for o, r in zip(got[:3], want[:3]):
            assert torch.equal(o, r)
        assert_matches(want, case, philox=True)


@pytest.mark.parametrize("layout", ["channels_last", "strided", "strided_outputs", "mixed_dtype"])
def test_step_layouts(layout):
    """Non-contiguous inputs are read through contiguous copies; non-contiguous outputs (out, x0,
    history) are written through contiguous work buffers and copied back, keeping their strides."""
    case = make_case((2, 4, 6, 5), guidance="cfg_extra", variance=T.VAR_SQRT, noise="given", clip="range", reads=3)
    inputs = ("model_output", "sample", "noise", "guidance_extra")
    if layout == "channels_last":
        case.update({k: case[k].contiguous(memory_format=torch.channels_last) for k in inputs})
    elif layout == "strided":
        case.update({k: torch.cat([case[k], case[k]], dim=-1)[..., ::2] for k in inputs})
        assert not case["sample"].is_contiguous()
    elif layout == "mixed_dtype":
        case["model_output"] = case["model_output"].half()  # fp16 model output, fp32 sample: fp32 math
        case["guidance_extra"] = case["guidance_extra"].bfloat16()
    got = call(C, case)
    if layout == "strided_outputs":
        out = torch.empty(2, 4, 6, 10)[..., ::2]
        x0 = torch.empty(2, 4, 6, 5).contiguous(memory_format=torch.channels_last)
        history = torch.stack([case["history"], case["history"]], dim=-1)[..., 0]  # stride 2 in the last dim
        index = case["index"].clone()
        C.step(case["model_output"], case["sample"], case["table"], index, history, out, x0, case["noise"], None,
               3, case["guidance_scale"], case["guidance_extra"], case["extra_scale"], case["variance"],
               case["clip_range"], None, case["history_reads"], True, True, True)
        assert out.stride() == (240, 60, 10, 2) and x0.is_contiguous(memory_format=torch.channels_last)
        got = (out, x0, history, index)
    want = call(E, case)
    for o, r in zip(got[:3], want[:3]):
        torch.testing.assert_close(o, r, atol=1e-6, rtol=1e-5)


# --- samplers' own rows ----------------------------------------------------------------------------


@pytest.mark.parametrize("variance_type", DDPM_VARIANCE_TYPES)
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_ddpm_rows(variance_type, prediction_type):
    """Real DDPM rows (one per timestep, noise std 0 at t = 0) with clipping and thresholding."""
    sampler = fastdiff.DDPMSampler(variance_type=variance_type, prediction_type=prediction_type)
    sampler.set_timesteps(50)
    table = sampler._table(torch.device("cpu"))
    variance = sampler.variance_mode
    for t, clip in ((980, "range"), (500, "threshold"), (20, "none"), (0, "range")):
        case = make_case((2, 3, 9, 9), table=table, row=t, variance=variance, noise="philox", clip=clip, reads=0,
                         write_history=False, write_out2=False, advance=False, guidance="cfg")
        assert_matches(call(C, case), case, philox=True)


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("use_clipped", [False, True])
def test_ddim_rows(eta, use_clipped):
    sampler = fastdiff.DDIMSampler(prediction_type="v_prediction")
    sampler.set_timesteps(20)
    table = sampler._table(torch.device("cpu"), eta=eta, use_clipped_model_output=use_clipped)
    for t in (951, 501, 1):
        case = make_case((2, 3, 9, 9), table=table, row=t, noise="philox", clip="range", reads=0,
                         write_history=False, write_out2=False, advance=False)
        assert_matches(call(C, case), case, philox=True)


# --- seeded noise -------------------------------------------------------------------------------


def _ddpm_like(shape, dtype=torch.float32):
    """A DDPM-like case without history (the common fast path) and its row's noise std."""
    table = T.step_table(3, x0_x=1.0, x0_m=-0.5, x0_scale=1.2, out_x=0.9, out_x0=0.1, noise_std=0.3,
                         noise_counter=[500.0, 2.0, 7.0])
    return make_case(shape, dtype, table=table, row=0, noise="philox", reads=0, write_history=False,
                     write_out2=False, write_x0=False), 0.3


def test_in_kernel_noise_is_the_philox_stream():
    """out - (the same step without noise) = std * noise.randn(shape, seed, counter=row[NOISE_COUNTER],
    sample_offset): the counter comes from the row, the global sample index from sample_offset."""
    case, std = _ddpm_like((2, 3, 17, 23), torch.float64)
    case["seed"], case["sample_offset"] = 2**40 + 5, 7
    prev = call(C, case)[0]
    mean = call(C, {**case, "seed": None})[0]
    expected = N.randn(case["sample"].shape, 2**40 + 5, counter=500, sample_offset=7).double() * std
    torch.testing.assert_close(prev - mean, expected, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("shape", [(64, 4, 8, 8), (64, 3, 17, 23)])
def test_noise_of_a_sample_is_the_same_in_a_batch_of_1_and_64(shape, threads):
    case, _ = _ddpm_like(shape)
    full = call(C, case)[0]
    for i in (0, 17, 21, 63):
        part = {**case, "model_output": case["model_output"][i:i + 1], "sample": case["sample"][i:i + 1],
                "sample_offset": case["sample_offset"] + i}
        assert torch.equal(call(C, part)[0][0], full[i])
    other = call(C, {**case, "seed": case["seed"] + 1})[0]
    assert not torch.equal(other, full)  # the seed matters


@pytest.mark.parametrize("per_sample", [5, 4 * 33333 + 2, 2 * 32768 + 7])
def test_one_and_two_threads_give_identical_outputs(per_sample):
    """Parallel ranges start inside samples and inside Philox quads; vector bodies and scalar
    remainders round alike (-ffp-contract=off): bitwise the same outputs for any thread count."""
    case = make_case((3, per_sample), guidance="cfg_extra", variance=T.VAR_SQRT, noise="philox", clip="threshold",
                     reads=4)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = call(C, case)
        torch.set_num_threads(2)
        two = call(C, case)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


@pytest.mark.parametrize("per_sample", [1, 3, 5, 4 * 33333 + 2, 2 * 32768 + 7])
def test_in_kernel_noise_with_partial_quads_and_unaligned_parallel_ranges(per_sample, threads):
    """Per-sample sizes not divisible by 4 put the parallel split (32768-element grains over the flat
    batch) and the chunk starts at elements that are not multiples of 4: every op still draws noise.randn."""
    batch = 5
    shape = (batch, per_sample)
    case, std = _ddpm_like(shape, torch.float64)
    case["seed"], case["sample_offset"] = 11, 2
    prev, mean = call(C, case)[0], call(C, {**case, "seed": None})[0]
    expected = N.randn(shape, 11, counter=500, sample_offset=2).double()
    torch.testing.assert_close((prev - mean) / std, expected, atol=1e-6, rtol=0)
    x0 = torch.zeros(shape)
    noise = torch.empty(shape)
    C.q_sample(x0, T.q_sample_table([0.0], [1.0], [0.0], [1.0]), torch.zeros(batch, dtype=torch.int64), None, 11, 2,
               torch.empty(shape), None, noise)
    torch.testing.assert_close(noise, N.randn(shape, 11, stream=N.STREAM_Q_SAMPLE, sample_offset=2), atol=1e-6, rtol=0)
    normal, _ = C.philox_randn(torch.empty(shape), 11, 500, 0, 2)
    torch.testing.assert_close(normal, expected.float(), atol=1e-6, rtol=0)


def test_noise_counter_from_the_row():
    """Rows with counters 0, 2**24 - 1, a fractional and a negative value: the counter is int(v) mod 2**32."""
    table = T.step_table(4, out_x=1.0, noise_std=1.0, noise_counter=[0.0, 2.0**24 - 1, 7.9, -1.0])
    for row, counter in ((0, 0), (1, 2**24 - 1), (2, 7), (3, 2**32 - 1)):
        case = make_case((2, 37), table=table, row=row, noise="philox", reads=0, write_history=False,
                         write_out2=False)
        delta = call(C, case)[0] - case["sample"]
        torch.testing.assert_close(delta, N.randn((2, 37), case["seed"], counter=counter, sample_offset=3),
                                   atol=1e-6, rtol=1e-6)


def test_zero_noise_rows_draw_nothing_but_keep_given_noise():
    """A fixed-variance row with std 0 and no pre-noise skips the Philox draw (out equals the
    noise-free step); given noise is always used (NaN noise gives NaN, as the reference)."""
    table = T.step_table(2, out_x=0.5, out_m=0.25, out_x0=0.25, noise_std=0.0)
    case = make_case(table=table, row=0, noise="philox", reads=0, write_history=False, write_out2=False)
    assert torch.equal(call(C, case)[0], call(C, {**case, "seed": None})[0])
    nan_noise = {**case, "seed": None, "noise": torch.full_like(case["sample"], math.nan)}
    assert call(C, nan_noise)[0].isnan().all() and call(E, nan_noise)[0].isnan().all()


# --- q_sample and cfg_combine --------------------------------------------------------------------


def _q_case(shape, dtype, given, seed=0):
    g = torch.Generator().manual_seed(seed)
    abar = torch.linspace(0.999, 0.01, 10, dtype=torch.float64)
    table = T.q_sample_table(abar.sqrt(), (1 - abar).sqrt(), -(1 - abar).sqrt(), abar.sqrt())
    index = torch.randint(0, 10, (shape[0],), generator=g)
    index[0] = -1 if shape[0] > 1 else index[0]  # outside the table: the NaN sentinel row
    x0 = torch.randn(shape, generator=g).to(dtype)
    noise = torch.randn(shape, generator=g).to(dtype) if given else None
    return x0, table, index, noise


def _q_call(backend, x0, table, index, noise, write_target=True, write_noise=True, x_t=None):
    x_t = torch.empty_like(x0) if x_t is None else x_t
    target = torch.empty_like(x0) if write_target else None
    noise_out = torch.empty_like(x0) if write_noise else None
    backend.q_sample(x0, table, index, noise, 2**33 + 1, 4, x_t, target, noise_out)
    return x_t, target, noise_out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("given_noise", [True, False])
def test_q_sample(dtype, shape, given_noise):
    x0, table, index, noise = _q_case(shape, dtype, given_noise)
    got = _q_call(C, x0, table, index, noise)
    want = _q_call(E, x0, table, index, noise)
    if dtype in LOW:
        up = _q_call(E, x0.float(), table, index, noise.float() if noise is not None else None)
        for o, r32, rlo in zip(got, up, want):
            assert o.dtype == dtype
            err, ref_err = (o.float() - r32).abs().nan_to_num(0), (rlo.float() - r32).abs().nan_to_num(0)
            assert err.max() <= 2 * ref_err.max() + 1e-3
            assert torch.equal(o.isnan(), rlo.isnan())
    else:
        tol = dict(atol=1e-12, rtol=1e-10) if dtype == torch.float64 and given_noise else dict(atol=1e-6, rtol=1e-5)
        for o, r in zip(got, want):
            torch.testing.assert_close(o, r, equal_nan=True, **tol)
    x_t, target, noise_out = _q_call(C, x0, table, index, noise, False, False)
    assert target is None and noise_out is None and torch.equal(x_t.nan_to_num(), got[0].nan_to_num())
    if shape[0] > 1:
        assert got[0][0].isnan().all() and not got[0][1:].isnan().any()


def test_q_sample_in_place_and_strided_outputs():
    x0, table, index, noise = _q_case((3, 4, 5, 6), torch.float32, True)
    want = _q_call(E, x0, table, index, noise)
    inplace = x0.clone()
    got = _q_call(C, inplace, table, index, noise, x_t=inplace)
    for o, r in zip(got, want):
        torch.testing.assert_close(o, r, atol=1e-6, rtol=1e-5, equal_nan=True)
    strided = torch.empty(3, 4, 5, 12)[..., ::2]
    _q_call(C, x0, table, index, None, x_t=strided)
    torch.testing.assert_close(strided, _q_call(E, x0, table, index, None)[0], atol=1e-6, rtol=1e-5,
                               equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cfg_combine(dtype, shape):
    g = torch.Generator().manual_seed(0)
    uncond, cond = torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype)
    torch.testing.assert_close(C.cfg_combine(uncond, cond, 7.5), E.cfg_combine(uncond, cond, 7.5), atol=1e-6,
                               rtol=1e-5)


def test_cfg_combine_channels_last_keeps_layout():
    g = torch.Generator().manual_seed(0)
    uncond = torch.randn(2, 3, 17, 23, generator=g)
    cond = torch.randn(2, 3, 17, 23, generator=g).contiguous(memory_format=torch.channels_last)
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
    """1M normals (tails included) within a few float32 ulp of the oracle: the log/sin/cos polynomials hold up."""
    normal, _ = C.philox_randn(torch.empty(4, 2**18), 7, 999, 0, 0)
    want, _ = O.randn((4, 2**18), 7, 999, 0, 0)
    np.testing.assert_allclose(normal.numpy(), want, atol=1e-6, rtol=0)
    ulp = np.spacing(np.abs(want).astype(np.float32))
    assert (np.abs(normal.numpy() - want) <= 4 * ulp + 1e-7).all()
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


# --- contract: constants, errors, opcheck, default backend ---------------------------------------


def test_header_constants_equal_tables():
    text = (ROOT / "csrc" / "step_coefs.h").read_text()
    defines = {name: int(value) for name, value in re.findall(r"#define FD_(\w+) (\d+)", text)}
    expected = {name: T.COLUMNS[name.lower()] for name in (
        "NOISE_COUNTER", "X0_X", "X0_M", "X0_SCALE", "PRE_NOISE", "OUT_X", "OUT_M", "OUT_X0", "NOISE_STD", "OUT2_X",
        "OUT2_M", "OUT2_X0", "HIST_X", "HIST_M", "HIST_X0", "HIST_SLOT", "OUT2_SLOT", "VAR_BIAS", "VAR_SLOPE",
        "INPUT_DIVISOR")}
    for k in range(T.MAX_HISTORY_READS):
        expected.update({f"OUT_H{k + 1}": T.OUT_H[k], f"OUT2_H{k + 1}": T.OUT2_H[k],
                         f"READ_SLOT{k + 1}": T.READ_SLOT[k]})
    expected.update({"WIDTH": T.WIDTH, "MAX_HISTORY_READS": T.MAX_HISTORY_READS, "Q_A": T.Q_A, "Q_B": T.Q_B,
                     "Q_P": T.Q_P, "Q_Q": T.Q_Q, "Q_WIDTH": T.Q_WIDTH, "VAR_FIXED": T.VAR_FIXED,
                     "VAR_SQRT": T.VAR_SQRT, "VAR_EXP": T.VAR_EXP, "STREAM_STEP": N.STREAM_STEP,
                     "STREAM_Q_SAMPLE": N.STREAM_Q_SAMPLE})
    assert {k: defines.get(k) for k in expected} == expected
    assert len(T.COLUMNS) == T.WIDTH  # every column of the row is named in the header


def test_errors_name_the_argument():
    case = make_case(variance=T.VAR_FIXED, model_channels=1)
    bad = [({"variance": T.VAR_SQRT}, r"model_output must have shape \[2, 3, 5, 7\] with 2x the sample's channels"),
           ({"history_reads": 5}, r"history_reads must be in \[0, 4\], got 5"),
           ({"variance": 3}, r"variance must be 0 \(fixed\), 1 \(sqrt\) or 2 \(exp\), got 3"),
           ({"threshold": torch.ones(3)}, r"threshold must hold one float per sample \(2\)"),
           ({"noise": case["noise"][:1]}, r"noise must have the sample's shape \[2, 3, 5, 7\]"),
           ({"table": case["table"][:, :8]}, r"table must be float32 of shape \[rows >= 1, 32\]"),
           ({"table": case["table"].double()}, r"table must be float32"),
           ({"index": torch.tensor([1, 2])}, r"index must be an int64 tensor of one element"),
           ({"index": torch.tensor([1], dtype=torch.int32)}, r"index must be an int64 tensor"),
           ({"history": case["history"][:, :1]}, r"history must be \[slots >= 1, \*sample.shape\]"),
           ({"history": torch.empty(0)}, r"history must be \[slots >= 1"),
           ({"clip_range": -1.0}, r"clip_range must be >= 0, got -1"),
           ({"sample_offset": -1}, r"sample_offset must be >= 0, got -1")]
    for change, message in bad:
        with pytest.raises(RuntimeError, match=message):
            call(C, {**case, **change})
    cfg = make_case(guidance="cfg_extra")
    with pytest.raises(RuntimeError, match=r"guidance_extra must have the sample's shape \[2, 3, 5, 7\] \(at least"):
        call(C, {**cfg, "guidance_extra": cfg["guidance_extra"][:, :2]})
    with pytest.raises(RuntimeError, match=r"out must have the sample's shape \[2, 3, 5, 7\] and dtype Float"):
        call(C, case, out=torch.empty(2, 3, 5, 7, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*63\)"):
        call(C, {**case, "noise": None, "seed": -5})
    x0, table, index, noise = _q_case((2, 3), torch.float32, True)
    with pytest.raises(RuntimeError, match=r"index must hold one integer row index per sample \(2\)"):
        C.q_sample(x0, table, index[:1], noise, 0, 0, torch.empty_like(x0), None, None)
    with pytest.raises(RuntimeError, match=r"table must be float32 of shape \[rows >= 1, 4\]"):
        C.q_sample(x0, table[:, :2], index, noise, 0, 0, torch.empty_like(x0), None, None)


def test_history_may_be_empty_when_unused():
    case = make_case(reads=0, write_history=False, write_out2=False)
    case["history"] = torch.empty(0)  # what samplers without history pass
    assert_matches(call(C, case), case)


def _seed(case):
    """The raw op's Philox key: an int64 [1] tensor on the sample's device (None when the noise is given)."""
    seed = case["seed"]
    return None if seed is None or case["noise"] is not None else N.seed_tensor(seed, case["sample"].device)


def _step_args(case, out, x0):
    return (case["model_output"], case["sample"], case["table"], case["index"].clone(), case["history"].clone(), out,
            x0, case["noise"], _seed(case), case["sample_offset"], case["guidance_scale"], case["guidance_extra"],
            case["extra_scale"], case["variance"], case["clip_range"], case["threshold"], case["history_reads"],
            case["write_history"], case["write_out2"], case["advance"])


def _op_cases():
    plain = make_case(noise="given", reads=0, write_history=False, write_out2=False)
    full = make_case(guidance="cfg_extra", variance=T.VAR_EXP, noise="philox", clip="threshold", reads=4)
    x0, table, index, noise = _q_case((2, 3, 5), torch.float32, False)
    return [
        ("step", _step_args(plain, torch.empty_like(plain["sample"]), None)),
        ("step", _step_args(full, torch.empty_like(full["sample"]), torch.empty_like(full["sample"]))),
        ("q_sample", (x0, table, index, noise, 3, 1, torch.empty_like(x0), torch.empty_like(x0), torch.empty_like(x0))),
        ("q_sample", (x0, table, index, torch.randn_like(x0), 0, 0, torch.empty_like(x0), None, None)),
        ("cfg_combine", (plain["sample"], plain["noise"], 4.0)),
        ("philox_randn", (torch.empty(2, 9), 1, 2, 0, 0)),
    ]


@pytest.mark.parametrize("case", range(6))
def test_opcheck_fastdiff_C_ops(case):
    name, args = _op_cases()[case]
    torch.library.opcheck(getattr(torch.ops.fastdiff_C, name).default, args)


def _fastdiff_op_cases():
    full = make_case(guidance="cfg", variance=T.VAR_SQRT, noise="philox", clip="range", reads=2)
    x0, table, index, _ = _q_case((2, 3, 5), torch.float32, False)
    index = index.clamp(min=0)  # no NaN row: opcheck compares outputs with ==
    return [
        ("step", (full["model_output"], full["sample"], full["table"], full["index"], full["history"], None,
                  _seed(full), 3, full["guidance_scale"], None, 0.0, full["variance"], full["clip_range"], None, 2,
                  True, True, True)),
        ("q_sample", (x0, table, index, None, 5, 0, True, True)),
        ("cfg_combine", (full["sample"], full["sample"] * 2, 4.0)),
    ]


@pytest.mark.parametrize("case", range(3))
def test_opcheck_fastdiff_ops_on_cpp_backend(case, monkeypatch):
    """The registered fastdiff ops on the cpp backend: opcheck, and the same values as the reference."""
    name, args = _fastdiff_op_cases()[case]
    monkeypatch.setenv("FASTDIFF_BACKEND", "cpp")
    assert B.select(name, args[1]).__name__ == "fastdiff._cpp"
    clone = lambda a: tuple(x.clone() if isinstance(x, torch.Tensor) else x for x in a)  # noqa: E731
    torch.library.opcheck(getattr(torch.ops.fastdiff, name).default, clone(args))
    out = getattr(torch.ops.fastdiff, name)(*clone(args))
    monkeypatch.setenv("FASTDIFF_BACKEND", "reference")
    ref = getattr(torch.ops.fastdiff, name)(*clone(args))
    for o, r in zip(out if isinstance(out, tuple) else (out,), ref if isinstance(ref, tuple) else (ref,)):
        torch.testing.assert_close(o, r, atol=1e-6, rtol=1e-5)


def test_extension_is_built_and_is_the_default_cpu_backend(monkeypatch):
    """Fails (never skips) under FASTDIFF_REQUIRE_CPP=1 when the extension is missing."""
    monkeypatch.delenv("FASTDIFF_BACKEND", raising=False)
    assert REASON is None, REASON
    assert B.select("step", torch.zeros(2, 3)).__name__ == "fastdiff._cpp"
    assert hasattr(torch.ops.fastdiff_C, "step") and hasattr(torch.ops.fastdiff_C, "q_sample")
    assert not hasattr(torch.ops.fastdiff_C, "ddpm_step")
