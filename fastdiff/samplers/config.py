"""diffusers' config contract, without diffusers: `config`, `register_to_config`, `from_config`,
`save_config` / `save_pretrained`, `load_config` / `from_pretrained` on local folders, `compatibles`.

Why our own class and not diffusers' `ConfigMixin` / `SchedulerMixin` (DESIGN "The diffusers
surface"): fastdiff must import and run without diffusers (it is a test dependency only, see
pyproject), and importing diffusers' scheduling utilities costs seconds; the contract is small.
Pipelines, though, accept and save a scheduler only if it subclasses diffusers' SchedulerMixin: so
when diffusers' scheduling utilities are loaded (before or after fastdiff), SchedulerMixin joins
ConfigMixin's bases (end of this file), without an import of diffusers from fastdiff.
Every item below follows diffusers 0.42 (configuration_utils.py, schedulers/scheduling_utils.py)
and is tested against it (tests/test_sampler_api.py):

- `config` IS the sampler's `_internal_dict`, a read-only dict with attribute access. A pipeline
  patches a scheduler by replacing it (`scheduler._internal_dict = FrozenDict(new_config)`, as
  StableDiffusionPipeline does for `steps_offset` / `clip_sample`); samplers read `self.config`
  when they use it (set_timesteps, step), so the patch takes effect. The beta schedule is built
  once in __init__, as in diffusers (a patched `beta_start` changes neither).
- The `@register_to_config` decorator records every constructor argument (defaults applied) and
  `_use_default_values`, the keys the caller did not give (sorted here; diffusers lists a set).
  Keyword arguments starting with "_" go into the config only. Deviation: diffusers also lists
  arguments given positionally as defaults (so `from_config` into another class drops them); we
  count them as given.
- `from_config(config, return_unused_kwargs=False, **kwargs)`: keys in `_use_default_values` are
  dropped first (the new class uses its own defaults); keys of compatible classes and of the class
  named by `_class_name` are dropped silently; other unknown keys are ignored with diffusers'
  warning ("The config attributes {...} were passed to X, but are not expected and will be
  ignored..."); keys the class does not take are kept in the new config ("hidden", so swapping
  back restores them). diffusers' classes are consulted for this only when diffusers is already
  imported (from_config never imports it): without it, keys of diffusers' other schedulers are
  reported as unexpected (the same warning; nothing else changes). Unknown **kwargs: diffusers ignores them silently; we ignore them too but
  log a warning (a typo would otherwise go unnoticed), unless return_unused_kwargs=True returns them.
- `_class_name` names the diffusers scheduler a sampler replaces (DDPMSampler -> "DDPMScheduler"),
  so stock diffusers and tools that read `scheduler_config.json` recognise the file; it is in the
  config when the config came from a file or from another scheduler's config that had it. (diffusers
  also adds `_class_name` / `_diffusers_version` to a live scheduler's config as a side effect of
  saving or repr; ours are never mutated.) `_diffusers_version` is written as the installed
  diffusers' version, else the version this surface is tested against.
- fastdiff-only config keys (FASTDIFF_ONLY_KEYS, e.g. `table_dtype`) round-trip in our configs. A
  file leaves them out while they have their default, so a folder saved with default settings is
  what diffusers itself writes and loads in stock diffusers without a warning; in memory they are in
  `_use_default_values` while defaulted, which diffusers' `from_config` drops silently. A non-default
  value reaches diffusers as an unexpected key: its usual warning, otherwise ignored.
- `compatibles`: this sampler, the fastdiff samplers of the same family and the diffusers classes
  of its twin's family (diffusers' `_compatibles`: the 15 Karras schedulers for DDPM/DDIM), resolved
  when asked, so `import fastdiff` does not import diffusers. Placeholder classes of diffusers for
  missing optional packages (e.g. DPMSolverSDEScheduler without torchsde) are left out.
"""
from __future__ import annotations

