"""The step engine as samplers use it: device step counter, history buffer, in-place `out=`, config
swaps, and loops of every sampler on the meta device (a host read of a device value fails there)."""
import inspect

import pytest
import torch

import fastdiff
from fastdiff import tables as T
from fastdiff.samplers.base import BaseSampler
from fastdiff.samplers.config import register_to_config


def all_samplers():
    return [getattr(fastdiff, name) for name in sorted(dir(fastdiff))
            if name.endswith("Sampler") and isinstance(getattr(fastdiff, name), type)]


class CounterSampler(BaseSampler):
    """A minimal counter-keyed sampler with history: out = x + m - 0.5 h_1, hist = m (rows say slots)."""

    history_slots, history_reads, writes_history = 2, 1, True

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000):
        self._reset_engine()

    def set_timesteps(self, num_inference_steps, device=None):
        self.num_inference_steps = num_inference_steps
        self._timesteps_host = torch.arange(num_inference_steps - 1, -1, -1).numpy() * 10
        self.timesteps = torch.from_numpy(self._timesteps_host).to(device)
        self._new_schedule(device)

    def _build_table(self):
        n = self.num_inference_steps
        i = torch.arange(n, dtype=torch.float64)
        return T.step_table(n, out_x=1.0, out_m=1.0, out_h1=torch.where(i > 0, -0.5, 0.0), hist_m=1.0,
                            hist_slot=i % 2, read_slot1=(i + 1) % 2)

    def step(self, model_output, timestep, sample, *, seed=None, out=None, return_dict=True):
        index = self._counter_index(timestep, sample.device)
        return self._run_step(model_output, sample, self._table(sample.device), index, noise=None, seed=None,
                              sample_offset=0, guidance_scale=None, advance=True, out=out, return_dict=return_dict)


def test_counter_history_and_host_mirror():
    sampler = CounterSampler()
    sampler.set_timesteps(4)
    assert sampler.step_index is None and sampler.begin_index is None
    x, previous = torch.zeros(1, 2), None
    for i, t in enumerate(sampler.timesteps):
        m = torch.full((1, 2), float(i + 1))
        want = x + m - (0.5 * previous if previous is not None else 0)
        x = sampler.step(m, t, x).prev_sample
        torch.testing.assert_close(x, want)
        previous = m
        assert sampler.step_index == i + 1 and sampler._counter.tolist() == [i + 1]
    with pytest.raises(IndexError, match="step index 4 is past the end of the schedule"):  # as diffusers
        sampler.step(m, 0, x)
    # known on the device only (the first index found from a device timestep), the step reads the NaN row
    sampler.set_timesteps(4)
    sampler._counter_index(torch.tensor(30), x.device)
    sampler._index_pending, sampler._step_index = False, None
    sampler._counter.fill_(4)
    assert torch.isnan(sampler.step(m, 0, x).prev_sample).all()


def test_first_index_from_the_timestep_and_begin_index():
    """diffusers' _init_step_index: the first step finds its index from the timestep (a device timestep:
    on the device, no sync), unless set_begin_index was called."""
    a, b = CounterSampler(), CounterSampler()
    for s in (a, b):
        s.set_timesteps(5)
    x, m = torch.zeros(1, 2), torch.ones(1, 2)
    a.step(m, 20, x)  # timesteps are [40, 30, 20, 10, 0]: index 2
    assert a.step_index == 3
    b.set_begin_index(1)
    b.step(m, 20, x)  # begin_index wins over the timestep, as in diffusers
    assert b.step_index == 2 and b.begin_index == 1
    c = CounterSampler()
    c.set_timesteps(5)
    monkey_device_timestep = torch.tensor(10)
    c._counter_index(monkey_device_timestep.clone(), x.device)  # a CPU tensor: resolved on the host
    assert c.step_index == 3
    d = CounterSampler()
    d.set_timesteps(5)
    assert d._device_index_for_timestep(torch.tensor(10)).tolist() == [3]
    assert d._device_index_for_timestep(torch.tensor(15)).tolist() == [5]  # no match: past the end (NaN row)


def test_history_shape_change_mid_loop_is_a_named_error():
    sampler = CounterSampler()
    sampler.set_timesteps(4)
    sampler.step(torch.ones(1, 2), 30, torch.zeros(1, 2))
    with pytest.raises(ValueError, match=r"sample has shape \(2, 2\) .* history holds \(1, 2\)"):
        sampler.step(torch.ones(2, 2), 20, torch.zeros(2, 2))
    sampler.set_timesteps(4)  # a new loop may change shape
    sampler.step(torch.ones(2, 2), 30, torch.zeros(2, 2))


@pytest.mark.parametrize("cls,kwargs", [(fastdiff.DDPMSampler, {"seed": 3}), (fastdiff.DDIMSampler, {"eta": 0.5,
                                                                                                    "seed": 3})])
