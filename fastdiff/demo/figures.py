"""The demo's pictures: sample grid (PNG), reverse-process GIF, forward-process figure, loss curve."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

PIXELS_PER_CELL = 32  # an 8x8 digit is drawn 32x larger (nearest neighbour: crisp pixels)
GAP = 4  # pixels between cells of a grid


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] images [B, 1, H, W] -> uint8 [B, H, W] (white digits on black, as the data)."""
    pixels = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round()
    return pixels[:, 0].to(torch.uint8).numpy()


def grid(images: torch.Tensor, columns: int | None = None) -> np.ndarray:
    """A uint8 image of the batch laid out in rows, each cell enlarged PIXELS_PER_CELL times."""
    cells = to_uint8(images)
    count, height, width = cells.shape
    columns = columns or math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    cell_h, cell_w = height * PIXELS_PER_CELL // 8, width * PIXELS_PER_CELL // 8
    canvas = np.full((rows * (cell_h + GAP) + GAP, columns * (cell_w + GAP) + GAP), 64, dtype=np.uint8)
    for index, cell in enumerate(cells):
        r, c = divmod(index, columns)
        big = cell.repeat(cell_h // height, axis=0).repeat(cell_w // width, axis=1)
        top, left = GAP + r * (cell_h + GAP), GAP + c * (cell_w + GAP)
        canvas[top:top + big.shape[0], left:left + big.shape[1]] = big
    return canvas


def save_grid(images: torch.Tensor, path: Path, columns: int | None = None) -> Path:
    from PIL import Image

    Image.fromarray(grid(images, columns)).save(path)
    return path


def save_reverse_gif(trajectory: Sequence[torch.Tensor], path: Path, columns: int | None = None,
                     max_frames: int = 40, hold_last_ms: int = 1500) -> Path:
    """The reverse process x_T -> x_0 as a GIF: up to `max_frames` evenly spaced frames, last one held."""
    from PIL import Image

    picks = np.unique(np.linspace(0, len(trajectory) - 1, min(max_frames, len(trajectory))).round().astype(int))
    frames = [Image.fromarray(grid(trajectory[i], columns)) for i in picks]
    durations = [80] * (len(frames) - 1) + [hold_last_ms]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=durations, loop=0)
    return path


def pyplot():
    """matplotlib.pyplot on the file-only backend (no display needed); imported when a figure is drawn."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_forward_figure(rows: Sequence[tuple[int, torch.Tensor]], path: Path) -> Path:
    """One column per timestep t: the same digits noised to x_t (q(x_t | x_0), DDPM eq. 4)."""
    plt = pyplot()

    count = rows[0][1].shape[0]
    fig, axes = plt.subplots(count, len(rows), figsize=(1.3 * len(rows), 1.3 * count + 0.4), squeeze=False)
    for column, (t, images) in enumerate(rows):
        for row, cell in enumerate(to_uint8(images)):
            axes[row][column].imshow(cell, cmap="gray", vmin=0, vmax=255)
            axes[row][column].axis("off")
        axes[0][column].set_title(f"t = {t}", fontsize=9)
    fig.suptitle("forward process q(x_t | x_0)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def save_loss_curve(losses: Sequence[float], path: Path, *, ylabel: str = "MSE (noise prediction)",
                    title: str = "training loss", log_scale: bool = True) -> Path:
    """Loss per training step (grey) and its running mean. Without `log_scale`, the y range leaves out
    the extreme 0.5% at each end (a variational bound's first steps are far above the rest)."""
    plt = pyplot()
    values = np.asarray(losses, dtype=np.float64)
    window = max(1, len(values) // 50)
    smooth = np.convolve(values, np.ones(window) / window, mode="valid")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(values, color="0.8", linewidth=0.8, label="per step")
    ax.plot(np.arange(window - 1, len(values)), smooth, color="C0", label=f"mean of {window}")
    if log_scale:
        ax.set_yscale("log")
    else:
        low, high = np.percentile(values, [0.5, 99.5]) if len(values) > 20 else (values.min(), values.max())
        pad = 0.1 * (high - low) + 1e-6
        ax.set_ylim(low - pad, high + pad)
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
