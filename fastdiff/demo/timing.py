"""The demo's sampling-time table: the same sampling run by diffusers' scheduler loop, by fastdiff's
eager reference backend and by fastdiff's default backend (and a CUDA graph on a GPU), with the
largest difference between runs that should agree."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from .. import backends
from ..loop import sample
from ..samplers.base import BaseSampler

BACKEND_OF_MODULE = {"fastdiff.kernels": "triton", "fastdiff._cpp": "cpp", "fastdiff.eager": "reference"}


@dataclass
class SamplingJob:
    """One sampling run's inputs: the same for every row of the table."""
    model: Callable
    sampler: BaseSampler
    shape: tuple[int, ...]
    steps: int
    seed: int
    device: torch.device
    guidance_scale: float | None = None
    labels: torch.Tensor | None = None
    null_labels: torch.Tensor | None = None

    def model_kwargs(self) -> dict:
        if self.guidance_scale is not None:
            return dict(guidance_scale=self.guidance_scale, cond={"labels": self.labels},
                        uncond={"labels": self.null_labels})
        return {"cond": {"labels": self.labels}} if self.labels is not None else {}


@dataclass
class Row:
    method: str
    seconds: float
    steps: int
    compared_with: str = ""
    max_abs_diff: float | None = None


def default_backend(device: torch.device) -> str:
    module = backends.select("step", torch.empty(0, device=device))
    return BACKEND_OF_MODULE.get(module.__name__, module.__name__)


REPEATS = 3  # each row is the best of this many identical runs: a shared machine's noise only adds time


def _timed(run: Callable[[], torch.Tensor], device: torch.device) -> tuple[torch.Tensor, float]:
    """(the first run's result, the fastest of REPEATS runs in seconds); `run` must be repeatable."""
    results, best = [], float("inf")
    for _ in range(REPEATS):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        results.append(run())
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return results[0], best


def run_fastdiff(job: SamplingJob, backend: str | None = None, cuda_graph: bool = False,
                 generator_seed: int | None = None) -> tuple[torch.Tensor, float]:
    """fastdiff.loop.sample on `backend` (None: the default), after an untimed 2-step warm-up."""
    def noise() -> dict:  # a fresh generator per run, so every timed run samples the same thing
        return {"generator": torch.Generator().manual_seed(generator_seed)} if generator_seed is not None else {
            "seed": job.seed}

    with backends.forced(backend):
        sample(job.model, job.sampler, job.shape, num_inference_steps=2, device=job.device, progress=False,
               cuda_graph=cuda_graph, seed=job.seed, **job.model_kwargs())
        return _timed(lambda: sample(job.model, job.sampler, job.shape, num_inference_steps=job.steps,
                                     device=job.device, progress=False, cuda_graph=cuda_graph, **noise(),
                                     **job.model_kwargs()), job.device)


def run_diffusers(job: SamplingJob, generator_seed: int) -> tuple[torch.Tensor, float]:
    """The loop a diffusers user writes, with diffusers' own scheduler (CFG as two halves of one batch)."""
    import diffusers

    scheduler = getattr(diffusers, job.sampler.diffusers_class_name).from_config(dict(job.sampler.config))
    kwargs = job.model_kwargs()
    labels = torch.cat([kwargs["uncond"]["labels"], kwargs["cond"]["labels"]]).to(job.device) \
        if job.guidance_scale is not None else (job.labels.to(job.device) if job.labels is not None else None)

    def loop(steps: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(generator_seed)
        x = torch.randn(job.shape, generator=generator).to(job.device)  # as diffusers' randn_tensor draws it
        scheduler.set_timesteps(steps, device=job.device)
        for t in scheduler.timesteps:
            model_input = torch.cat([x, x]) if job.guidance_scale is not None else x
            out = job.model(model_input, t.expand(model_input.shape[0]), labels=labels)
            if job.guidance_scale is not None:
                uncond, cond = out.chunk(2)
                out = uncond + job.guidance_scale * (cond - uncond)
            x = scheduler.step(out, t, x, generator=generator).prev_sample
        return x

    with torch.no_grad():
        loop(2)  # warm-up, as for fastdiff
        return _timed(lambda: loop(job.steps), job.device)


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def timing_rows(job: SamplingJob, include_diffusers: bool = True) -> tuple[list[Row], torch.Tensor]:
    """Every row of the table, and the default-backend sample (for the pictures)."""
    rows = []
    fast_name = default_backend(job.device)
    reference, reference_s = run_fastdiff(job, backend="reference")
    rows.append(Row("fastdiff, eager reference backend (FASTDIFF_BACKEND=reference)", reference_s, job.steps))
    fast, fast_s = run_fastdiff(job)
    rows.append(Row(f"fastdiff, default backend ({fast_name})", fast_s, job.steps, "eager reference, same seed",
                    max_abs_diff(fast, reference)))
    if job.device.type == "cuda":
        graphed, graphed_s = run_fastdiff(job, cuda_graph=True)
        rows.append(Row(f"fastdiff, {fast_name} + CUDA graph", graphed_s, job.steps, "default backend, same seed",
                        max_abs_diff(graphed, fast)))
    if include_diffusers:
        theirs, theirs_s = run_diffusers(job, generator_seed=job.seed)
        ours, _ = run_fastdiff(job, generator_seed=job.seed)
        rows.insert(0, Row(f"diffusers {job.sampler.diffusers_class_name} loop (eager)", theirs_s, job.steps,
                           "fastdiff, same torch.Generator", max_abs_diff(theirs, ours)))
    return rows, fast


def markdown_table(rows: list[Row]) -> str:
    lines = ["| sampling loop | total (s) | per step (ms) | compared with | max abs diff |",
             "|---|---:|---:|---|---:|"]
    for row in rows:
        diff = "" if row.max_abs_diff is None else f"{row.max_abs_diff:.2e}"
        lines.append(f"| {row.method} | {row.seconds:.3f} | {row.seconds / row.steps * 1e3:.2f} | "
                     f"{row.compared_with} | {diff} |")
    return "\n".join(lines)
