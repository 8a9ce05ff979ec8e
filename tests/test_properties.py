"""Property tests: for random shapes, rows, flags and history, the default backend (the C++ kernels
when built) equals the eager reference within the DESIGN fp32 tolerance, and seeded noise depends
only on (seed, row counter, global sample index, element index)."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastdiff import backends, ops, tables

shapes = st.lists(st.integers(1, 9), min_size=1, max_size=3).flatmap(
    lambda rest: st.integers(1, 4).map(lambda batch: (batch, *rest)))
FP32 = dict(atol=1e-6, rtol=1e-5)
COEFFICIENTS = ["x0_x", "x0_m", "x0_scale", "out_x", "out_m", "out_x0", "noise_std", "pre_noise", "out2_x",
                "out2_m", "out2_x0", "hist_x", "hist_m", "hist_x0", "out_h1", "out_h2", "out_h3", "out_h4",
                "out2_h1", "out2_h2", "out2_h3", "out2_h4", "var_bias", "var_slope"]


def random_table(seed: int, rows: int = 3) -> torch.Tensor:
    """A table of random coefficients whose history slots follow the engine's rule (reads 0-3, writes 4 and 5)."""
    g = torch.Generator().manual_seed(seed)
    columns = {name: torch.randn(rows, generator=g, dtype=torch.float64) for name in COEFFICIENTS}
    columns["x0_scale"] = columns["x0_scale"].abs() + 0.5
    columns.update({f"read_slot{k + 1}": float(k) for k in range(4)}, hist_slot=4.0, out2_slot=5.0,
                   noise_counter=torch.randint(0, 10**6, (rows,), generator=g).double())
    return tables.step_table(rows, **columns)


def tensors(shape, seed, batch_factor=1, channel_factor=1):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(shape, generator=g)
    mo_shape = (shape[0] * batch_factor, *((shape[1] * channel_factor,) if len(shape) > 1 else ()), *shape[2:])
    return torch.randn(mo_shape, generator=g), sample, torch.randn((6, *shape), generator=g)


def run(model_output, sample, table, history, **kwargs):
    """(prev, x0, history after the step, index after the step) of one generic step."""
    history, index = history.clone(), torch.tensor([kwargs.pop("row")])
    args = dict(noise=None, seed=None, sample_offset=0, guidance_scale=None, guidance_extra=None, extra_scale=0.0,
                variance=tables.VAR_FIXED, clip_range=None, threshold=None, history_reads=0, write_history=False,
                write_out2=False, advance=True, write_x0=True) | kwargs
    prev, x0 = ops.run_step(model_output, sample, table, index, history, *args.values())
    return prev, x0, history, index


@settings(max_examples=80, deadline=None)
@given(shape=shapes, table_seed=st.integers(0, 2**30), row=st.integers(-1, 3), reads=st.integers(0, 4),
       writes=st.sampled_from([(False, False), (True, False), (True, True)]), cfg=st.sampled_from([None, 3.5]),
       clip=st.sampled_from([None, 0.5, 2.0]), noise=st.sampled_from(["none", "philox", "given"]),
       variance=st.sampled_from([tables.VAR_FIXED, tables.VAR_SQRT, tables.VAR_EXP]), seed=st.integers(0, 2**40),
       offset=st.integers(0, 2**33))
def test_generic_step_matches_reference(shape, table_seed, row, reads, writes, cfg, clip, noise, variance, seed,
                                        offset):
    learned = variance != tables.VAR_FIXED and len(shape) > 1
    variance = variance if learned else tables.VAR_FIXED
    model_output, sample, history = tensors(shape, table_seed, 2 if cfg is not None else 1, 2 if learned else 1)
    table = random_table(table_seed)
    kwargs = dict(row=row, history_reads=reads, write_history=writes[0], write_out2=writes[1], guidance_scale=cfg,
                  clip_range=clip, variance=variance, sample_offset=offset,
                  seed=seed if noise == "philox" else None,
                  noise=torch.randn(shape, generator=torch.Generator().manual_seed(1)) if noise == "given" else None)
    with backends.forced("reference"):
        want = run(model_output, sample, table, history, **kwargs)
    got = run(model_output, sample, table, history, **kwargs)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **FP32, equal_nan=True)


@settings(max_examples=40, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**62), split=st.integers(0, 4), table_seed=st.integers(0, 2**30))
def test_seeded_step_noise_is_independent_of_the_batch_split(shape, seed, split, table_seed):
    model_output, sample, history = tensors(shape, table_seed)
    split = min(split, shape[0])
    table = random_table(table_seed)

    def step(lo, hi):
        return run(model_output[lo:hi], sample[lo:hi], table, history[:, lo:hi], row=1, seed=seed, sample_offset=lo,
                   advance=False)[0]

    whole = step(0, shape[0])
    assert torch.equal(torch.cat([step(0, split), step(split, shape[0])]), whole)
