from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class SamplerOutput:
    """What `step` returns, read like diffusers' DDPMSchedulerOutput: by attribute, key or index."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None

    def to_tuple(self) -> tuple:
        return tuple(getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None)

    def __getitem__(self, key: int | str):
        return getattr(self, key) if isinstance(key, str) else self.to_tuple()[key]
