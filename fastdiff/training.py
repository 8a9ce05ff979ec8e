"""diffusion_loss(): the denoising training objective, with the forward noising fused into one pass.

    loss = diffusion_loss(model, x0, sampler, cond={"labels": y}, seed=step)
    loss.backward()

`fastdiff.ops.q_sample` reads x0 once and writes x_t together with the regression target (the
noise for epsilon-prediction, v for v-prediction, x0, ...: each a row a x0 + b n of the sampler's
training table), so building a training batch is one memory-bound pass instead of three (randn,
the noising, the target).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import torch

from . import noise as N
from . import ops
from . import vlb
from .loop import model_prediction
from .samplers.base import BaseSampler

REDUCTIONS = ("mean", "sum", "none")
LOSSES = ("mse", "kl")  # kl: Sohl-Dickstein et al. 2015's Gaussian KL per timestep (fastdiff.vlb)


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
    loss: str = "mse",
    timestep_sampling: str = "uniform",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    loss_weighting: str = "none",
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
    loss: "mse" (the above), or "kl": for a DDPMSampler whose model outputs [prediction; log-variance]
        (variance_type "learned_log_variance" or "learned_range"), the closed-form Gaussian
        KL(q(x_{t-1} | x_t, x0) || p_theta(x_{t-1} | x_t)) of Sohl-Dickstein et al. 2015 (eq. 14), and at
        t = 0 the negative log-likelihood -log p_theta(x0 | x_t) (fastdiff.vlb documents both), reduced
        as `reduction` says. With prediction_type="mean" the model's mean is its prediction.
    timestep_sampling, logit_mean, logit_std, mode_scale, loss_weighting: for a flow-matching sampler
        (FlowMatchEulerDiscreteSampler), rectified-flow training as SD3's scripts do it: x_t = (1 - sigma) x0
        + sigma n, target n - x0, sigma drawn "uniform" / "logit_normal" / "mode" on the training schedule
        and the squared error weighted "none" / "sigma_sqrt" / "cosmap" (see flow_matching_loss).
    """
    _check_inputs(model, x0, sampler, seed, generator, reduction)
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if loss == "kl":
        vlb.check_sampler(sampler)
    if isinstance(sample_offset, bool) or not isinstance(sample_offset, int) or sample_offset < 0:
        raise ValueError(f"sample_offset must be an int >= 0, got {sample_offset!r}")
    if seed is None and generator is None:
        seed = N.draw_seed()
    if getattr(sampler, "flow_matching", False) or timestep_sampling != "uniform" or loss_weighting != "none":
        return flow_matching_loss(model, x0, sampler, timesteps=timesteps, seed=seed, generator=generator, cond=cond,
                                  reduction=reduction, sample_offset=sample_offset, loss=loss,
                                  timestep_sampling=timestep_sampling, logit_mean=logit_mean, logit_std=logit_std,
                                  mode_scale=mode_scale, loss_weighting=loss_weighting)
    t = training_timesteps(timesteps, x0, sampler, seed, generator, sample_offset)
    x_t, target = noisy_sample_and_target(x0, t, sampler, seed, generator, sample_offset)
    prediction = model_prediction(model(x_t, t, **(cond or {})))
    if loss == "kl":
        terms = vlb.kl_terms(sampler, prediction, x0, x_t, t)
        return {"mean": terms.mean, "sum": terms.sum, "none": lambda: terms}[reduction]()
    if prediction.shape != target.shape:
        raise ValueError(f"model output has shape {tuple(prediction.shape)}, the target {tuple(target.shape)}")
    return torch.nn.functional.mse_loss(prediction.float(), target.float(), reduction=reduction)


# ---- flow matching (rectified flow: SD3, Flux) ----------------------------------------------------
TIMESTEP_SAMPLINGS = ("uniform", "logit_normal", "mode")  # Esser et al. 2024 (SD3), sec. 3.1
LOSS_WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")


