"""`step` never synchronises with the device: it traces whole under torch.compile(fullgraph=True)
(a .item(), nonzero or Python branch on a tensor value would break the graph) and 50 steps run
without recompiling."""
import pytest
import torch

import fastdiff


@pytest.fixture
def no_recompiles():
    """Any recompilation raises; afterwards exactly one frame was compiled."""
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):
        yield
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    torch._dynamo.reset()


def compiled_loop(sampler, steps, step_kwargs):
    """A compiled and an eager loop side by side. Tables for step options other than the defaults (DDIM's
    eta) are built at their first use; one eager step first builds them, as set_timesteps does for the
    defaults, so the compiled step finds them and never recompiles."""
    sampler.set_timesteps(steps)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    sampler.step(torch.tanh(x), sampler.timesteps[0], x, **step_kwargs)
    step = torch.compile(sampler.step, fullgraph=True, backend="aot_eager")
    eager = x.clone()
    for t in sampler.timesteps:  # 0-d int64 tensors: the device-gather path under compile
        eps = torch.tanh(x)
        x = step(eps, t, x, return_dict=False, **step_kwargs)[0]
        eager = sampler.step(torch.tanh(eager), t, eager, return_dict=False, **step_kwargs)[0]
    return x, eager


@pytest.mark.parametrize("sampler,kwargs", [
    (fastdiff.DDPMSampler(), dict(seed=7)),
    (fastdiff.DDIMSampler(), dict(eta=0.5, seed=7)),
    (fastdiff.DDIMSampler(prediction_type="v_prediction"), dict(guidance_scale=None)),
])
def test_fullgraph_50_steps_without_recompile(no_recompiles, sampler, kwargs):
    compiled, eager = compiled_loop(sampler, 50, kwargs)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)


def test_guided_step_compiles(no_recompiles):
    sampler = fastdiff.DDPMSampler()
    sampler.set_timesteps(10)
    step = torch.compile(sampler.step, fullgraph=True, backend="aot_eager")
    x = torch.randn(1, 3, 4, 4)
    for t in sampler.timesteps:
        x = step(torch.cat([torch.tanh(x), x]), t, x, return_dict=False, seed=1, guidance_scale=4.0)[0]
    assert torch.isfinite(x).all()
