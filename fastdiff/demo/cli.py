"""`python -m fastdiff.demo`: train a small denoiser on 8x8 digits, sample it with fastdiff, write
pictures and a timing table. Every step prints what it did; the files land in --out."""
from __future__ import annotations

import argparse
import importlib.util
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import DDIMSampler, DDPMSampler
from ..loop import sample
from . import figures
from .data import IMAGE_SHAPE, NUM_CLASSES, load_digits_tensors
from .model import NULL_LABEL, DigitDenoiser
from .timing import SamplingJob, markdown_table, timing_rows
from .train import TrainSettings, checkpoint_key, load_checkpoint, save_checkpoint, train

SAMPLERS = {"ddpm": DDPMSampler, "ddim": DDIMSampler}
# A cosine schedule (Nichol & Dhariwal 2021) suits tiny images: linear betas destroy 8x8 digits too early.
SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
FORWARD_TIMESTEPS = (0, 50, 150, 300, 500, 700, 999)


@dataclass(frozen=True)
class DemoSize:
    train_steps: int
    sample_steps: int
    num_samples: int
    channels: int
    num_blocks: int


DEFAULT = DemoSize(train_steps=2000, sample_steps=100, num_samples=60, channels=32, num_blocks=3)
SMOKE = DemoSize(train_steps=20, sample_steps=4, num_samples=10, channels=8, num_blocks=1)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m fastdiff.demo", description=__doc__)
    parser.add_argument("--steps", type=int, help=f"training steps (default {DEFAULT.train_steps}, "
                                                   f"about 2 minutes on one CPU core)")
    parser.add_argument("--sample-steps", type=int, help=f"denoising steps (default {DEFAULT.sample_steps})")
    parser.add_argument("--sampler", choices=sorted(SAMPLERS), default="ddpm")
    parser.add_argument("--num-samples", type=int, help=f"images to sample (default {DEFAULT.num_samples})")
    parser.add_argument("--guidance-scale", type=float, default=2.0,
                        help="classifier-free guidance on the digit label (column i shows digit i %% 10); "
                             "0 = unconditional samples (default 2.0)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for torch (default 1: these tensors are too small to share)")
    parser.add_argument("--out", type=Path, default=Path("outputs/demo"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--retrain", action="store_true", help="train even when out/model.pt is compatible")
    parser.add_argument("--no-diffusers", action="store_true", help="leave diffusers out of the timing table")
    parser.add_argument("--smoke", action="store_true", help="tiny settings (a few seconds), for tests")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    size = SMOKE if args.smoke else DEFAULT
    args.steps = args.steps if args.steps is not None else size.train_steps
    args.sample_steps = args.sample_steps if args.sample_steps is not None else size.sample_steps
    args.num_samples = args.num_samples if args.num_samples is not None else size.num_samples
    args.size = size
    for name in ("steps", "sample_steps", "num_samples", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.guidance_scale < 0:
        parser.error(f"--guidance-scale must be >= 0, got {args.guidance_scale}")
    return args


def trained_model(args, sampler, images, labels, device) -> tuple[DigitDenoiser, list[float]]:
    """The checkpoint in --out when it was trained with these settings, else a fresh training run."""
    torch.manual_seed(args.seed)
    model = DigitDenoiser(channels=args.size.channels, num_blocks=args.size.num_blocks, num_classes=NUM_CLASSES)
    settings = TrainSettings(steps=args.steps, seed=args.seed)
    key = checkpoint_key(model, sampler, settings)
    path = args.out / "model.pt"
    losses, message = (None, "--retrain given") if args.retrain else load_checkpoint(path, model, key)
    if losses is not None:
        print(f"[train] {message}; pass --retrain to train again")
        return model.to(device).eval(), losses
    print(f"[train] {message}: training {args.steps} steps on {device} "
          f"({sum(p.numel() for p in model.parameters()):,} parameters, batch {settings.batch_size})")
    start = time.perf_counter()
    ema, losses = train(model.to(device), sampler, images, labels, settings, progress=not args.no_progress)
    tail = losses[-50:]
    print(f"[train] done in {time.perf_counter() - start:.1f} s, final loss {sum(tail) / len(tail):.4f} "
          f"(mean of the last {len(tail)} steps); saved {path}")
    save_checkpoint(path, ema, key, losses)
    return ema, losses


def sampling_job(args, model, sampler, device) -> SamplingJob:
    shape = (args.num_samples, *IMAGE_SHAPE)
    if args.guidance_scale == 0:
        return SamplingJob(model, sampler, shape, args.sample_steps, args.seed, device)
    labels = torch.arange(args.num_samples) % NUM_CLASSES  # grid column i shows digit i % 10
    return SamplingJob(model, sampler, shape, args.sample_steps, args.seed, device, args.guidance_scale, labels,
                       torch.full_like(labels, NULL_LABEL))


def forward_process_rows(sampler, images, seed) -> list[tuple[int, torch.Tensor]]:
    x0 = images[:: len(images) // 6][:6]  # six different digits
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    return [(t, sampler.add_noise(x0, noise, torch.tensor([t]))) for t in FORWARD_TIMESTEPS]


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    columns = NUM_CLASSES if args.guidance_scale > 0 else None
    sampler = SAMPLERS[args.sampler](**SCHEDULE)
    images, labels = load_digits_tensors()
    print(f"[data] scikit-learn digits: {len(images)} images of 8x8, scaled to [-1, 1]")

    model, losses = trained_model(args, sampler, images, labels, device)

    job = sampling_job(args, model, sampler, device)
    guidance = f"classifier-free guidance {args.guidance_scale} on the digit label" if job.guidance_scale \
        else "unconditional"
    print(f"[sample] {args.num_samples} samples, {args.sampler} with {args.sample_steps} steps, {guidance}, "
          f"seed {args.seed}; timing each sampling loop")
    include_diffusers = not args.no_diffusers and importlib.util.find_spec("diffusers") is not None
    if not args.no_diffusers and not include_diffusers:
        print("[sample] diffusers is not installed: its row is left out of the timing table")
    rows, samples = timing_rows(job, include_diffusers=include_diffusers)
    table = markdown_table(rows)
    _, trajectory = sample(model, sampler, job.shape, num_inference_steps=args.sample_steps, seed=args.seed,
                           device=device, return_trajectory=True, progress=not args.no_progress, **job.model_kwargs())

    written = [
        figures.save_grid(samples, args.out / "samples.png", columns),
        figures.save_reverse_gif(trajectory, args.out / "reverse_process.gif", columns),
        figures.save_forward_figure(forward_process_rows(sampler, images, args.seed), args.out / "forward_process.png"),
        figures.save_loss_curve(losses, args.out / "loss_curve.png"),
    ]
    timing_path = args.out / "timing.md"
    header = (f"Sampling {args.num_samples} digits, {args.sampler} {args.sample_steps} steps, {guidance}, on "
              f"{device} ({torch.get_num_threads()} CPU threads). Time includes the denoiser; best of 3 runs after a warm-up.")
    timing_path.write_text(header + "\n\n" + table + "\n")
    print("\n" + header + "\n" + table + "\n")
    print("[files] " + ", ".join(str(p) for p in [*written, timing_path, args.out / "model.pt"]))
    return 0