def _philox_uniform(batch: int, seed: int, sample_offset: int, device) -> torch.Tensor:
    """[batch] float32 in [0, 1): Triton's uint_to_uniform of the Philox word noise.randint uses (same counters)."""
    sample = torch.arange(batch, device=device, dtype=torch.int64) + sample_offset
    zeros = torch.zeros((), device=device, dtype=torch.int64)
    word = N.philox4x32((zeros.expand(batch), sample, zeros, zeros + N.STREAM_TRAINING_TIMESTEPS), seed)[0]
    return N.uint32_to_uniform(word)


def flow_timestep_density(batch: int, device, timestep_sampling: str = "uniform", logit_mean: float = 0.0,
                          logit_std: float = 1.0, mode_scale: float = 1.29, seed: int | None = None,
                          generator: torch.Generator | None = None, sample_offset: int = 0) -> torch.Tensor:
    """[batch] u in [0, 1] on `device`, drawn as diffusers' training_utils.compute_density_for_timestep_sampling:
    "uniform"; "logit_normal" u = sigmoid(N(logit_mean, logit_std^2)); "mode" (SD3 eq. 20)
    u = 1 - v - mode_scale (cos^2(pi v / 2) - 1 + v), v uniform. With `generator`: torch.rand / torch.normal
    from it (diffusers' draws); else the Philox stream of `seed` on `device` (no host copy)."""
    if timestep_sampling not in TIMESTEP_SAMPLINGS:
        raise ValueError(f"timestep_sampling must be one of {TIMESTEP_SAMPLINGS}, got {timestep_sampling!r}")
    if generator is not None:
        if timestep_sampling == "logit_normal":
            u = torch.normal(mean=logit_mean, std=logit_std, size=(batch,), device=generator.device, generator=generator)
            u = torch.nn.functional.sigmoid(u)
        else:
            u = torch.rand(size=(batch,), device=generator.device, generator=generator)
    elif timestep_sampling == "logit_normal":
        normal = N.randn((batch,), seed, stream=N.STREAM_TRAINING_TIMESTEPS, sample_offset=sample_offset, device=device)
        u = torch.nn.functional.sigmoid(logit_mean + logit_std * normal)
    else:
        u = _philox_uniform(batch, seed, sample_offset, device)
    if timestep_sampling == "mode":
        u = 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    return u.to(device)


def flow_loss_weighting(loss_weighting: str, sigmas: torch.Tensor) -> torch.Tensor:
    """Per-sample loss weights, as diffusers' training_utils.compute_loss_weighting_for_sd3: "sigma_sqrt"
    sigma^-2, "cosmap" 2 / (pi (1 - 2 sigma + 2 sigma^2)) (SD3 sec. 3.1), "none" 1."""
    if loss_weighting == "sigma_sqrt":
        return (sigmas**-2.0).float()
    if loss_weighting == "cosmap":
        bot = 1 - 2 * sigmas + 2 * sigmas**2
        return 2 / (math.pi * bot)
    if loss_weighting == "none":
        return torch.ones_like(sigmas)
    raise ValueError(f"loss_weighting must be one of {LOSS_WEIGHTINGS}, got {loss_weighting!r}")


