"""Small denoisers for the end-to-end benchmarks (random weights, no downloads).

TinyUNet: a tutorial-sized UNet for 1x28x28 images (MNIST-like): two resolutions, one skip,
sinusoidal time embedding added per channel. PointMLP: an MLP denoiser for 2-D points.
Both are called as model(x, t) with t a scalar or [batch] integer tensor on any device, and never
read a tensor value on the host (no sync).
"""
from __future__ import annotations

import math

import torch
from torch import nn


def time_embedding(t: torch.Tensor, batch: int, dim: int, device) -> torch.Tensor:
    """Sinusoidal embedding (Vaswani et al. 2017 / DDPM) of t, broadcast to [batch, dim]."""
    t = t.to(device=device, dtype=torch.float32).reshape(-1).expand(batch)
    freqs = torch.exp(-math.log(10000.0) * torch.arange(dim // 2, device=device, dtype=torch.float32) / (dim // 2))
    angles = t[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class TinyUNet(nn.Module):
    def __init__(self, channels: int = 1, width: int = 16, time_dim: int = 32):
        super().__init__()
        self.time_dim = time_dim
        self.time_mlp = nn.Sequential(nn.Linear(time_dim, 2 * width), nn.SiLU(), nn.Linear(2 * width, 2 * width))
        self.inp = nn.Conv2d(channels, width, 3, padding=1)
        self.down = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)  # 28 -> 14
        self.mid = nn.Conv2d(2 * width, 2 * width, 3, padding=1)
        self.up = nn.ConvTranspose2d(2 * width, width, 4, stride=2, padding=1)  # 14 -> 28
        self.out = nn.Conv2d(2 * width, channels, 3, padding=1)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.time_mlp(time_embedding(t, x.shape[0], self.time_dim, x.device))
        h1 = self.act(self.inp(x))
        h2 = self.act(self.down(h1))
        h2 = self.act(self.mid(h2 + emb[:, :, None, None]))
        h3 = self.act(self.up(h2))
        return self.out(torch.cat([h3, h1], dim=1))


class PointMLP(nn.Module):
    def __init__(self, dim: int = 2, hidden: int = 128, time_dim: int = 32):
        super().__init__()
        self.time_dim = time_dim
        self.net = nn.Sequential(nn.Linear(dim + time_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x, time_embedding(t, x.shape[0], self.time_dim, x.device)], dim=1))


MODELS = {  # name -> (constructor, sample shape)
    "unet28": (TinyUNet, (4, 1, 28, 28)),
    "mlp2d": (PointMLP, (1024, 2)),
}


def make_model(name: str, device: str) -> tuple[nn.Module, tuple[int, ...]]:
    build, shape = MODELS[name]
    torch.manual_seed(0)
    return build().to(device).eval(), shape
