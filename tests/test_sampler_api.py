"""The diffusers-compatible surface, tested against diffusers itself: constructor, config contract
(config = _internal_dict, register_to_config, _use_default_values, _class_name, from_config,
save/load), compatibles, outputs (BaseOutput), set_timesteps, edge configs (zero beta, trained
betas length, unknown variance_type, _get_variance) and errors."""
import copy
import inspect
import json
import logging
import os
import pickle
import subprocess
import sys
import timeit
import warnings

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.configuration_utils import FrozenDict
from diffusers.schedulers.scheduling_ddpm import DDPMSchedulerOutput
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers

import fastdiff
from diffusers_twins import FP32, buildable_compatible_names
from fastdiff.samplers.config import FASTDIFF_ONLY_KEYS, KARRAS_SCHEDULERS, FrozenConfig

PAIRS = [(fastdiff.DDPMSampler, DDPMScheduler), (fastdiff.DDIMSampler, DDIMScheduler)]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def public(config) -> dict:
    """The keys that configure a sampler (no `_class_name`, `_use_default_values`, ...)."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


def comparable(config) -> dict:
    """A config as diffusers would hold it: fastdiff-only keys out, `_use_default_values` as a set."""
    out = {k: v for k, v in config.items() if k not in FASTDIFF_ONLY_KEYS}
    if "_use_default_values" in out:
        out["_use_default_values"] = set(out["_use_default_values"]) - set(FASTDIFF_ONLY_KEYS)
    out.pop("_diffusers_version", None)
    return out


def warned(caplog, library: str) -> list[str]:
    """Warnings logged by `library` ("diffusers" or "fastdiff")."""
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith(library)]


@pytest.fixture
def diffusers_log(caplog):
    """diffusers' logger does not propagate to the root logger: attach pytest's handler to it."""
    logger = logging.getLogger("diffusers")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO)
    yield caplog
    logger.removeHandler(caplog.handler)


def steps_equal(ours, theirs, steps=10, eta=None, **tol):
    """Run both through set_timesteps + every step with the same inputs and generator; compare."""
    ours.set_timesteps(steps)
    theirs.set_timesteps(steps)
    assert torch.equal(ours.timesteps, theirs.timesteps)
    x, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    kwargs = {} if eta is None else {"eta": eta}
    for t in theirs.timesteps:
        a = ours.step(eps, t, x, generator=torch.Generator().manual_seed(int(t)), **kwargs).prev_sample
        b = theirs.step(eps, t, x, generator=torch.Generator().manual_seed(int(t)), **kwargs).prev_sample
        torch.testing.assert_close(a, b, **(tol or FP32))


# ---- constructor and config keys ------------------------------------------------------------
@pytest.mark.parametrize("ours,theirs", PAIRS)
def test_same_constructor_keywords_and_defaults(ours, theirs):
    """Same keywords and defaults as the diffusers twin, plus only the documented fastdiff-only keys."""
    ours_params = {k: p.default for k, p in inspect.signature(ours.__init__).parameters.items() if k != "self"}
    theirs_params = {k: p.default for k, p in inspect.signature(theirs.__init__).parameters.items() if k != "self"}
    extra = set(ours_params) - set(theirs_params)
    assert extra <= set(FASTDIFF_ONLY_KEYS), f"undocumented fastdiff-only keywords: {extra - set(FASTDIFF_ONLY_KEYS)}"
    assert set(theirs_params) <= set(ours_params)
    assert {k: ours_params[k] for k in theirs_params} == theirs_params
    assert set(ours().config) == set(theirs().config) | extra  # _use_default_values included


@pytest.mark.parametrize("ours,theirs", PAIRS)
@pytest.mark.parametrize("kwargs", [{}, dict(num_train_timesteps=500, prediction_type="v_prediction"),
                                    dict(clip_sample=False, steps_offset=1, timestep_spacing="trailing")])
def test_use_default_values_as_diffusers_writes_them(ours, theirs, kwargs):
    a, b = ours(**kwargs).config, theirs(**kwargs).config
    assert set(a["_use_default_values"]) - set(FASTDIFF_ONLY_KEYS) == set(b["_use_default_values"])
    assert a["_use_default_values"] == sorted(a["_use_default_values"])  # deterministic (diffusers: set order)
    assert comparable(a) == comparable(b)


def test_positional_arguments_count_as_given():
    """Deviation on purpose: diffusers lists positional arguments in _use_default_values (so from_config into
    another class drops them); a value the caller wrote is not a default."""
    assert "num_train_timesteps" in DDPMScheduler(500).config["_use_default_values"]
    assert "num_train_timesteps" not in fastdiff.DDPMSampler(500).config["_use_default_values"]
    assert fastdiff.DDIMSampler.from_config(fastdiff.DDPMSampler(500).config).config.num_train_timesteps == 500


def test_private_keywords_go_to_the_config_only():
    sampler = fastdiff.DDPMSampler(_class_name="DDPMScheduler", _diffusers_version="0.9.0", num_train_timesteps=10)
    theirs = DDPMScheduler(_class_name="DDPMScheduler", _diffusers_version="0.9.0", num_train_timesteps=10)
    assert comparable(sampler.config) == comparable(theirs.config)
    assert sampler.config["_diffusers_version"] == theirs.config["_diffusers_version"] == "0.9.0"


# ---- config is _internal_dict: the pipelines' patch takes effect --------------------------------
def patch_like_stable_diffusion(scheduler):
    """StableDiffusionPipeline.__init__'s fix-up of old scheduler configs, line for line."""
    if scheduler is not None and getattr(scheduler.config, "steps_offset", 1) != 1:
        new_config = dict(scheduler.config)
        new_config["steps_offset"] = 1
        scheduler._internal_dict = FrozenDict(new_config)
    if scheduler is not None and getattr(scheduler.config, "clip_sample", False) is True:
        new_config = dict(scheduler.config)
        new_config["clip_sample"] = False
        scheduler._internal_dict = FrozenDict(new_config)