def test_out_steps_in_place_and_skips_x0(cls, kwargs):
    sampler = cls()
    sampler.set_timesteps(10)
    x, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    want = sampler.step(eps, sampler.timesteps[2], x, **kwargs).prev_sample
    buffer = x.clone()
    out = sampler.step(eps, sampler.timesteps[2], buffer, out=buffer, **kwargs)
    assert out.prev_sample is buffer and out.pred_original_sample is None
    assert torch.equal(buffer, want)
    with pytest.raises(ValueError, match="out must be a tensor like sample"):
        sampler.step(eps, sampler.timesteps[2], x, out=x[:1], **kwargs)


def test_a_replaced_config_takes_effect_at_the_next_step():
    """Pipelines replace `_internal_dict` (diffusers' config): tables and options follow the new config."""
    sampler = fastdiff.DDIMSampler(clip_sample=True, clip_sample_range=0.5)
    sampler.set_timesteps(10)
    x, eps = torch.randn(1, 3, 4, 4) * 3, torch.randn(1, 3, 4, 4) * 3
    clipped = sampler.step(eps, 901, x).pred_original_sample
    assert clipped.abs().max() <= 0.5
    config = dict(sampler.config, clip_sample=False, prediction_type="v_prediction")
    sampler._internal_dict = type(sampler.config)(config) if hasattr(sampler, "_internal_dict") else None
    if sampler._internal_dict is None:  # the config class before diffusers' _internal_dict semantics
        sampler._config = type(sampler.config)(config)
    want = fastdiff.DDIMSampler(**{k: v for k, v in config.items() if not k.startswith("_")})
    want.set_timesteps(10)
    torch.testing.assert_close(sampler.step(eps, 901, x).prev_sample, want.step(eps, 901, x).prev_sample)


def test_skip_layer_guidance_is_fused():
    sampler = fastdiff.DDIMSampler()
    sampler.set_timesteps(10)
    x, u, c, e = (torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(i)) for i in range(4))
    fused = sampler.step(torch.cat([u, c]), 901, x, guidance_scale=4.0, skip_layer_output=e,
                         skip_layer_guidance_scale=2.8).prev_sample
    guided = u + 4.0 * (c - u)
    manual = sampler.step(guided + (c - e) * 2.8, 901, x).prev_sample  # SD3 pipeline's order
    torch.testing.assert_close(fused, manual, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="skip_layer_output needs guidance_scale"):
        sampler.step(c, 901, x, skip_layer_output=e, skip_layer_guidance_scale=1.0)


@pytest.mark.parametrize("cls", all_samplers(), ids=lambda c: c.__name__)
def test_whole_loop_on_the_meta_device(cls):
    """No host sync anywhere in a loop: on `meta` every read of a device value raises."""
    sampler = cls()
    sampler.set_timesteps(6, device="meta")
    x = torch.empty(2, 4, 8, 8, device="meta")
    seeded = "seed" in inspect.signature(sampler.step).parameters
    for t in sampler.timesteps:
        model_input = sampler.scale_model_input(x, t)
        x = sampler.step(torch.empty_like(model_input), t, x, **({"seed": 1} if seeded else {})).prev_sample
    assert x.device.type == "meta" and x.shape == (2, 4, 8, 8)


def test_counter_sampler_loop_on_the_meta_device():
    sampler = CounterSampler()
    sampler.set_timesteps(6, device="meta")
    x = torch.empty(2, 4, device="meta")
    for t in sampler.timesteps:
        x = sampler.step(torch.empty_like(x), t, x).prev_sample
    assert x.device.type == "meta"


def test_set_timesteps_reuses_a_table_built_for_the_same_schedule():
    """A sampling loop calls set_timesteps every run: the table of an unchanged schedule, config and step
    options is the one built before (the multistep solvers take tens of ms to build theirs)."""
    sampler = fastdiff.UniPCMultistepSampler()
    sampler.set_timesteps(20)
    first = sampler._table(torch.device("cpu"))
    sampler.set_timesteps(20)
    assert sampler._table(torch.device("cpu")) is first
    sampler.set_timesteps(21)
    assert sampler._table(torch.device("cpu")).shape != first.shape
    sampler.register_to_config(solver_order=1)  # a new config object: built again
    sampler.set_timesteps(20)
    again = sampler._table(torch.device("cpu"))
    assert again is not first and not torch.equal(again, first)


def test_dynamic_thresholding_past_torch_quantiles_limit():
    """diffusers' torch.quantile refuses a sample of more than 2**24 elements (e.g. a 3x4096x4096 image);
    two per-sample selections give the same interpolated quantile at any size."""
    from fastdiff.reference import dynamic_threshold
    x0 = torch.randn(1, 2**24 + 16, generator=torch.Generator().manual_seed(0)) * 2
    with pytest.raises(RuntimeError, match="too large"):
        torch.quantile(x0.abs(), 0.995, dim=1)
    ratio = 0.995
    position = torch.tensor(ratio) * (x0.shape[1] - 1)
    lo, weight = int(position), position - int(position)
    ordered = x0.abs().sort(dim=1).values
    want = torch.lerp(ordered[:, lo], ordered[:, lo + 1], weight).clamp(1.0, 3.0)
    assert torch.equal(dynamic_threshold(x0, ratio, 3.0), want)
