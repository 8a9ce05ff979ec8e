"""diffusers-compatible configs: `config`, `from_config`, `save_config` / `save_pretrained`,
`from_pretrained` on a local folder, with the same `scheduler_config.json` diffusers reads and writes."""
from __future__ import annotations

import functools
import inspect
import json
import os
from typing import Any

import numpy as np
import torch

CONFIG_NAME = "scheduler_config.json"


class FrozenConfig(dict):
    """A read-only dict with attribute access, like diffusers' FrozenDict."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"config has no key {name!r}") from None

    def _readonly(self, *args, **kwargs):
        raise TypeError("a sampler's config is read-only: build a new one with from_config(config, key=value)")

    __setitem__ = __delitem__ = update = pop = setdefault = _readonly


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return value.tolist()
    if isinstance(value, tuple):
        return list(value)
    return value


def register_to_config(init):
    """Decorator for __init__: records every argument (defaults applied) as the frozen config."""
    signature = inspect.signature(init)

    @functools.wraps(init)
    def wrapper(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        self._config = FrozenConfig({k: _jsonable(v) for k, v in bound.arguments.items() if k != "self"})
        init(self, *args, **kwargs)

    return wrapper


class ConfigMixin:
    config_name = CONFIG_NAME
    diffusers_class_name = ""  # the diffusers scheduler this class replaces, written as `_class_name`

    @property
    def config(self) -> FrozenConfig:
        return self._config

    @classmethod
    def _init_keys(cls) -> set[str]:
        return set(inspect.signature(cls.__init__).parameters) - {"self"}

    @classmethod
    def from_config(cls, config: dict | None = None, **kwargs):
        """Build from a config dict (ours or a diffusers scheduler's); kwargs override it.

        Keys the class does not take (`_class_name`, another scheduler's options) are ignored, as
        in diffusers; unknown keyword arguments are an error.
        """
        if config is not None and not isinstance(config, dict):
            raise TypeError(f"config must be a dict (e.g. scheduler.config), got {type(config).__name__}")
        keys = cls._init_keys()
        unknown = sorted(set(kwargs) - keys)
        if unknown:
            raise TypeError(f"{cls.__name__}.from_config got unknown arguments {unknown}; allowed: {sorted(keys)}")
        init = {k: v for k, v in (config or {}).items() if k in keys}
        init.update(kwargs)
        return cls(**init)

    def save_config(self, save_directory: str | os.PathLike, **_ignored) -> str:
        """Write `scheduler_config.json` into `save_directory` (created if needed); returns its path."""
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory must be a folder, got the file {str(save_directory)!r}")
        os.makedirs(save_directory, exist_ok=True)
        from .. import __version__

        data = {"_class_name": self.diffusers_class_name, "_fastdiff_class_name": type(self).__name__,
                "_fastdiff_version": __version__, **self.config}
        path = os.path.join(save_directory, self.config_name)
        with open(path, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
        return path

    save_pretrained = save_config

    @classmethod
    def load_config(cls, pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None) -> dict:
        folder = os.path.join(pretrained_model_name_or_path, subfolder or "")
        path = os.path.join(folder, cls.config_name) if os.path.isdir(folder) else str(folder)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"no {cls.config_name} at {path!r}: fastdiff reads local folders only (no downloads); "
                "for a Hub model, load its scheduler with diffusers and pass `.config` to from_config")
        with open(path) as f:
            return json.load(f)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None, **kwargs):
        """Load a local folder holding `scheduler_config.json` (a pipeline folder with subfolder="scheduler")."""
        return cls.from_config(cls.load_config(pretrained_model_name_or_path, subfolder), **kwargs)