@pytest.mark.parametrize("ours,theirs", PAIRS)
def test_pipeline_patch_of_internal_dict_takes_effect(ours, theirs):
    a, b = ours(), theirs()
    a.set_timesteps(10)  # tables built from the old config: rebuilt when it is replaced
    for s in (a, b):
        patch_like_stable_diffusion(s)
    assert a.config is a._internal_dict and a.config.steps_offset == 1 and a.config.clip_sample is False
    steps_equal(a, b, eta=1.0 if ours is fastdiff.DDIMSampler else None)
    assert a.timesteps[-1] == 1  # steps_offset took effect


@pytest.mark.parametrize("ours,theirs", PAIRS)
def test_register_to_config_replaces_the_config_and_takes_effect(ours, theirs):
    a, b = ours(), theirs()
    first = a.config
    for s in (a, b):
        s.register_to_config(prediction_type="v_prediction", clip_sample=False, timestep_spacing="trailing")
    assert a.config is not first and first.prediction_type == "epsilon"
    assert comparable(a.config) == comparable(b.config)
    steps_equal(a, b)


def test_schedule_is_built_once_as_in_diffusers():
    """diffusers builds betas in __init__ only: a patched beta_start changes the config, not the schedule."""
    a, b = fastdiff.DDPMSampler(), DDPMScheduler()
    for s in (a, b):
        s.register_to_config(beta_start=0.001)
    assert torch.equal(a.alphas_cumprod, b.alphas_cumprod) and torch.equal(a.betas, DDPMScheduler().betas)


def test_config_is_read_only_and_behaves_like_frozendict():
    sampler = fastdiff.DDPMSampler()
    config = sampler.config
    for mutate in (lambda: config.__setitem__("variance_type", "learned"), lambda: setattr(config, "clip_sample", 0),
                   lambda: config.update(a=1), lambda: config.pop("clip_sample"), lambda: config.setdefault("a", 1),
                   lambda: config.__delitem__("clip_sample"), lambda: config.clear(), lambda: config.popitem()):
        with pytest.raises(TypeError, match="read-only"):
            mutate()
    assert isinstance(config, dict) and config.clip_sample is True and config["clip_sample"] is True
    assert getattr(config, "no_such_key", 7) == 7  # pipelines probe keys with getattr(config, key, default)
    theirs = FrozenDict(dict(config))
    assert dict(theirs) == dict(config) and theirs.beta_end == config.beta_end
    assert pickle.loads(pickle.dumps(config)) == config and copy.deepcopy(config) == config
    assert isinstance(copy.deepcopy(sampler).config, FrozenConfig)


def test_config_keys_as_attributes_are_deprecated_like_diffusers():
    sampler, theirs = fastdiff.DDIMSampler(), DDIMScheduler()
    for s in (sampler, theirs):
        with pytest.warns(FutureWarning, match="Accessing config attribute `steps_offset` directly"):
            assert s.steps_offset == 0
    with pytest.raises(AttributeError, match="no attribute 'no_such_thing'"):
        sampler.no_such_thing


# ---- from_config ------------------------------------------------------------------------------
SOURCES = {  # name: (make the source, the (ours, theirs) pair of its kind)
    "ours-ddpm": (lambda: fastdiff.DDPMSampler(num_train_timesteps=500, variance_type="fixed_large"), PAIRS[0]),
    "ours-ddim": (lambda: fastdiff.DDIMSampler(set_alpha_to_one=False, prediction_type="v_prediction"), PAIRS[1]),
    "diffusers-ddpm": (lambda: DDPMScheduler(num_train_timesteps=500, variance_type="fixed_large"), PAIRS[0]),
    "diffusers-ddim": (lambda: DDIMScheduler(set_alpha_to_one=False, prediction_type="v_prediction"), PAIRS[1]),
    "sd-patched": (lambda: _patched(DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)),
                   PAIRS[0]),
}


def _patched(scheduler):
    patch_like_stable_diffusion(scheduler)
    return scheduler


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("ours,theirs", PAIRS)
def test_from_config_builds_what_diffusers_builds(source, ours, theirs, diffusers_log):
    """Defaulted keys dropped (the new class uses its own defaults), keys of other classes kept hidden."""
    make, (source_ours, source_theirs) = SOURCES[source]
    config = make().config
    a, b = ours.from_config(config), theirs.from_config(config)
    assert comparable(a.config) == comparable(b.config)
    # and back to the source's kind: hidden keys (e.g. variance_type through DDIM) come back as in diffusers
    back_a, back_b = source_ours.from_config(a.config), source_theirs.from_config(b.config)
    assert comparable(back_a.config) == comparable(back_b.config)
    given = {k: v for k, v in public(config).items() if k not in config["_use_default_values"]}
    assert {k: back_a.config[k] for k in given} == given
    assert not warned(diffusers_log, "diffusers") and not warned(diffusers_log, "fastdiff")


