"""`python -m fastdiff.demo.swiss_roll`: the 2-D swiss roll of Sohl-Dickstein et al. 2015 ("Deep
Unsupervised Learning using Nonequilibrium Thermodynamics", fig. 1), trained and sampled with fastdiff.

T = 40 steps of the paper's sigmoid schedule (betas in [1e-5, 0.3]); a model that outputs the mean
and log-variance of each reverse step (a shared trunk, one tail per timestep, as their released
code), trained on the closed-form KL of the variational bound (`diffusion_loss(loss="kl")`), and
sampled by `fastdiff.sample` with DDPMSampler(prediction_type="mean",
variance_type="learned_log_variance"), all 40 steps. Writes to --out: swiss_roll.png (the paper's
2x3 figure: the data diffused to t = 0, T/2, T on top, the model's reverse trajectory at the same
t below), reverse_process.gif, loss_curve.png and samples.npy; prints a sample-quality number: the
mean distance from each sample to its nearest point of a large fresh draw of the roll, next to the
same number for Gaussian noise and for fresh data. Needs scikit-learn and matplotlib (pillow for
the GIF).
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..loop import sample
from .figures import pyplot, save_loss_curve
from .swiss_roll_model import SwissRollModel, TrainSettings, make_sampler, train

T_STEPS = 40  # the paper's trajectory length for the swiss roll
REFERENCE_POINTS = 20_000  # the fresh draw of the roll that sample quality is measured against


@dataclass(frozen=True)
class RollSize:
    train_steps: int
    batch_size: int
    hidden: int
    tail_hidden: int
    num_samples: int


DEFAULT = RollSize(train_steps=1500, batch_size=1040, hidden=64, tail_hidden=32, num_samples=2000)
SMOKE = RollSize(train_steps=20, batch_size=240, hidden=16, tail_hidden=8, num_samples=1000)


def swiss_roll(n: int, seed: int) -> torch.Tensor:
    """[n, 2] float32 points of scikit-learn's swiss roll: columns [2, 0] / 10, the second negated
    (the 2-D view and scale of the 2015 paper's figure)."""
    from sklearn.datasets import make_swiss_roll  # imported here: only the demo needs scikit-learn

    points, _ = make_swiss_roll(n, random_state=seed)
    return torch.tensor(points[:, [2, 0]] / 10.0 * np.array([1.0, -1.0]), dtype=torch.float32)


def nearest_distance(points: torch.Tensor, reference: torch.Tensor, chunk: int = 1024) -> float:
    """Mean Euclidean distance from each point to its nearest neighbour in `reference`."""
    best = [torch.cdist(points[i:i + chunk].double(), reference.double()).min(dim=1).values
            for i in range(0, len(points), chunk)]
    return float(torch.cat(best).mean())


def quality(samples: torch.Tensor, seed: int) -> dict[str, float]:
    """Mean nearest-data-point distance of the samples, of as many N(0, I) points and of as many fresh
    data points (the floor: the roll has no noise, so only the reference's spacing remains)."""
    generator = torch.Generator().manual_seed(seed + 3)
    reference = swiss_roll(REFERENCE_POINTS, seed + 1)
    n = len(samples)
    return {"samples": nearest_distance(samples, reference),
            "gaussian_noise": nearest_distance(torch.randn(n, 2, generator=generator), reference),
            "fresh_data": nearest_distance(swiss_roll(n, seed + 2), reference)}


def train_and_sample(size: RollSize, seed: int = 0, progress: bool = True, data_points: int = 100_000):
    """(model, losses, trajectory [x_T, ..., x_0]) of one run: train on the KL, sample all 40 steps."""
    torch.manual_seed(seed)
    sampler = make_sampler(T_STEPS)
    data = swiss_roll(data_points, seed)
    model = SwissRollModel(sampler.betas, hidden=size.hidden, tail_hidden=size.tail_hidden)
    settings = TrainSettings(steps=size.train_steps, batch_size=size.batch_size, seed=seed)
    losses = train(model, sampler, data, settings, progress=progress)
    with torch.no_grad():
        _, trajectory = sample(model, sampler, (size.num_samples, 2), num_inference_steps=T_STEPS, seed=seed,
                               return_trajectory=True, progress=progress)
    return model, losses, trajectory


# ---- figures ------------------------------------------------------------------------------------
LIMITS = (-2.0, 2.0)


def _style(ax) -> None:
    ax.set_xlim(*LIMITS)
    ax.set_ylim(*LIMITS)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])


