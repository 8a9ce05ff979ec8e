"""Property tests: for random shapes, options and timesteps, the default backend (the C++ kernels
when built) equals the eager reference within the DESIGN fp32 tolerance, and seeded noise depends
only on (seed, timestep, global sample index, element index)."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastdiff import backends, ops, schedules, tables

ABAR = schedules.alphas_cumprod_from_betas(schedules.make_betas(1000))
shapes = st.lists(st.integers(1, 9), min_size=1, max_size=3).flatmap(
    lambda rest: st.integers(1, 4).map(lambda batch: (batch, *rest)))
clips = st.sampled_from([None, 0.5, 1.0])
FP32 = dict(atol=1e-6, rtol=1e-5)


def tensors(shape, seed, channels_factor=1):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(shape, generator=g)
    model_output = torch.randn((shape[0] * channels_factor, *shape[1:]), generator=g)
    return model_output, sample


def both_backends(op, *args):
    with backends.forced("reference"):
        want = op(*args)
    return op(*args), want


@settings(max_examples=60, deadline=None)
@given(shape=shapes, t=st.integers(0, 999), prediction=st.sampled_from(tables.PREDICTION_TYPES),
       variance=st.sampled_from(["fixed_small", "fixed_large", "fixed_small_log"]), clip=clips,
       cfg=st.sampled_from([None, 3.5]), seed=st.integers(0, 2**40), offset=st.integers(0, 2**33))
def test_ddpm_step_matches_reference(shape, t, prediction, variance, clip, cfg, seed, offset):
    model_output, sample = tensors(shape, t, 2 if cfg is not None else 1)
    row = tables.ddpm_table(ABAR, [t, max(t - 7, 0)] if t > 0 else [0], variance)[t]
    got, want = both_backends(ops.ddpm_step, model_output, sample, row, None, seed, offset, prediction, variance,
                              clip, None, cfg, True)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **FP32)


@settings(max_examples=60, deadline=None)
@given(shape=shapes, t=st.integers(0, 999), ratio=st.sampled_from([1, 10, 50]),
       prediction=st.sampled_from(tables.PREDICTION_TYPES), eta=st.sampled_from([0.0, 0.3, 1.0]),
       clipped=st.booleans(), clip=clips, seed=st.integers(0, 2**40))
def test_ddim_step_matches_reference(shape, t, ratio, prediction, eta, clipped, clip, seed):
    model_output, sample = tensors(shape, t)
    row = tables.ddim_table(ABAR, ratio, 1.0)[t]
    got, want = both_backends(ops.ddim_step, model_output, sample, row, None, seed, 0, prediction, eta, clipped,
                              clip, None, None, True)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **FP32)


@settings(max_examples=40, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**62), t=st.integers(1, 999), split=st.integers(0, 4))
def test_seeded_step_noise_is_independent_of_the_batch_split(shape, seed, t, split):
    model_output, sample = tensors(shape, t)
    split = min(split, shape[0])
    row = tables.ddpm_table(ABAR, [t, 0], "fixed_large")[t]

    def step(lo, hi):
        return ops.ddpm_step(model_output[lo:hi], sample[lo:hi], row, None, seed, lo, "epsilon", "fixed_large",
                             None, None, None, False)[0]

    whole = step(0, shape[0])
    assert torch.equal(torch.cat([step(0, split), step(split, shape[0])]), whole)