def test_sd_patch_is_lost_by_from_config_as_in_diffusers():
    """StableDiffusionPipeline patches steps_offset but leaves it in _use_default_values: diffusers' from_config
    then takes the class default again. Same here, so swapped-in samplers give diffusers' images."""
    config = SOURCES["sd-patched"][0]().config
    assert config.steps_offset == 1 and "steps_offset" in config["_use_default_values"]
    assert DDIMScheduler.from_config(config).config.steps_offset == 0
    assert fastdiff.DDIMSampler.from_config(config).config.steps_offset == 0


def test_from_config_kwargs_override_and_unknown_kwargs_are_ignored_with_a_warning(caplog, diffusers_log):
    sampler = fastdiff.DDPMSampler.from_config(DDPMScheduler().config, variance_type="fixed_large")
    assert sampler.config.variance_type == "fixed_large"
    assert fastdiff.DDPMSampler.from_config(DDIMScheduler().config).config.clip_sample is True
    # diffusers: an unknown keyword argument is ignored silently (returned with return_unused_kwargs)
    theirs, theirs_unused = DDPMScheduler.from_config({}, return_unused_kwargs=True, varience_type="fixed_large")
    assert theirs_unused == {"varience_type": "fixed_large"} and not warned(caplog, "diffusers")
    ours, unused = fastdiff.DDPMSampler.from_config({}, return_unused_kwargs=True, varience_type="fixed_large")
    assert unused == theirs_unused and not warned(caplog, "fastdiff")  # asked for: no warning
    DDPMScheduler.from_config({}, varience_type="fixed_large")
    fastdiff.DDPMSampler.from_config({}, varience_type="fixed_large")
    assert not warned(caplog, "diffusers")
    assert len(warned(caplog, "fastdiff")) == 1
    assert "got keyword arguments ['varience_type'] that it does not take" in warned(caplog, "fastdiff")[0]
    assert ours.config.variance_type == "fixed_small"


def test_from_config_unknown_config_keys_warn_like_diffusers(caplog, diffusers_log):
    config = {"num_train_timesteps": 10, "foo": 2, "_private": 1}
    theirs, theirs_unused = DDPMScheduler.from_config(config, return_unused_kwargs=True)
    ours, unused = fastdiff.DDPMSampler.from_config(config, return_unused_kwargs=True)
    assert unused == theirs_unused == {"foo": 2, "_private": 1}
    message = ("The config attributes {'foo': 2} were passed to {}, but are not expected and will be ignored. "
               "Please verify your scheduler_config.json configuration file.")
    assert warned(caplog, "diffusers") == [message.replace("{}", "DDPMScheduler")]
    assert warned(caplog, "fastdiff") == [message.replace("{}", "DDPMSampler")]
    assert comparable(ours.config) == comparable(theirs.config)  # unknown keys kept (hidden), as diffusers


def test_from_config_of_another_family_drops_its_keys_silently(caplog, diffusers_log):
    """Keys of compatible classes and of the class named by _class_name are not 'unexpected'."""
    from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler
    for other in (EulerDiscreteScheduler(use_karras_sigmas=True, timestep_spacing="trailing"),
                  DPMSolverMultistepScheduler(solver_order=3)):
        config = dict(other.config, _class_name=type(other).__name__)
        a, b = fastdiff.DDPMSampler.from_config(config), DDPMScheduler.from_config(config)
        assert comparable(a.config) == comparable(b.config)
    assert not warned(caplog, "diffusers") and not warned(caplog, "fastdiff")


def test_from_config_errors_like_diffusers():
    with pytest.raises(ValueError, match="provide a config as the first positional argument"):
        fastdiff.DDPMSampler.from_config()
    with pytest.raises(TypeError, match="config must be a dict .* got int"):
        fastdiff.DDPMSampler.from_config(3)
    with pytest.raises(ValueError, match="`_class_name` is of type string"):
        fastdiff.DDPMSampler.from_config({"_class_name": 3})


def test_deprecated_kwargs_reach_init_like_diffusers():
    """_deprecated_kwargs: from_config passes these through to __init__ (which takes **kwargs) instead of dropping them."""
    import diffusers
    seen = {}

    def make(base, decorator):
        class Old(base):
            config_name = "scheduler_config.json"
            _deprecated_kwargs = ["predict_epsilon"]

            @decorator
            def __init__(self, num_train_timesteps: int = 1000, **kwargs):
                seen[base.__module__.split(".")[0]] = kwargs

        return Old

    from fastdiff.samplers.config import ConfigMixin, register_to_config
    make(ConfigMixin, register_to_config).from_config({"num_train_timesteps": 5}, predict_epsilon=False, other=1)
    make(diffusers.ConfigMixin, diffusers.configuration_utils.register_to_config).from_config(
        {"num_train_timesteps": 5}, predict_epsilon=False, other=1)
    assert seen["fastdiff"] == seen["diffusers"] == {"predict_epsilon": False}