import copy
import functools
import importlib
import importlib.abc
import importlib.metadata
import importlib.util
import inspect
import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

logger = logging.getLogger(__name__)

CONFIG_NAME = "scheduler_config.json"
DIFFUSERS_TESTED_VERSION = "0.42.1"  # the diffusers release this surface is tested against

# fastdiff-only constructor keywords (not in the diffusers twin) -> what they mean. Documented here
# so the API tests can tell them from accidental differences to diffusers' signatures.
FASTDIFF_ONLY_KEYS = {
    "table_dtype": "dtype the step coefficients are derived in: 'float32' (diffusers' values, in its "
                   "operation order; the default) or 'float64'",
    "sde_third_order": "DPMSolverMultistepSampler, third-order SDE-DPM-Solver++: 'k-diffusion' (the convergent "
                       "weight, the default) or 'diffusers' (diffusers' sign)",
}

# diffusers' KarrasDiffusionSchedulers: the `_compatibles` of DDPM/DDIM/Euler/DPM-Solver/UniPC/... (a
# test checks this list against diffusers' enum, so no import is needed to know it).
KARRAS_SCHEDULERS = (
    "DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "LMSDiscreteScheduler", "EulerDiscreteScheduler",
    "HeunDiscreteScheduler", "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
    "DEISMultistepScheduler", "UniPCMultistepScheduler", "DPMSolverSDEScheduler", "EDMEulerScheduler",
)

# load_config keywords that only matter for Hub downloads (diffusers pops the same ones).
_HUB_KWARGS = ("cache_dir", "local_dir", "local_dir_use_symlinks", "force_download", "proxies", "token",
               "local_files_only", "revision", "mirror", "user_agent")


class FrozenConfig(dict):
    """A read-only dict whose keys are also attributes, like diffusers' FrozenDict.

    Stricter than diffusers' FrozenDict, whose `__setitem__` / `__setattr__` guard never fires:
    every mutation raises here (a sampler's config changes only by replacing it). Keys that are not
    identifiers or that name a dict method (e.g. "items") are reachable by key only.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        attributes = self.__dict__
        for key, value in self.items():
            if isinstance(key, str) and key.isidentifier() and not hasattr(FrozenConfig, key):
                attributes[key] = value

    def _readonly(self, *args, **kwargs):
        raise TypeError("a sampler's config is read-only: build a new sampler with from_config(config, key=value), "
                        "or replace the whole config as pipelines do (sampler._internal_dict = FrozenDict(new))")

    __setitem__ = __delitem__ = __setattr__ = __delattr__ = _readonly
    update = pop = popitem = clear = setdefault = __ior__ = _readonly

    def __reduce__(self):
        return type(self), (dict(self),)

    def __copy__(self):
        return self  # immutable

    def __deepcopy__(self, memo):
        return type(self)(copy.deepcopy(dict(self), memo))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({dict.__repr__(self)})"


def _jsonable(value: Any) -> Any:
    """Arrays and tuples as lists, as they come back from a JSON file (configs then compare equal)."""
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return value.tolist()
    if isinstance(value, tuple):
        return list(value)
    return value


def _to_json_saveable(value: Any) -> Any:
    """diffusers' to_json_saveable: arrays, paths and objects with to_dict() as JSON values."""
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return value.tolist()
    if isinstance(value, Path):
        return value.as_posix()
    if hasattr(value, "to_dict") and callable(value.to_dict):
        return value.to_dict()
    if isinstance(value, (list, tuple)):
        return [_to_json_saveable(v) for v in value]
    return value