def flow_training_timesteps(timesteps, x0: torch.Tensor, sampler: BaseSampler, timestep_sampling: str = "uniform",
                            logit_mean: float = 0.0, logit_std: float = 1.0, mode_scale: float = 1.29,
                            seed: int | None = None, generator: torch.Generator | None = None,
                            sample_offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """([batch] model timesteps, [batch] sigmas) on x0's device. Drawn: u from flow_timestep_density, index
    (u T).long() into the training schedule (sampler.train_sigmas / train_timesteps, shifted as configured),
    as SD3's training scripts do. Given `timesteps` (floats in [0, T]): continuous, sigma = t / T."""
    T_, batch, device = sampler.config.num_train_timesteps, x0.shape[0], x0.device
    if timesteps is not None:
        t = torch.as_tensor(timesteps).reshape(-1)
        if t.numel() not in (1, batch):
            raise ValueError(f"timesteps must have 1 or batch={batch} entries, got {t.numel()}")
        if t.device.type == "cpu":
            t = t.to(torch.float32)
            bad = t[~((t >= 0) & (t <= T_))]
            if bad.numel():
                raise ValueError(f"flow-matching timesteps must be in [0, {T_}] (sigma * num_train_timesteps), "
                                 f"got {bad.tolist()[:5]}")
        t = t.to(device=device, dtype=torch.float32).expand(batch).contiguous()
        return t, t / T_
    u = flow_timestep_density(batch, device, timestep_sampling, logit_mean, logit_std, mode_scale, seed, generator,
                              sample_offset)
    index = (u * T_).long().clamp(0, T_ - 1)  # u = 1 (rare, by rounding) would index past the table
    train_timesteps = sampler._on(device, "train_timesteps", lambda d: sampler.train_timesteps.to(d))
    train_sigmas = sampler._on(device, "train_sigmas", lambda d: sampler.train_sigmas.to(d))
    return train_timesteps[index], train_sigmas[index]


def flow_matching_loss(model: Callable[..., Any], x0: torch.Tensor, sampler: BaseSampler, *,
                       timesteps: torch.Tensor | float | None = None, seed: int | None = None,
                       generator: torch.Generator | None = None, cond: Mapping[str, Any] | None = None,
                       reduction: str = "mean", sample_offset: int = 0, loss: str = "mse",
                       timestep_sampling: str = "uniform", logit_mean: float = 0.0, logit_std: float = 1.0,
                       mode_scale: float = 1.29, loss_weighting: str = "none") -> torch.Tensor:
    """Rectified-flow training (Esser et al. 2024, SD3, sec. 2-3; diffusers' train_dreambooth_sd3.py / _flux.py):
    weighting * (model(x_t, t) - (n - x0))^2 with x_t = (1 - sigma) x0 + sigma n, x_t and the target from one
    fused q_sample pass over per-sample rows. Timesteps first, then the noise (generator draws in that order)."""
    _check_inputs(model, x0, sampler, seed, generator, reduction)
    if not getattr(sampler, "flow_matching", False):
        raise ValueError(f"timestep_sampling={timestep_sampling!r} and loss_weighting={loss_weighting!r} are flow-matching "
                         f"options (SD3); {type(sampler).__name__} is not a flow-matching sampler "
                         "(use FlowMatchEulerDiscreteSampler)")
    if loss != "mse":
        raise ValueError(f"loss={loss!r} is not defined for flow matching; use loss='mse'")
    if loss_weighting not in LOSS_WEIGHTINGS:
        raise ValueError(f"loss_weighting must be one of {LOSS_WEIGHTINGS}, got {loss_weighting!r}")
    if seed is None and generator is None:
        seed = N.draw_seed()
    t, sigmas = flow_training_timesteps(timesteps, x0, sampler, timestep_sampling, logit_mean, logit_std, mode_scale,
                                        seed, generator, sample_offset)
    batch, one = x0.shape[0], torch.ones_like(sigmas)
    rows = torch.stack([1.0 - sigmas, sigmas, -one, one], dim=1)  # x_t = (1 - s) x0 + s n, target = -x0 + n
    table = torch.cat([rows, torch.full_like(rows[:1], float("nan"))])  # one row per sample, NaN sentinel
    if generator is not None:
        noise = torch.randn(x0.shape, generator=generator, device=generator.device, dtype=x0.dtype).to(x0.device)
        seed = 0
    else:
        noise = None
    x_t, target, _ = ops.run_q_sample(x0, table, torch.arange(batch, device=x0.device), noise, seed, sample_offset,
                                      True, False)
    prediction = model_prediction(model(x_t, t, **(cond or {})))
    if prediction.shape != target.shape:
        raise ValueError(f"model output has shape {tuple(prediction.shape)}, the target {tuple(target.shape)}")
    weighting = flow_loss_weighting(loss_weighting, sigmas).reshape(batch, *([1] * (x0.ndim - 1)))
    error = weighting.float() * (prediction.float() - target.float()) ** 2
    return {"mean": error.mean, "sum": error.sum, "none": lambda: error}[reduction]()