# ---- files --------------------------------------------------------------------------------------
@pytest.mark.parametrize("ours,theirs", PAIRS)
def test_config_round_trips_both_ways(ours, theirs, tmp_path, diffusers_log):
    config = dict(num_train_timesteps=500, beta_schedule="scaled_linear", prediction_type="v_prediction",
                  timestep_spacing="trailing", rescale_betas_zero_snr=True)
    from_diffusers = ours.from_config(theirs(**config).config)
    assert {k: from_diffusers.config[k] for k in config} == config
    back = theirs.from_config(from_diffusers.config)
    assert {k: back.config[k] for k in config} == config
    ours(**config).save_pretrained(tmp_path / "scheduler")
    data = json.loads((tmp_path / "scheduler" / "scheduler_config.json").read_text())
    theirs(**config).save_pretrained(tmp_path / "theirs")
    their_data = json.loads((tmp_path / "theirs" / "scheduler_config.json").read_text())
    assert data == their_data  # the file diffusers writes (default fastdiff-only keys left out)
    assert data["_class_name"] == theirs.__name__ and data["_diffusers_version"]
    loaded_theirs = theirs.from_pretrained(tmp_path, subfolder="scheduler")
    assert loaded_theirs.config["prediction_type"] == "v_prediction"
    assert not warned(diffusers_log, "diffusers") and not warned(diffusers_log, "fastdiff")
    loaded = ours.from_pretrained(tmp_path / "theirs")
    assert public(loaded.config) == public(ours(**config).config)
    assert torch.equal(loaded.alphas_cumprod, theirs(**config).alphas_cumprod)
    # _class_name / _diffusers_version in the config as diffusers reads them from a file
    assert loaded.config["_class_name"] == loaded_theirs.config["_class_name"] == theirs.__name__
    assert loaded.config["_diffusers_version"] == theirs.from_pretrained(tmp_path / "theirs").config["_diffusers_version"]
    assert loaded.config["_use_default_values"] == ["table_dtype"]  # the file has every diffusers key


def test_fastdiff_only_keys_round_trip_and_diffusers_ignores_them(tmp_path, caplog, diffusers_log):
    ours = fastdiff.DDPMSampler(table_dtype="float64", num_train_timesteps=100)
    ours.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "scheduler_config.json").read_text())["table_dtype"] == "float64"
    assert fastdiff.DDPMSampler.from_pretrained(tmp_path).config.table_dtype == "float64"
    # diffusers: the non-default key is unexpected (its usual warning), kept hidden, and comes back
    theirs = DDPMScheduler.from_pretrained(tmp_path)
    assert any("{'table_dtype': 'float64'} were passed to DDPMScheduler" in m for m in warned(diffusers_log, "diffusers"))
    assert theirs.config.num_train_timesteps == 100
    assert fastdiff.DDPMSampler.from_config(theirs.config).config.table_dtype == "float64"
    assert fastdiff.DDPMSampler.from_config(DDPMScheduler.from_config(ours.config).config).config.table_dtype == "float64"
    diffusers_log.clear()
    # defaults: silent in diffusers, in memory (via _use_default_values) and from a file
    DDPMScheduler.from_config(fastdiff.DDPMSampler().config)
    fastdiff.DDPMSampler().save_pretrained(tmp_path / "default")
    DDPMScheduler.from_pretrained(tmp_path / "default")
    assert not warned(diffusers_log, "diffusers") and not warned(diffusers_log, "fastdiff")


def test_load_config_and_from_pretrained_local_only(tmp_path):
    fastdiff.DDIMSampler(num_train_timesteps=50).save_config(tmp_path / "pipe" / "scheduler")
    ours = fastdiff.DDIMSampler.load_config(tmp_path / "pipe", subfolder="scheduler")
    theirs = DDIMScheduler.load_config(tmp_path / "pipe", subfolder="scheduler")
    assert ours == theirs
    # tuples as diffusers returns them; hub-only keywords accepted and ignored for a local folder
    config, unused, commit = fastdiff.DDIMSampler.load_config(tmp_path / "pipe" / "scheduler", return_unused_kwargs=True,
                                                              return_commit_hash=True, revision="main", extra=1)
    assert (config, unused, commit) == (theirs, {"extra": 1}, None)
    sampler, unused = fastdiff.DDIMSampler.from_pretrained(tmp_path / "pipe", subfolder="scheduler", eta=1,
                                                           return_unused_kwargs=True, local_files_only=True)
    _, their_unused = DDIMScheduler.from_pretrained(tmp_path / "pipe", subfolder="scheduler", eta=1,
                                                    return_unused_kwargs=True, local_files_only=True)
    assert sampler.config.num_train_timesteps == 50 and unused == their_unused  # eta + the hidden _class_name, ...
    assert unused["eta"] == 1 and unused["_class_name"] == "DDIMScheduler"
    file_path = tmp_path / "pipe" / "scheduler" / "scheduler_config.json"
    assert fastdiff.DDIMSampler.from_pretrained(file_path).config.num_train_timesteps == 50
    # diffusers falls back to the folder's own config when the subfolder has none: same here
    fastdiff.DDIMSampler(num_train_timesteps=60).save_config(tmp_path / "flat")
    assert fastdiff.DDIMSampler.from_pretrained(tmp_path / "flat", subfolder="scheduler").config.num_train_timesteps == 60
    with pytest.raises(OSError, match="no file named scheduler_config.json"):
        fastdiff.DDIMSampler.from_pretrained(tmp_path / "pipe")
    with pytest.raises(OSError, match="local folders only \\(no downloads\\)"):
        fastdiff.DDIMSampler.from_pretrained("stabilityai/stable-diffusion-2-1", subfolder="scheduler")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "scheduler_config.json").write_text("{not json")
    with pytest.raises(OSError, match="not a valid JSON file"):
        fastdiff.DDIMSampler.from_pretrained(tmp_path / "bad")
    with pytest.raises(ValueError, match="must be a folder"):
        fastdiff.DDIMSampler().save_config(file_path)
    with pytest.raises(NotImplementedError, match="does not upload"):
        fastdiff.DDIMSampler().save_pretrained(tmp_path / "x", push_to_hub=True)
    with pytest.warns(FutureWarning, match="deprecated to pass a pretrained model name or path"):
        assert fastdiff.DDIMSampler.from_config(str(tmp_path / "flat")).config.num_train_timesteps == 60