def _config_parameters(init) -> list[inspect.Parameter]:
    """The named parameters of an __init__ (no self, no *args / **kwargs)."""
    params = list(inspect.signature(init).parameters.values())[1:]
    return [p for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def register_to_config(init):
    """Decorator for a sampler's __init__: records every argument (defaults applied) as the config.

    As diffusers' decorator: `_use_default_values` lists the keys not given by the caller; keyword
    arguments starting with "_" (e.g. `_class_name` from a file) go into the config, not to __init__;
    names in the class's `ignore_for_config` are not recorded. The config is registered before
    __init__ runs, so __init__ reads `self.config`.
    """
    params = _config_parameters(init)
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]

    @functools.wraps(init)
    def inner_init(self, *args, **kwargs):
        if not isinstance(self, ConfigMixin):
            raise RuntimeError(f"@register_to_config was applied to {type(self).__name__}.__init__, but "
                               f"{type(self).__name__} does not inherit from fastdiff's ConfigMixin")
        init_kwargs = {k: v for k, v in kwargs.items() if not k.startswith("_")}
        private = {k: v for k, v in kwargs.items() if k.startswith("_")}
        ignore = set(getattr(self, "ignore_for_config", ()))
        given = dict(zip(positional, args))
        given.update({k: v for k, v in init_kwargs.items() if k not in given})
        config = {p.name: _jsonable(given.get(p.name, p.default)) for p in params if p.name not in ignore}
        defaulted = sorted(set(config) - set(given))
        if defaulted:
            config["_use_default_values"] = defaulted
        self.register_to_config(**{**private, **config})
        init(self, *args, **init_kwargs)

    return inner_init


def _fastdiff_samplers() -> list[type]:
    """The sampler classes fastdiff exports (those of other engineers included, as they land)."""
    found = []
    for module_name in ("fastdiff", "fastdiff.samplers"):
        module = sys.modules.get(module_name) or importlib.import_module(module_name)
        for value in vars(module).values():
            if (isinstance(value, type) and issubclass(value, ConfigMixin) and value.diffusers_class_name
                    and value not in found):
                found.append(value)
    return found


def _diffusers_module(import_it: bool):
    """diffusers, if it is installed (imported only when import_it; else only when already imported)."""
    module = sys.modules.get("diffusers")
    if module is None and import_it and importlib.util.find_spec("diffusers") is not None:
        module = importlib.import_module("diffusers")
    return module


def _is_placeholder(cls) -> bool:
    """diffusers' stand-ins for classes whose optional packages are missing (metaclass DummyObject)."""
    return type(cls).__name__ == "DummyObject"


def _diffusers_version() -> str:
    try:
        return importlib.metadata.version("diffusers")
    except importlib.metadata.PackageNotFoundError:
        return DIFFUSERS_TESTED_VERSION


class _DiffusersBase:
    """Where diffusers' SchedulerMixin joins ConfigMixin's bases once diffusers is loaded (adopt_scheduler_mixin)."""


