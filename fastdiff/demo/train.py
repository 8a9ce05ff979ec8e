"""Training the demo's denoiser with fastdiff.training.diffusion_loss, and its checkpoint."""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..samplers.base import BaseSampler
from ..training import diffusion_loss
from .data import batches
from .model import NULL_LABEL, DigitDenoiser

CHECKPOINT_FORMAT = 1


@dataclass(frozen=True)
class TrainSettings:
    steps: int
    batch_size: int = 128
    learning_rate: float = 2e-3
    label_dropout: float = 0.1  # how often the label is replaced by NULL_LABEL: teaches the unconditional model for CFG
    ema_decay: float = 0.99  # samples come from an exponential moving average of the weights (smoother, better)
    seed: int = 0


def train(model: DigitDenoiser, sampler: BaseSampler, images: torch.Tensor, labels: torch.Tensor,
          settings: TrainSettings, progress: bool = True) -> tuple[DigitDenoiser, list[float]]:
    """AdamW with warm-up + cosine decay; returns (EMA model in eval mode, loss per step)."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(settings.seed)
    ema = copy.deepcopy(model).eval()
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(warmup_cosine, total=settings.steps))
    data = batches(images, labels, settings.batch_size, generator)
    losses = []  # device scalars: reading each one would wait for the device every step
    bar = tqdm(range(settings.steps), desc="training", disable=not progress)
    for step in bar:
        x0, y = (t.to(device) for t in next(data))
        dropped = torch.rand(y.shape, generator=generator) < settings.label_dropout
        y = torch.where(dropped.to(device), torch.full_like(y, NULL_LABEL), y)
        # seed=: the noise of step s comes from the in-kernel Philox stream; runs are repeatable.
        loss = diffusion_loss(model, x0, sampler, cond={"labels": y}, seed=settings.seed * 1_000_003 + step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        update_ema(ema, model, settings.ema_decay)
        losses.append(loss.detach())
        if step % 50 == 0 or step == settings.steps - 1:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    return ema, torch.stack(losses).cpu().tolist()


def warmup_cosine(step: int, total: int) -> float:
    """Learning-rate factor: linear warm-up over the first 5% of steps, then cosine decay to 0."""
    warmup = max(1, total // 20)
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for averaged, current in zip(ema.parameters(), model.parameters()):
        averaged.lerp_(current, 1.0 - decay)


def checkpoint_key(model: DigitDenoiser, sampler: BaseSampler, settings: TrainSettings) -> dict:
    """Everything that decides the trained weights: a checkpoint is reused only when this matches."""
    sampler_config = {k: v for k, v in sampler.config.items() if not k.startswith("_")}  # not _use_default_values
    return {"format": CHECKPOINT_FORMAT, "model": dict(model.config), "sampler": sampler_config,
            "train": asdict(settings)}


def save_checkpoint(path: Path, ema: DigitDenoiser, key: dict, losses: list[float]) -> None:
    torch.save({"key": key, "state_dict": ema.state_dict(), "losses": losses}, path)


def load_checkpoint(path: Path, model: DigitDenoiser, key: dict) -> tuple[list[float] | None, str]:
    """(losses, message) after loading compatible weights into `model`; (None, why not) otherwise."""
    if not path.exists():
        return None, f"no checkpoint at {path}"
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file: train again rather than fail
        return None, f"could not read {path} ({type(error).__name__}: {error})"
    if saved.get("key") != key:
        differs = sorted(k for k in key if saved.get("key", {}).get(k) != key[k])
        return None, f"checkpoint {path} was trained with other settings ({', '.join(differs)} differ)"
    model.load_state_dict(saved["state_dict"])
    return saved["losses"], f"reused checkpoint {path} (same model, schedule and training settings)"