def test_repr_is_the_json_config():
    text = repr(fastdiff.DDPMSampler())
    assert text.startswith("DDPMSampler {") and json.loads(text[len("DDPMSampler "):])["_class_name"] == "DDPMScheduler"


# ---- compatibles ------------------------------------------------------------------------------------
def test_karras_list_is_diffusers_enum():
    assert set(KARRAS_SCHEDULERS) == {e.name for e in KarrasDiffusionSchedulers}


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 notes inside diffusers' KDPM2 / SDE schedulers
@pytest.mark.parametrize("ours,theirs", PAIRS)
def test_compatibles(ours, theirs):
    sampler = ours()
    assert ours.has_compatibles is True
    names = [c.__name__ for c in sampler.compatibles]
    assert names[0] == ours.__name__ and len(names) == len(set(names))
    assert buildable_compatible_names(theirs()) <= set(names)  # every diffusers class of the family
    ours_listed = [c for c in sampler.compatibles if c.__module__.startswith("fastdiff")]
    assert {fastdiff.DDPMSampler, fastdiff.DDIMSampler} <= set(ours_listed)
    for cls in sampler.compatibles:  # each builds from this config
        assert cls.from_config(sampler.config).config.num_train_timesteps == 1000


def test_compatibles_leave_out_diffusers_placeholders(monkeypatch):
    """A class diffusers stands in for (its optional package missing: DPMSolverSDEScheduler without
    torchsde) cannot be built, so it is not offered; the buildable classes still are."""
    import diffusers
    from diffusers.utils import DummyObject

    class DPMSolverSDEScheduler(metaclass=DummyObject):
        _backends = ["torchsde"]

    monkeypatch.setattr(diffusers, "DPMSolverSDEScheduler", DPMSolverSDEScheduler)
    names = [c.__name__ for c in fastdiff.DDPMSampler().compatibles]
    assert "DPMSolverSDEScheduler" not in names
    assert buildable_compatible_names(DDPMScheduler()) <= set(names) and "EulerDiscreteScheduler" in names


def test_importing_fastdiff_does_not_import_diffusers():
    code = ("import sys, fastdiff; assert 'diffusers' not in sys.modules; "
            "s = fastdiff.DDPMSampler(); fastdiff.DDIMSampler.from_config(s.config); s.save_config('{d}'); "
            "fastdiff.DDPMSampler.from_pretrained('{d}'); assert 'diffusers' not in sys.modules, 'config surface'; "
            "names = [c.__name__ for c in s.compatibles]; assert 'diffusers' in sys.modules and 'PNDMScheduler' in names")
    env = dict(os.environ, FASTDIFF_BACKEND="reference")
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        result = subprocess.run([sys.executable, "-c", code.replace("{d}", d)], cwd=REPO, env=env,
                                capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


# ---- outputs ----------------------------------------------------------------------------------------
def test_output_reads_like_diffusers_base_output():
    x, x0 = torch.randn(2), torch.randn(2)
    for ours, theirs in ((fastdiff.SamplerOutput(prev_sample=x, pred_original_sample=x0),
                          DDPMSchedulerOutput(prev_sample=x, pred_original_sample=x0)),
                         (fastdiff.SamplerOutput(prev_sample=x), DDPMSchedulerOutput(prev_sample=x, pred_original_sample=None))):
        assert list(ours.keys()) == list(theirs.keys())
        assert all(a is b for a, b in zip(ours.values(), theirs.values()))
        assert [(k, v) for k, v in ours.items()] == [(k, v) for k, v in theirs.items()]
        assert len(ours.to_tuple()) == len(theirs.to_tuple()) == len(ours) == len(theirs)
        assert ours[0] is theirs[0] is x and ours["prev_sample"] is theirs["prev_sample"] is x
        assert ours.prev_sample is x and list(ours) == list(theirs) and ("prev_sample" in ours) == ("prev_sample" in theirs)
        assert ours[:1] == theirs[:1]
        if ours.pred_original_sample is None:  # None fields are skipped, as diffusers does
            for out in (ours, theirs):
                with pytest.raises(IndexError):
                    out[1]
                with pytest.raises(KeyError):
                    out["pred_original_sample"]
                assert out.pred_original_sample is None
        for out in (ours, theirs):
            with pytest.raises(Exception, match="You cannot use"):
                out.pop("prev_sample")
    out = fastdiff.SamplerOutput(prev_sample=x)
    out.pred_original_sample = x0  # assigning a field adds it to the dict view, as in BaseOutput
    assert out.keys() == ["prev_sample", "pred_original_sample"] and out[1] is x0
    out["prev_sample"] = x0
    assert out.prev_sample is x0


def test_step_output_dict_and_tuple():
    sampler = fastdiff.DDIMSampler()
    sampler.set_timesteps(5)
    x, eps = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)
    out = sampler.step(eps, sampler.timesteps[0], x)
    prev, x0 = sampler.step(eps, sampler.timesteps[0], x, return_dict=False)
    assert torch.equal(out.prev_sample, prev) and torch.equal(out[0], prev) and torch.equal(out["prev_sample"], prev)
    assert torch.equal(out.pred_original_sample, x0) and torch.equal(out[1], x0)
    assert out.keys() == ["prev_sample", "pred_original_sample"] and torch.equal(out.to_tuple()[1], x0)