class ConfigMixin(_DiffusersBase):
    """Config surface of every sampler (diffusers' ConfigMixin + SchedulerMixin, see the module docstring)."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        _SAMPLER_MODULES.add(cls.__module__)
        _expose_scheduler_mixin()  # when diffusers was loaded first

    config_name = CONFIG_NAME
    ignore_for_config: list[str] = []
    has_compatibles = True
    _deprecated_kwargs: list[str] = []
    # Names of compatible classes (fastdiff's or diffusers'), diffusers' `_compatibles`. None: this
    # sampler's family, derived from `diffusers_class_name` (see _compatible_names).
    _compatibles: Optional[list[str]] = None
    diffusers_class_name = ""  # the diffusers scheduler this class replaces, written as `_class_name`

    # ---- the config --------------------------------------------------------------------------
    @property
    def config(self) -> FrozenConfig:
        """The config (read-only): the `_internal_dict` a pipeline may replace."""
        return self._internal_dict

    @property
    def _config(self) -> FrozenConfig:
        """Old name of `_internal_dict` (kept for code that assigns it; prefer register_to_config(key=value))."""
        return self._internal_dict

    @_config.setter
    def _config(self, value: dict) -> None:
        self._internal_dict = value if isinstance(value, FrozenConfig) else FrozenConfig(value)

    def register_to_config(self, **kwargs) -> None:
        """Merge keys into the config (a new object: samplers rebuild what they derived from it)."""
        kwargs.pop("kwargs", None)
        previous = self.__dict__.get("_internal_dict")
        self._internal_dict = FrozenConfig(kwargs if previous is None else {**previous, **kwargs})

    def __getattr__(self, name: str) -> Any:
        """Config keys as attributes, deprecated (as diffusers: a FutureWarning; use sampler.config.name)."""
        config = self.__dict__.get("_internal_dict")
        if config is not None and not name.startswith("_") and name in config:
            warnings.warn(f"Accessing config attribute `{name}` directly via '{type(self).__name__}' object attribute "
                          f"is deprecated. Please access '{name}' over '{type(self).__name__}'s config object instead, "
                          f"e.g. 'scheduler.config.{name}'.", FutureWarning, stacklevel=2)
            return config[name]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

    @classmethod
    def _config_class_name(cls) -> str:
        return cls.diffusers_class_name or cls.__name__

    # ---- compatible classes --------------------------------------------------------------------
    @classmethod
    def _compatible_names(cls) -> list[str]:
        if cls._compatibles is not None:
            names = [cls.__name__, *cls._compatibles]
        else:
            twin = cls.diffusers_class_name
            family = KARRAS_SCHEDULERS if twin in KARRAS_SCHEDULERS else ((twin,) if twin else ())
            ours = [c.__name__ for c in _fastdiff_samplers() if c.diffusers_class_name in family]
            names = [cls.__name__, *ours, *family]
        return list(dict.fromkeys(names))

    @classmethod
    def _resolve_class(cls, name: str, import_diffusers: bool) -> Optional[type]:
        """A compatible class by name: fastdiff's first, then diffusers' (None if unavailable)."""
        samplers = _fastdiff_samplers()
        for sampler in samplers:
            if sampler.__name__ == name:
                return sampler
        diffusers = _diffusers_module(import_diffusers)
        found = getattr(diffusers, name, None) if diffusers is not None else None
        return None if found is None or _is_placeholder(found) else found

    @classmethod
    def _keys_of_class_named(cls, name: str) -> set[str]:
        """Config keys of the class a config names (`_class_name`): diffusers' class when diffusers is
        imported, else the fastdiff sampler of that name or replacing it (empty if none is known)."""
        found = cls._resolve_class(name, import_diffusers=False)
        if found is None:
            found = next((s for s in _fastdiff_samplers() if s.diffusers_class_name == name), None)
        return cls._get_init_keys(found) if found is not None else set()

    @classmethod
    def _get_compatibles(cls, import_diffusers: bool = True) -> list[type]:
        classes = (cls if name == cls.__name__ else cls._resolve_class(name, import_diffusers)
                   for name in cls._compatible_names())
        return [c for c in classes if c is not None]

    @property
    def compatibles(self) -> list[type]:
        """Classes that can be built from this sampler's config with `from_config` (diffusers' contract)."""
        return self._get_compatibles()

    # ---- from_config ---------------------------------------------------------------------------
    @staticmethod
    def _get_init_keys(input_class) -> set[str]:
        return set(inspect.signature(input_class.__init__).parameters) - {"self", "args", "kwargs"}

    @classmethod
    def extract_init_dict(cls, config_dict: dict, **kwargs) -> tuple[dict, dict, dict]:
        """(init arguments, unused keys and kwargs, hidden keys to keep), as diffusers' extract_init_dict."""
        used_defaults = config_dict.get("_use_default_values", [])
        config_dict = {k: v for k, v in config_dict.items() if k not in used_defaults and k != "_use_default_values"}
        original_dict = dict(config_dict)

        expected_keys = cls._get_init_keys(cls) - set(cls.ignore_for_config)
        # Keys of compatible classes are dropped silently. diffusers' classes are consulted only when
        # diffusers is already imported (never an import for this).
        compatible = cls._get_compatibles(import_diffusers=False) if cls.has_compatibles else []
        compatible_keys = set().union(*(cls._get_init_keys(c) for c in compatible)) - expected_keys
        config_dict = {k: v for k, v in config_dict.items() if k not in compatible_keys}

        orig_cls_name = config_dict.pop("_class_name", cls.__name__)
        if isinstance(orig_cls_name, str):
            if orig_cls_name not in (cls.__name__, cls._config_class_name()):
                unexpected = cls._keys_of_class_named(orig_cls_name) - expected_keys
                config_dict = {k: v for k, v in config_dict.items() if k not in unexpected}
        elif not isinstance(orig_cls_name, (list, tuple)):
            raise ValueError("Make sure that the `_class_name` is of type string or list of string (for custom pipelines).")

        config_dict = {k: v for k, v in config_dict.items() if not k.startswith("_") and k != "quantization_config"}

        init_dict = {}
        for key in expected_keys:
            if key in kwargs:
                config_dict.pop(key, None)
                init_dict[key] = kwargs.pop(key)
            elif key in config_dict:
                init_dict[key] = config_dict.pop(key)

        if config_dict:
            logger.warning(f"The config attributes {config_dict} were passed to {cls.__name__}, but are not expected "
                           f"and will be ignored. Please verify your {cls.config_name} configuration file.")
        missing = expected_keys - set(init_dict)
        if missing:
            logger.info(f"{missing} was not found in config. Values will be initialized to default values.")
        unused_kwargs = {**config_dict, **kwargs}
        hidden_config_dict = {k: v for k, v in original_dict.items() if k not in init_dict}
        return init_dict, unused_kwargs, hidden_config_dict

    @classmethod
    def from_config(cls, config: Optional[dict] = None, return_unused_kwargs: bool = False, **kwargs):
        """Build from a config dict (ours, a diffusers scheduler's `.config`, a FrozenDict); kwargs override it.

        Returns the sampler, or (sampler, unused) with return_unused_kwargs=True. See the module
        docstring for which keys are used, kept, dropped silently or with a warning.
        """
        if "pretrained_model_name_or_path" in kwargs:
            config = kwargs.pop("pretrained_model_name_or_path")
        if config is None:
            raise ValueError("Please make sure to provide a config as the first positional argument "
                             "(e.g. pipe.scheduler.config).")
        if not isinstance(config, dict):
            if not isinstance(config, (str, os.PathLike)):
                raise TypeError(f"config must be a dict (e.g. scheduler.config), got {type(config).__name__}")
            warnings.warn("It is deprecated to pass a pretrained model name or path to `from_config`. If you were "
                          f"trying to load a scheduler, please use {cls.__name__}.from_pretrained(...) instead.",
                          FutureWarning, stacklevel=2)
            config, kwargs = cls.load_config(config, return_unused_kwargs=True, **kwargs)

        given = set(kwargs)
        init_dict, unused_kwargs, hidden_dict = cls.extract_init_dict(config, **kwargs)
        for deprecated_kwarg in cls._deprecated_kwargs:
            if deprecated_kwarg in unused_kwargs:
                init_dict[deprecated_kwarg] = unused_kwargs.pop(deprecated_kwarg)
        unknown = sorted(k for k in given if k in unused_kwargs)
        if unknown and not return_unused_kwargs:
            logger.warning(f"{cls.__name__}.from_config got keyword arguments {unknown} that it does not take; they "
                           f"are ignored (as diffusers does). Its config keys: {sorted(cls._get_init_keys(cls))}")

        sampler = cls(**init_dict)
        if "_class_name" in hidden_dict:
            hidden_dict["_class_name"] = cls._config_class_name()
        sampler.register_to_config(**hidden_dict)
        unused_kwargs = {**unused_kwargs, **hidden_dict}
        return (sampler, unused_kwargs) if return_unused_kwargs else sampler

    # ---- files -----------------------------------------------------------------------------------
    def to_json_string(self) -> str:
        """The config as diffusers writes it (plus fastdiff-only keys that differ from their default)."""
        config = dict(self.config)
        defaults = {p.name: p.default for p in _config_parameters(type(self).__init__)}
        for key in FASTDIFF_ONLY_KEYS:
            if key in config and key in defaults and config[key] == defaults[key]:
                del config[key]  # a default-only fastdiff key would make diffusers warn on load
        config["_class_name"] = self._config_class_name()
        config["_diffusers_version"] = _diffusers_version()
        for key in ("_ignore_files", "_use_default_values", "_pre_quantization_dtype"):
            config.pop(key, None)
        config = {k: _to_json_saveable(v) for k, v in config.items()}
        return json.dumps(config, indent=2, sort_keys=True) + "\n"

    def to_json_file(self, json_file_path: str | os.PathLike) -> None:
        with open(json_file_path, "w", encoding="utf-8") as writer:
            writer.write(self.to_json_string())

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string()}"

    def save_config(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs) -> str:
        """Write `scheduler_config.json` into `save_directory` (created if needed); returns its path."""
        if push_to_hub:
            raise NotImplementedError("push_to_hub: fastdiff does not upload; save_pretrained(folder), then upload the "
                                      "folder with huggingface_hub (HfApi().upload_folder)")
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory must be a folder, got the file {str(save_directory)!r}")
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, self.config_name)
        self.to_json_file(path)
        return path

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs) -> str:
        """Same as save_config (diffusers' SchedulerMixin.save_pretrained)."""
        return self.save_config(save_directory, push_to_hub=push_to_hub, **kwargs)

    @classmethod
    def load_config(cls, pretrained_model_name_or_path: str | os.PathLike, return_unused_kwargs: bool = False,
                    return_commit_hash: bool = False, **kwargs):
        """The config dict of a local `scheduler_config.json` (a file, a folder, or folder/subfolder).

        As diffusers: a folder without `subfolder/scheduler_config.json` falls back to its own
        `scheduler_config.json`. No downloads: anything else is an OSError saying so. With
        return_unused_kwargs / return_commit_hash: a tuple (config, unused kwargs, commit hash = None).
        """
        for key in _HUB_KWARGS:
            kwargs.pop(key, None)
        subfolder = kwargs.pop("subfolder", None)
        path = str(pretrained_model_name_or_path)
        if os.path.isfile(path):
            config_file = path
        elif os.path.isdir(path):
            if subfolder is not None and os.path.isfile(os.path.join(path, subfolder, cls.config_name)):
                config_file = os.path.join(path, subfolder, cls.config_name)
            elif os.path.isfile(os.path.join(path, cls.config_name)):
                config_file = os.path.join(path, cls.config_name)
            else:
                where = os.path.join(path, subfolder) if subfolder else path
                raise OSError(f"Error no file named {cls.config_name} found in directory {where}.")
        else:
            raise OSError(f"{path!r} is not a local file or folder: fastdiff loads configs from local folders only "
                          "(no downloads). For a Hub model, download it first (huggingface_hub.snapshot_download) "
                          "or load its scheduler with diffusers and pass scheduler.config to from_config.")
        try:
            with open(config_file, "r", encoding="utf-8") as reader:
                config_dict = json.loads(reader.read())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise OSError(f"It looks like the config file at '{config_file}' is not a valid JSON file.") from None
        if not isinstance(config_dict, dict):
            raise OSError(f"The config file at '{config_file}' holds a {type(config_dict).__name__}, not a JSON object.")
        if not (return_unused_kwargs or return_commit_hash):
            return config_dict
        outputs = (config_dict,)
        if return_unused_kwargs:
            outputs += (kwargs,)
        if return_commit_hash:
            outputs += (None,)
        return outputs

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike | None = None,
                        subfolder: str | None = None, return_unused_kwargs: bool = False, **kwargs):
        """Load a local folder with `scheduler_config.json` (a pipeline folder with subfolder="scheduler")."""
        if pretrained_model_name_or_path is None:
            raise ValueError("pretrained_model_name_or_path must be a local folder or file, got None")
        config, kwargs, _ = cls.load_config(pretrained_model_name_or_path, subfolder=subfolder,
                                            return_unused_kwargs=True, return_commit_hash=True, **kwargs)
        return cls.from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)


