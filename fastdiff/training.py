"""diffusion_loss(): the denoising training objective, with the forward noising fused into one pass.

    loss = diffusion_loss(model, x0, sampler, cond={"labels": y}, seed=step)
    loss.backward()

`fastdiff.ops.q_sample` reads x0 once and writes x_t together with the regression target (the
noise for epsilon-prediction, v for v-prediction, x0, ...: each a row a x0 + b n of the sampler's
training table), so building a training batch is one memory-bound pass instead of three (randn,
the noising, the target).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

from . import noise as N
from . import ops
from .loop import model_prediction
from .samplers.base import BaseSampler

REDUCTIONS = ("mean", "sum", "none")


def _check_inputs(model, x0, sampler, seed, generator, reduction) -> None:
    if not callable(model):
        raise TypeError(f"model must be callable as model(x_t, t, **cond), got {type(model).__name__}")
    if not isinstance(x0, torch.Tensor) or not x0.is_floating_point() or x0.ndim < 1:
        raise TypeError("x0 must be a floating-point tensor with a batch dimension, got "
                        + (f"dtype {x0.dtype}, shape {tuple(x0.shape)}" if isinstance(x0, torch.Tensor)
                           else type(x0).__name__))
    if not isinstance(sampler, BaseSampler):
        raise TypeError(f"sampler must be a fastdiff sampler (its config names the schedule and prediction_type), "
                        f"got {type(sampler).__name__}")
    if seed is not None and generator is not None:
        raise ValueError("pass at most one of seed (in-kernel Philox noise) and generator (torch.randn noise); got both")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def training_timesteps(timesteps, x0: torch.Tensor, sampler: BaseSampler, seed: int | None = None,
                       generator: torch.Generator | None = None, sample_offset: int = 0) -> torch.Tensor:
    """[batch] int64 timesteps on x0's device: the given ones (validated by the sampler), else uniform in [0, T).

    With `seed` (or none: a seed from torch's default generator) they come from the Philox integer
    stream on x0's device (fastdiff.noise.randint: no host copy, the same integers on every device,
    keyed by the global sample index); with `generator`, torch.randint from it, as diffusers'
    training scripts draw them.
    """
    if timesteps is not None:
        return sampler.training_timesteps(timesteps, x0)
    T, batch = sampler.config.num_train_timesteps, x0.shape[0]
    if generator is not None:
        return torch.randint(0, T, (batch,), generator=generator, device=generator.device).to(x0.device)
    seed = N.check_seed(seed) if seed is not None else N.draw_seed()
    return N.randint(batch, T, seed, sample_offset=sample_offset, device=x0.device)


def noisy_sample_and_target(x0: torch.Tensor, timesteps: torch.Tensor, sampler: BaseSampler,
                            seed: int | None = None, generator: torch.Generator | None = None,
                            sample_offset: int = 0):
    """(x_t, target) for the sampler's prediction_type, from one fused q_sample pass over x0."""
    table = sampler.training_table(x0.device)  # one row per timestep: x_t and the target as a x0 + b n
    if generator is not None:  # the caller's torch.randn stream, as diffusers' training scripts draw it
        noise = torch.randn(x0.shape, generator=generator, device=generator.device, dtype=x0.dtype).to(x0.device)
        seed = 0
    else:  # in-kernel Philox noise
        noise = None
        seed = N.check_seed(seed) if seed is not None else N.draw_seed()
    x_t, target, _ = ops.run_q_sample(x0, table, timesteps, noise, seed, sample_offset, True, False)
    return x_t, target


def diffusion_loss(
    model: Callable[..., Any],
    x0: torch.Tensor,
    sampler: BaseSampler,
    *,
    timesteps: torch.Tensor | int | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    cond: Mapping[str, Any] | None = None,
    reduction: str = "mean",
    sample_offset: int = 0,
) -> torch.Tensor:
    """Mean squared error between model(x_t, t, **cond) and the target of sampler.config.prediction_type.

    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (DDPM eq. 4); targets: eps ("epsilon", DDPM eq. 14),
    x0 ("sample"), v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 ("v_prediction", Salimans & Ho 2022).
    timesteps: per-sample (or one shared) training timesteps; drawn uniformly in [0, T) when None.
    seed: in-kernel Philox noise and timesteps drawn on x0's device from the same seed; generator:
        torch.randn noise and torch.randint timesteps from it; neither: a seed from torch's default
        generator.
    reduction: "mean" (a scalar), "sum", or "none" (element-wise, x0's shape), as torch's mse_loss.
    sample_offset: the global index of x0's first sample (data parallel: rank * per-rank batch), so
        ranks draw different noise and timesteps for the same seed.
    """
    _check_inputs(model, x0, sampler, seed, generator, reduction)
    if isinstance(sample_offset, bool) or not isinstance(sample_offset, int) or sample_offset < 0:
        raise ValueError(f"sample_offset must be an int >= 0, got {sample_offset!r}")
    if seed is None and generator is None:
        seed = N.draw_seed()
    t = training_timesteps(timesteps, x0, sampler, seed, generator, sample_offset)
    x_t, target = noisy_sample_and_target(x0, t, sampler, seed, generator, sample_offset)
    prediction = model_prediction(model(x_t, t, **(cond or {})))
    if prediction.shape != target.shape:
        raise ValueError(f"model output has shape {tuple(prediction.shape)}, the target {tuple(target.shape)}")
    return torch.nn.functional.mse_loss(prediction.float(), target.float(), reduction=reduction)