def test_output_is_cheap_to_build():
    """A step returns one per call: a couple of microseconds at most (BaseOutput: several)."""
    x = torch.zeros(1)
    ours = min(timeit.repeat(lambda: fastdiff.SamplerOutput(prev_sample=x, pred_original_sample=x),
                             number=20000, repeat=7)) / 20000
    theirs = min(timeit.repeat(lambda: DDPMSchedulerOutput(prev_sample=x, pred_original_sample=x),
                               number=20000, repeat=7)) / 20000
    print(f"SamplerOutput {ours * 1e9:.0f} ns, diffusers' DDPMSchedulerOutput {theirs * 1e9:.0f} ns")
    assert ours < 2e-6 and ours < theirs / 3


def test_output_is_a_pytree():
    import torch.utils._pytree as pytree
    x = torch.randn(2)
    leaves, spec = pytree.tree_flatten(fastdiff.SamplerOutput(prev_sample=x, pred_original_sample=x + 1))
    assert len(leaves) == 2 and torch.equal(pytree.tree_unflatten(leaves, spec).pred_original_sample, x + 1)


# ---- schedules and variances: diffusers' behaviour for odd configs --------------------------------
@pytest.mark.parametrize("ours,theirs", PAIRS)
@pytest.mark.parametrize("kwargs", [dict(beta_start=0.0), dict(trained_betas=[0.0] * 3 + [0.01] * 997)],
                         ids=["beta_start=0", "trained-leading-zeros"])
def test_zero_beta_steps_equal_diffusers_where_diffusers_is_finite(ours, theirs, kwargs):
    """abar_t = 1 (1 - abar_t = 0) only at the leading zero betas; every other step gives diffusers' values."""
    a, b = ours(**kwargs), theirs(**kwargs)
    a.set_timesteps(10)
    b.set_timesteps(10)
    x, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    for t in b.timesteps[:-1]:
        torch.testing.assert_close(a.step(eps, t, x, generator=torch.Generator().manual_seed(0)).prev_sample,
                                   b.step(eps, t, x, generator=torch.Generator().manual_seed(0)).prev_sample, **FP32)
    assert int(b.timesteps[-1]) == 0 and torch.isnan(b.step(eps, 0, x).prev_sample).all()  # diffusers: 0 / 0


@pytest.mark.parametrize("ours", [fastdiff.DDPMSampler, fastdiff.DDIMSampler])
@pytest.mark.parametrize("kwargs", [dict(beta_start=0.0), dict(trained_betas=[0.0] * 3 + [0.01] * 997)],
                         ids=["beta_start=0", "trained-leading-zeros"])
def test_zero_beta_noise_free_step_returns_x0(ours, kwargs):
    """Documented finite result: where 1 - abar_t = 0 (x_t carries no noise; abar_prev = 1 too) the step
    returns x0, the limit of the update as beta_t -> 0 (DDPM eq. 7: c_x0 -> 1, c_xt -> 0; DDIM: sigma,
    direction -> 0)."""
    a = ours(**kwargs, clip_sample=False)
    a.set_timesteps(10)
    x, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    out = a.step(eps, 0, x, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out.prev_sample).all()
    torch.testing.assert_close(out.prev_sample, out.pred_original_sample, **FP32)
    torch.testing.assert_close(out.pred_original_sample, x, **FP32)  # eps prediction at abar = 1: x0 = x


@pytest.mark.parametrize("ours,theirs", PAIRS)
def test_trained_betas_longer_than_num_train_timesteps(ours, theirs):
    """diffusers keeps every trained beta in .betas, silently, and its steps read only the first
    num_train_timesteps: same steps here, with a warning."""
    trained = [0.0001 * (i + 1) for i in range(120)]
    with pytest.warns(UserWarning, match="trained_betas has 120 entries but num_train_timesteps=100"):
        a = ours(trained_betas=trained, num_train_timesteps=100)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b = theirs(trained_betas=trained, num_train_timesteps=100)  # silent
    assert len(b.betas) == 120 and len(a.betas) == 100 and len(a) == len(b) == 100
    assert torch.equal(a.alphas_cumprod, b.alphas_cumprod[:100])
    steps_equal(a, b)


def test_trained_betas_shorter_than_num_train_timesteps_raise_early():
    """diffusers accepts them and fails with an IndexError at the first step past their end."""
    theirs = DDPMScheduler(trained_betas=[0.01] * 50, num_train_timesteps=100)
    theirs.set_timesteps(10)
    with pytest.raises(IndexError):
        theirs.step(torch.randn(1, 1, 2), int(theirs.timesteps[0]), torch.randn(1, 1, 2))
    with pytest.raises(ValueError, match="trained_betas must be 1-D with num_train_timesteps=100 entries"):
        fastdiff.DDPMSampler(trained_betas=[0.01] * 50, num_train_timesteps=100)


def test_unknown_variance_type_is_fixed_small_with_a_warning():
    """diffusers accepts any variance_type and samples an unknown one as fixed_small, silently."""
    with pytest.warns(UserWarning, match="variance_type='fixed' is not one of"):
        a = fastdiff.DDPMSampler(variance_type="fixed")
    assert a.config.variance_type == "fixed"  # the config keeps what was given, as diffusers'
    steps_equal(a, DDPMScheduler(variance_type="fixed"))
    steps_equal(a, DDPMScheduler(variance_type="fixed_small"))