# ---- inside diffusers pipelines ----------------------------------------------------------------------
# diffusers' pipelines accept (`Pipeline.from_pretrained(..., scheduler=x)`) and save a scheduler only
# if it subclasses diffusers' SchedulerMixin. Importing diffusers costs seconds, so fastdiff does not:
# instead, the moment diffusers' scheduling utilities are loaded (before or after fastdiff),
# SchedulerMixin becomes a second base of ConfigMixin. Our own methods come first in the MRO, so only
# the class ancestry changes: every fastdiff sampler is then a SchedulerMixin for diffusers' checks.
_SCHEDULING_UTILS = "diffusers.schedulers.scheduling_utils"


_SAMPLER_MODULES: set[str] = set()  # modules defining fastdiff samplers (ConfigMixin.__init_subclass__)


def _scheduler_mixin() -> Optional[type]:
    return next((base for base in ConfigMixin.__bases__ if base is not _DiffusersBase), None)


def _expose_scheduler_mixin() -> None:
    """A saved pipeline names its scheduler's module; diffusers loads it by finding `SchedulerMixin` in
    that module and calling its from_pretrained: give every sampler module that name."""
    mixin = _scheduler_mixin()
    for name in _SAMPLER_MODULES if mixin is not None else ():
        module = sys.modules.get(name)
        if module is not None and getattr(module, "SchedulerMixin", None) is not mixin:
            module.SchedulerMixin = mixin


