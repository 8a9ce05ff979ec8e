"""The demo's denoiser: a small convolutional net for 8x8 digits, conditioned on the timestep and
(optionally) the digit label. Label NULL_LABEL (= 10) means "no label": trained by dropping labels
at random, it gives the unconditional prediction that classifier-free guidance needs."""
from __future__ import annotations

import math

import torch
from torch import nn

NULL_LABEL = 10


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps (Vaswani et al. 2017, as in DDPM), [B] -> [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the (time + label) embedding added in between (DDPM's block)."""

    def __init__(self, channels: int, emb_dim: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(8, channels), nn.Conv2d(channels, channels, 3, padding=1)
        self.emb = nn.Linear(emb_dim, channels)
        self.norm2, self.conv2 = nn.GroupNorm(8, channels), nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(nn.functional.silu(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(nn.functional.silu(self.norm2(h)))
        return x + h


class DigitDenoiser(nn.Module):
    """Predicts the noise of an 8x8 image. `labels` None = unconditional (NULL_LABEL)."""

    def __init__(self, channels: int = 64, num_blocks: int = 4, emb_dim: int = 128, num_classes: int = 10):
        super().__init__()
        self.config = dict(channels=channels, num_blocks=num_blocks, emb_dim=emb_dim, num_classes=num_classes)
        self.emb_dim = emb_dim
        self.time_mlp = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_embedding = nn.Embedding(num_classes + 1, emb_dim)  # + 1: the null label
        self.conv_in = nn.Conv2d(1, channels, 3, padding=1)
        self.blocks = nn.ModuleList(ResBlock(channels, emb_dim) for _ in range(num_blocks))
        self.norm_out = nn.GroupNorm(8, channels)
        self.conv_out = nn.Conv2d(channels, 1, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if labels is None:
            labels = torch.full((x.shape[0],), NULL_LABEL, device=x.device, dtype=torch.int64)
        emb = nn.functional.silu(self.time_mlp(timestep_embedding(t, self.emb_dim)) + self.label_embedding(labels))
        h = self.conv_in(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.conv_out(nn.functional.silu(self.norm_out(h)))