def test_effective_variance_type():
    from fastdiff.samplers.ddpm import VARIANCE_TYPES
    assert fastdiff.schedules.effective_variance_type("fixed_large", VARIANCE_TYPES) == "fixed_large"
    with pytest.warns(UserWarning, match="sampling with 'fixed_small'.*as diffusers' DDPMScheduler does without"):
        assert fastdiff.schedules.effective_variance_type("fixed", VARIANCE_TYPES) == "fixed_small"


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log",
                                           "learned", "learned_range", "unknown"])
@pytest.mark.parametrize("schedule", ["default", "spaced", "custom"])
def test_get_variance_equals_diffusers(variance_type, schedule):
    ours, theirs = fastdiff.DDPMSampler(), DDPMScheduler()
    for s in (ours, theirs):
        if schedule == "spaced":
            s.set_timesteps(10)
        elif schedule == "custom":
            s.set_timesteps(timesteps=[900, 500, 100, 3])
    predicted = torch.rand(2, 3) * 2 - 1
    for t in [int(t) for t in theirs.timesteps[:3]] + [int(theirs.timesteps[-1])]:
        for t_in in (t, torch.tensor(t)):
            a = ours._get_variance(t_in, predicted_variance=predicted, variance_type=variance_type)
            b = theirs._get_variance(t_in, predicted_variance=predicted, variance_type=variance_type)
            assert torch.equal(a, b), (variance_type, t)
    config_type = variance_type if variance_type != "unknown" else "fixed_small"
    ours, theirs = fastdiff.DDPMSampler(variance_type=config_type), DDPMScheduler(variance_type=config_type)
    assert torch.equal(ours._get_variance(500, predicted), theirs._get_variance(500, predicted))  # from the config


def test_laplace_schedule_equals_diffusers():
    assert torch.equal(fastdiff.DDPMSampler(beta_schedule="laplace").alphas_cumprod,
                       DDPMScheduler(beta_schedule="laplace").alphas_cumprod)


# ---- set_timesteps, attributes, steps -------------------------------------------------------------
@pytest.mark.parametrize("ours,theirs", PAIRS)
@pytest.mark.parametrize("spacing,offset", [("leading", 0), ("leading", 1), ("linspace", 0), ("trailing", 0)])
def test_set_timesteps_and_attributes(ours, theirs, spacing, offset):
    a, b = ours(timestep_spacing=spacing, steps_offset=offset), theirs(timestep_spacing=spacing, steps_offset=offset)
    assert torch.equal(a.timesteps, b.timesteps)  # before set_timesteps too
    a.set_timesteps(37)
    b.set_timesteps(37)
    assert torch.equal(a.timesteps, b.timesteps) and a.timesteps.dtype == torch.int64
    assert (len(a), a.order, a.init_noise_sigma, a.num_inference_steps) == (len(b), b.order, b.init_noise_sigma, 37)
    x = torch.randn(1, 3, 4, 4)
    assert a.scale_model_input(x, 10) is x
    assert torch.equal(a.betas, b.betas) and torch.equal(a.alphas, b.alphas)


@pytest.mark.parametrize("ours,theirs", PAIRS)
@pytest.mark.parametrize("kwargs", [{}, dict(beta_schedule="squaredcos_cap_v2", variance_type="fixed_small_log"),
                                    dict(prediction_type="v_prediction", clip_sample=False),
                                    dict(thresholding=True, prediction_type="sample")])
def test_default_tables_are_diffusers_float32_values(ours, theirs, kwargs):
    """table_dtype="float32" (the default) derives the rows in diffusers' float32 operation order."""
    if ours is fastdiff.DDIMSampler:
        kwargs = {k: v for k, v in kwargs.items() if k != "variance_type"}
    steps_equal(ours(**kwargs), theirs(**kwargs), steps=50, eta=1.0 if ours is fastdiff.DDIMSampler else None)


def test_custom_timesteps_and_previous_timestep():
    a, b = fastdiff.DDPMSampler(), DDPMScheduler()
    for s in (a, b):
        s.set_timesteps(timesteps=[900, 500, 100, 3])
    assert torch.equal(a.timesteps, b.timesteps)
    assert [int(a.previous_timestep(t)) for t in a.timesteps] == [int(b.previous_timestep(t)) for t in b.timesteps]
    assert a.previous_timestep(3) == -1 and a.custom_timesteps
    ddim = fastdiff.DDIMSampler()
    ddim.set_timesteps(10)
    assert ddim.previous_timestep(901) == 801


@pytest.mark.parametrize("timestep", [700, torch.tensor(700), torch.tensor([700])])
def test_timestep_forms_agree(timestep):
    sampler = fastdiff.DDPMSampler()
    sampler.set_timesteps(10)
    x, eps = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)
    want = sampler.step(eps, 700, x, seed=1).prev_sample
    assert torch.equal(sampler.step(eps, timestep, x, seed=1).prev_sample, want)


def test_device_gather_path_equals_host_lookup(monkeypatch):
    """The branch an accelerator timestep (or torch.compile) takes: gather from the device table."""
    sampler = fastdiff.DDPMSampler()
    sampler.set_timesteps(10)
    x, eps = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)
    want = sampler.step(eps, 700, x, seed=1).prev_sample
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert torch.equal(sampler.step(eps, torch.tensor(700), x, seed=1).prev_sample, want)