def adopt_scheduler_mixin(scheduling_utils) -> None:
    """Make diffusers' SchedulerMixin a base of every fastdiff sampler (idempotent; never raises: at worst
    pipelines refuse our samplers in from_pretrained, with diffusers' own error)."""
    mixin = getattr(scheduling_utils, "SchedulerMixin", None)
    if mixin is None or issubclass(ConfigMixin, mixin):
        return
    try:  # (a class whose only base is `object` cannot take a new base: hence _DiffusersBase)
        ConfigMixin.__bases__ = (_DiffusersBase, mixin)
    except TypeError as error:
        logger.warning("fastdiff samplers could not become diffusers SchedulerMixin subclasses: %s", error)
    _expose_scheduler_mixin()


class _AdoptOnImport(importlib.abc.MetaPathFinder):
    """A finder that finds nothing itself: it wraps the loader of diffusers' scheduling utilities so that
    adopt_scheduler_mixin runs right after that module executes, then removes itself."""

    def find_spec(self, name, path, target=None):
        if name != _SCHEDULING_UTILS:
            return None
        for finder in sys.meta_path:
            if finder is not self and hasattr(finder, "find_spec"):
                spec = finder.find_spec(name, path, target)
                if spec is not None:
                    break
        else:
            return None
        exec_module = spec.loader.exec_module

        def exec_and_adopt(module):
            exec_module(module)
            sys.meta_path[:] = [f for f in sys.meta_path if f is not self]
            adopt_scheduler_mixin(module)

        spec.loader.exec_module = exec_and_adopt  # this spec's loader instance only
        return spec


if _SCHEDULING_UTILS in sys.modules:
    adopt_scheduler_mixin(sys.modules[_SCHEDULING_UTILS])
else:
    sys.meta_path.insert(0, _AdoptOnImport())