def save_paper_figure(forward: list[torch.Tensor], reverse: list[torch.Tensor], path: Path) -> Path:
    """The 2015 paper's fig. 1 layout: q (data diffused) at t = 0, T/2, T on top, p (samples) below."""
    plt = pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(9, 6.3))
    titles = ("t = 0", "t = T/2", "t = T")
    for row, (points, color, label) in enumerate(((forward, "C0", "data  q(x_t)"), (reverse, "C3", "model  p(x_t)"))):
        for column, x in enumerate(points):
            ax = axes[row][column]
            ax.scatter(x[:, 0].numpy(), x[:, 1].numpy(), s=1.5, alpha=0.25, color=color, linewidths=0)
            _style(ax)
            if row == 0:
                ax.set_title(titles[column])
        axes[row][0].set_ylabel(label, fontsize=11)
    fig.suptitle(f"swiss roll, T = {T_STEPS} (Sohl-Dickstein et al. 2015, fig. 1), sampled with fastdiff")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def save_reverse_gif(trajectory: list[torch.Tensor], path: Path, hold_last_ms: int = 1500) -> Path:
    """The reverse process x_T -> x_0 as a GIF, one frame per step (the last one held)."""
    from PIL import Image

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(3.6, 3.8))
    _style(ax)
    dots = ax.scatter(trajectory[0][:, 0].numpy(), trajectory[0][:, 1].numpy(), s=1.5, alpha=0.35, color="C3",
                      linewidths=0)
    frames = []
    for i, x in enumerate(trajectory):
        dots.set_offsets(x.numpy())
        ax.set_title(f"reverse process, t = {len(trajectory) - 1 - i}", fontsize=10)
        fig.canvas.draw()
        frames.append(Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()))
    plt.close(fig)
    durations = [120] * (len(frames) - 1) + [hold_last_ms]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=durations, loop=0)
    return path


# ---- the command --------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m fastdiff.demo.swiss_roll", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("outputs/swiss_roll"))
    parser.add_argument("--smoke", action="store_true", help="tiny settings (a few seconds), for tests")
    parser.add_argument("--steps", type=int, help=f"training steps (default {DEFAULT.train_steps})")
    parser.add_argument("--num-samples", type=int, help=f"points to sample (default {DEFAULT.num_samples})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for torch (default 1: these tensors are too small to share)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    size = SMOKE if args.smoke else DEFAULT
    steps = args.steps if args.steps is not None else size.train_steps
    num_samples = args.num_samples if args.num_samples is not None else size.num_samples
    for name, value in (("steps", steps), ("num-samples", num_samples), ("threads", args.threads)):
        if value < 1:
            parser.error(f"--{name} must be >= 1, got {value}")
    args.size = RollSize(steps, size.batch_size, size.hidden, size.tail_hidden, num_samples)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args, start)
    finally:
        torch.set_num_threads(threads)


def _run(args, start: float) -> int:
    size = args.size
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"[data] scikit-learn make_swiss_roll, columns [2, 0] / 10 with the second negated "
          f"(100,000 training points, seed {args.seed})")
    print(f"[train] {size.train_steps} steps, batch {size.batch_size}: shared trunk ({size.hidden} wide) + "
          f"{T_STEPS} per-timestep tails -> (mean, log variance); loss = diffusion_loss(loss='kl'), "
          f"sigmoid_2015 betas, T = {T_STEPS}")
    began = time.perf_counter()
    _, losses, trajectory = train_and_sample(size, args.seed, progress=not args.no_progress)
    trained = time.perf_counter() - began
    tail = losses[-100:]
    print(f"[train+sample] {trained:.1f} s; final loss {sum(tail) / len(tail):.4f} nats/dim (mean of the last "
          f"{len(tail)} steps)")
    print(f"[sample] {size.num_samples} points with fastdiff.sample: DDPMSampler(prediction_type='mean', "
          f"variance_type='learned_log_variance'), all {T_STEPS} steps, seed {args.seed}")

    samples = trajectory[-1]
    data = swiss_roll(size.num_samples, args.seed + 4)
    sampler = make_sampler(T_STEPS)
    noise = torch.randn(data.shape, generator=torch.Generator().manual_seed(args.seed + 5))
    forward = [data] + [sampler.add_noise(data, noise, torch.tensor([t])) for t in (T_STEPS // 2 - 1, T_STEPS - 1)]
    reverse = [trajectory[T_STEPS], trajectory[T_STEPS // 2], trajectory[0]]  # x at t = 0, T/2, T
    samples_path = args.out / "samples.npy"
    np.save(samples_path, samples.numpy())
    written = [
        save_paper_figure(forward, reverse, args.out / "swiss_roll.png"),
        save_reverse_gif(trajectory, args.out / "reverse_process.gif"),
        save_loss_curve(losses, args.out / "loss_curve.png", ylabel="KL (NLL at t = 0), nats / dim",
                        title="training loss: the variational bound's terms", log_scale=False),
        samples_path,
    ]
    numbers = quality(samples, args.seed)
    print(f"[quality] mean distance to the nearest of {REFERENCE_POINTS:,} fresh roll points: "
          f"samples {numbers['samples']:.4f}, Gaussian noise {numbers['gaussian_noise']:.4f}, "
          f"fresh data {numbers['fresh_data']:.4f} (lower is better)")
    print("[files] " + ", ".join(str(p) for p in written))
    print(f"[done] {time.perf_counter() - start:.1f} s in all")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