def test_seeded_noise_is_the_public_stream():
    sampler = fastdiff.DDPMSampler(clip_sample=False)
    sampler.set_timesteps(10)
    x, eps = torch.randn(3, 3, 4, 4), torch.randn(3, 3, 4, 4)
    seeded = sampler.step(eps, 500, x, seed=42, sample_offset=5).prev_sample
    noise = fastdiff.noise.randn(x.shape, 42, counter=500, sample_offset=5)
    # Same integer stream on every backend; normals agree to 1e-6 (libm differs), DESIGN "Noise".
    torch.testing.assert_close(seeded, sampler.step(eps, 500, x, variance_noise=noise).prev_sample,
                               atol=2e-6, rtol=0)
    alone = sampler.step(eps[1:2], 500, x[1:2], seed=42, sample_offset=6).prev_sample
    assert torch.equal(alone[0], seeded[1])


def test_default_noise_follows_torch_manual_seed():
    sampler = fastdiff.DDPMSampler()
    sampler.set_timesteps(10)
    x, eps = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)
    torch.manual_seed(3)
    a = sampler.step(eps, 500, x).prev_sample
    torch.manual_seed(3)
    assert torch.equal(a, sampler.step(eps, 500, x).prev_sample)
    assert not torch.equal(a, sampler.step(eps, 500, x).prev_sample)


def test_guidance_scale_equals_manual_cfg():
    sampler = fastdiff.DDIMSampler()
    sampler.set_timesteps(10)
    x, uncond, cond = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    fused = sampler.step(torch.cat([uncond, cond]), 501, x, guidance_scale=7.5).prev_sample
    manual = sampler.step(uncond + 7.5 * (cond - uncond), 501, x).prev_sample
    torch.testing.assert_close(fused, manual, atol=1e-6, rtol=1e-5)


# ---- bad input: a clear error naming the argument, the value and what is allowed ----------------
@pytest.mark.parametrize("kwargs,match", [
    (dict(beta_schedule="cosine"), "beta_schedule must be one of"),
    (dict(prediction_type="eps"), "prediction_type must be one of .* got 'eps'"),
    (dict(timestep_spacing="even"), "timestep_spacing must be one of .* got 'even'"),
    (dict(num_train_timesteps=0), "num_train_timesteps must be a positive int"),
    (dict(table_dtype="float16"), "table_dtype must be one of .* got 'float16'"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fastdiff.DDPMSampler(**kwargs)


def test_bad_set_timesteps():
    sampler = fastdiff.DDPMSampler()
    with pytest.raises(ValueError, match="num_inference_steps must be an int in \\[1, num_train_timesteps=1000\\], got 1001"):
        sampler.set_timesteps(1001)
    with pytest.raises(ValueError, match="strictly descending"):
        sampler.set_timesteps(timesteps=[1, 5])
    with pytest.raises(ValueError, match="either num_inference_steps or timesteps"):
        sampler.set_timesteps(10, timesteps=[5, 1])
    with pytest.raises(ValueError, match="call set_timesteps"):
        fastdiff.DDIMSampler().step(torch.randn(1, 1, 2), 5, torch.randn(1, 1, 2))


def test_bad_step_inputs():
    sampler = fastdiff.DDPMSampler()
    sampler.set_timesteps(10)
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="timestep 7 is not in the schedule"):
        sampler.step(x, 7, x)
    with pytest.raises(ValueError, match=r"model_output has shape \(2, 4, 4, 4\) but a sample of shape \(2, 3, 4, 4\) needs \[2, 3, 4, 4\]"):
        sampler.step(torch.randn(2, 4, 4, 4), 900, x)
    with pytest.raises(ValueError, match="needs \\[4, 3, 4, 4\\] \\(\\[uncond; cond\\] batch"):
        sampler.step(x, 900, x, guidance_scale=3.0)
    with pytest.raises(ValueError, match="at most one of generator, variance_noise and seed; got generator and variance_noise"):
        sampler.step(x, 900, x, generator=torch.Generator(), variance_noise=x)
    with pytest.raises(ValueError, match="variance_noise must match sample"):
        sampler.step(x, 900, x, variance_noise=x[:1])
    with pytest.raises(TypeError, match="model_output must be a floating-point tensor, got Tensor of dtype torch.int64"):
        sampler.step(x.long(), 900, x)
    with pytest.raises(TypeError, match="timestep must be an int or a 1-element tensor, got float"):
        sampler.step(x, 900.0, x)
    with pytest.raises(ValueError, match="model_output is on meta but sample is on cpu"):
        sampler.step(x.to("meta"), 900, x)
    learned = fastdiff.DDPMSampler(variance_type="learned")
    with pytest.raises(ValueError, match="variance_type='learned' needs model_output with 2 x 3 channels"):
        learned.step(x, 999, x)
    with pytest.raises(ValueError, match="timesteps must be in \\[0, 1000\\), got \\[1000\\]"):
        sampler.add_noise(x, x, torch.tensor([1, 1000]))
    with pytest.raises(ValueError, match="eta must be a float >= 0"):
        ddim = fastdiff.DDIMSampler()
        ddim.set_timesteps(5)
        ddim.step(x, 801, x, eta=-1)


def test_learned_variance_with_2c_channels_runs():
    sampler = fastdiff.DDPMSampler(variance_type="learned_range")
    sampler.set_timesteps(10)
    x = torch.randn(2, 3, 4, 4)
    out = sampler.step(torch.randn(2, 6, 4, 4), 900, x, seed=0).prev_sample
    assert out.shape == x.shape and torch.isfinite(out).all()
