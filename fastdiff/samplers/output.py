"""What `step` returns: read like diffusers' BaseOutput (utils/outputs.py), built like a plain object.

diffusers' BaseOutput is an OrderedDict dataclass whose fields that are None are left out of the
dict view. SamplerOutput gives the same reading surface: `out.prev_sample`, `out[0]`,
`out["prev_sample"]`, `keys()`, `values()`, `items()`, `to_tuple()`, `len()`, `in`, iteration
over the keys, fields assignable by attribute or key, `pop` / `update` / `setdefault` / `del`
raising, registered as a torch pytree node. None fields are skipped everywhere but attribute
access: with `pred_original_sample=None`, `out[1]` is an IndexError and `out["pred_original_sample"]`
a KeyError, as in diffusers. It is not a dict subclass (`isinstance(out, dict)` is False): a step
returns one per call, and a slotted dataclass costs a few hundred nanoseconds to build where
BaseOutput's __post_init__ costs several microseconds (tests/test_sampler_api.py measures it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
import torch.utils._pytree as pytree


@dataclass(eq=False, slots=True)
class SamplerOutput:
    """Output of a sampler's `step` (diffusers' DDPMSchedulerOutput / SchedulerOutput fields).

    prev_sample: the sample at the previous timestep, the next loop input.
    pred_original_sample: the predicted x0, when the diffusers twin returns it (else None).
    """

    prev_sample: torch.Tensor
    pred_original_sample: Optional[torch.Tensor] = None

    _FIELDS = ("prev_sample", "pred_original_sample")  # not a field: no annotation

    def keys(self) -> list[str]:
        return [name for name in self._FIELDS if getattr(self, name) is not None]

    def values(self) -> list[Any]:
        return [value for value in (self.prev_sample, self.pred_original_sample) if value is not None]

    def items(self) -> list[tuple[str, Any]]:
        return [(name, getattr(self, name)) for name in self.keys()]

    def to_tuple(self) -> tuple:
        """The fields that are not None, in order (diffusers' BaseOutput.to_tuple)."""
        x0 = self.pred_original_sample
        return (self.prev_sample,) if x0 is None else (self.prev_sample, x0)

    def __getitem__(self, key):
        if isinstance(key, str):
            value = getattr(self, key, None) if key in self._FIELDS else None
            if value is None:
                raise KeyError(key)
            return value
        return self.to_tuple()[key]

    def __setitem__(self, key: str, value: Any) -> None:
        if key not in self._FIELDS:
            raise KeyError(f"{type(self).__name__} has no field {key!r}; fields: {list(self._FIELDS)}")
        setattr(self, key, value)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())  # like a dict (and BaseOutput): the keys. Unpack with to_tuple().

    def __len__(self) -> int:
        return len(self.keys())

    def __contains__(self, key: object) -> bool:
        return key in self.keys()

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default

    def _readonly(self, *args, **kwargs):
        raise Exception(f"You cannot use this method on a {type(self).__name__} instance (as diffusers' BaseOutput).")

    __delitem__ = pop = update = setdefault = _readonly


pytree.register_pytree_node(
    SamplerOutput,
    lambda out: ([out.prev_sample, out.pred_original_sample], None),
    lambda values, context: SamplerOutput(*values),
    serialized_type_name=f"{SamplerOutput.__module__}.{SamplerOutput.__name__}",
)
