"""diffusion_loss(): the denoising training objective, with the forward noising fused into one pass.

    loss = diffusion_loss(model, x0, sampler, cond={"labels": y}, seed=step)
    loss.backward()

`fastdiff.ops.q_sample` reads x0 once and writes x_t together with the regression target (the
noise for epsilon-prediction, v for v-prediction), so building a training batch is one
memory-bound pass instead of three (randn, the noising, the target).
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
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """[batch] int64 timesteps on x0's device: the given ones (validated by the sampler), else uniform in [0, T).

    Drawn on the CPU (from the generator, a generator seeded with `seed`, or torch's default one)
    and copied over, so the same seed gives the same timesteps on every device.
    """
    if timesteps is not None:
        return sampler._training_timesteps(timesteps, x0)
    T, batch = sampler.config.num_train_timesteps, x0.shape[0]
    source = generator if generator is not None else (torch.Generator().manual_seed(seed) if seed is not None else None)
    if source is not None and source.device.type != "cpu":
        return torch.randint(0, T, (batch,), generator=source, device=source.device).to(x0.device)
    return torch.randint(0, T, (batch,), generator=source).to(x0.device)


def noisy_sample_and_target(x0: torch.Tensor, timesteps: torch.Tensor, sampler: BaseSampler,
                            seed: int | None = None, generator: torch.Generator | None = None):
    """(x_t, target) for the sampler's prediction_type, from one fused q_sample pass over x0."""
    prediction_type = sampler.config.prediction_type
    alphas_cumprod = sampler._alphas_cumprod_on(x0.device)  # cached per device, NaN row for bad device t
    if generator is not None:  # the caller's torch.randn stream, as diffusers' training scripts draw it
        noise = torch.randn(x0.shape, generator=generator, device=generator.device, dtype=x0.dtype).to(x0.device)
        seed = 0
    else:  # in-kernel Philox noise: written out by the same pass when it is the target
        noise = None
        seed = N.check_seed(seed) if seed is not None else N.draw_seed()
    write_noise = prediction_type == "epsilon" and noise is None
    write_v = prediction_type == "v_prediction"
    x_t, written_noise, v = ops.q_sample(x0, timesteps, alphas_cumprod, noise, seed, 0, write_noise, write_v)
    if prediction_type == "epsilon":
        return x_t, (noise if noise is not None else written_noise)
    if prediction_type == "v_prediction":
        return x_t, v
    return x_t, x0  # prediction_type == "sample"


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
) -> torch.Tensor:
    """Mean squared error between model(x_t, t, **cond) and the target of sampler.config.prediction_type.

    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (DDPM eq. 4); targets: eps ("epsilon", DDPM eq. 14),
    x0 ("sample"), v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 ("v_prediction", Salimans & Ho 2022).
    timesteps: per-sample (or one shared) training timesteps; drawn uniformly in [0, T) when None.
    seed: in-kernel Philox noise (and timesteps from a CPU generator seeded with it); generator:
        torch.randn noise and torch.randint timesteps from it; neither: torch's default generator.
    reduction: "mean" (a scalar), "sum", or "none" (element-wise, x0's shape), as torch's mse_loss.
    """
    _check_inputs(model, x0, sampler, seed, generator, reduction)
    t = training_timesteps(timesteps, x0, sampler, seed, generator)
    if seed is None and generator is None:
        seed = N.draw_seed()
    x_t, target = noisy_sample_and_target(x0, t, sampler, seed, generator)
    prediction = model_prediction(model(x_t, t, **(cond or {})))
    if prediction.shape != target.shape:
        raise ValueError(f"model output has shape {tuple(prediction.shape)}, the target {tuple(target.shape)}")
    return torch.nn.functional.mse_loss(prediction.float(), target.float(), reduction=reduction)
