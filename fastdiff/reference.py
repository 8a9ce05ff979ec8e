"""Eager PyTorch ground truth for every fused op. Short functions, equations cited.

Papers: DDPM = Ho et al. 2020; IDDPM = Nichol & Dhariwal 2021; DDIM = Song et al. 2021;
v-prediction = Salimans & Ho 2022 (sec. 4); dynamic thresholding = Saharia et al. 2022 (Imagen,
sec. 2.3); classifier-free guidance = Ho & Salimans 2022 (eq. 6).

A step reads one row `coefs` of a table from `fastdiff.tables` (columns named there). Math runs in
float32, or float64 for float64 inputs; outputs come back in the sample's dtype.

NaN policy (where diffusers returns NaN, we return finite, documented values):
- variance_type="fixed_large_log": diffusers takes sqrt(log(beta_t)) -> NaN. We treat log(beta_t)
  as the log-variance it names: std = sqrt(beta_t), as fixed_large (see tables.ddpm_noise_std).
- variance_type="learned": diffusers takes sqrt(model variance) -> NaN where the model outputs a
  negative variance. We clamp the variance at 0 first: std = sqrt(max(v, 0)).
- DDIM with eta > 1: diffusers takes sqrt(1 - abar_prev - sigma^2) of a negative -> NaN. We
  clamp the direction variance at 0.
"""
from __future__ import annotations

import torch

from . import tables as T


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def cfg_combine(uncond: torch.Tensor, cond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6): u + w (c - u)."""
    dt = compute_dtype(cond)
    u, c = uncond.to(dt), cond.to(dt)
    return (u + guidance_scale * (c - u)).to(cond.dtype)


def split_model_output(model_output: torch.Tensor, sample: torch.Tensor, variance_type: str,
                       guidance_scale: float | None = None):
    """(prediction, predicted_variance or None), after CFG when `guidance_scale` is given.

    Learned variance: the model returns 2C channels, [prediction; variance] (diffusers' split).
    CFG: model_output is the [uncond; cond] batch (diffusers' chunk(2) order); the prediction is
    guided, the variance channels are taken from the conditional half (as diffusers' IF/DiT pipelines).
    """
    learned = variance_type in T.LEARNED_VARIANCE_TYPES and model_output.shape[1] == 2 * sample.shape[1]
    if guidance_scale is not None:
        uncond, cond = model_output.chunk(2)
        variance = cond[:, sample.shape[1]:] if learned else None
        if learned:
            uncond, cond = uncond[:, : sample.shape[1]], cond[:, : sample.shape[1]]
        return cfg_combine(uncond, cond, guidance_scale), variance
    if learned:
        return model_output[:, : sample.shape[1]], model_output[:, sample.shape[1]:]
    return model_output, None


def predict_x0(model_output, sample, sqrt_abar, sqrt_1m_abar, prediction_type: str):
    """x0 from the model output. epsilon: DDPM eq. 15; v: x0 = sqrt(abar) x - sqrt(1 - abar) v."""
    if prediction_type == "epsilon":
        return (sample - sqrt_1m_abar * model_output) / sqrt_abar
    if prediction_type == "sample":
        return model_output
    if prediction_type == "v_prediction":
        return sqrt_abar * sample - sqrt_1m_abar * model_output
    raise ValueError(f"prediction_type must be one of {T.PREDICTION_TYPES}, got {prediction_type!r}")


def predict_eps(model_output, sample, sqrt_abar, sqrt_1m_abar, prediction_type: str):
    """eps from the model output (DDIM eq. 12 needs it); v: eps = sqrt(abar) v + sqrt(1 - abar) x."""
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "sample":
        return (sample - sqrt_abar * model_output) / sqrt_1m_abar
    if prediction_type == "v_prediction":
        return sqrt_abar * model_output + sqrt_1m_abar * sample
    raise ValueError(f"prediction_type must be one of {T.PREDICTION_TYPES}, got {prediction_type!r}")


def dynamic_threshold_scale(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Imagen sec. 2.3: per sample, s = clamp(quantile(|x0|, ratio), 1, max_value). Shape [B], fp32."""
    flat = x0.reshape(x0.shape[0], -1).to(compute_dtype(x0)).abs()
    s = torch.quantile(flat, ratio, dim=1)
    return torch.clamp(s, min=1.0, max=max_value).float()


def clip_x0(x0: torch.Tensor, clip_sample_range: float | None, threshold: torch.Tensor | None):
    """Dynamic thresholding (x0 clamped to [-s, s], divided by s) takes precedence over clipping."""
    if threshold is not None:
        s = threshold.to(x0.dtype).reshape(-1, *([1] * (x0.ndim - 1)))
        return torch.clamp(x0, -s, s) / s
    if clip_sample_range is not None:
        return x0.clamp(-clip_sample_range, clip_sample_range)
    return x0


def learned_std(predicted_variance: torch.Tensor, coefs: torch.Tensor, variance_type: str) -> torch.Tensor:
    """Per-element noise std from the model's variance channels.

    learned: the model outputs the variance; std = sqrt(max(v, 0)) (our NaN policy, see top).
    learned_range: IDDPM eq. 15, log var = frac log beta_t + (1 - frac) log beta~_t, frac = (v + 1) / 2.
    """
    if variance_type == "learned":
        return torch.sqrt(torch.clamp(predicted_variance, min=0.0))
    frac = (predicted_variance + 1) / 2
    log_variance = frac * coefs[T.DDPM_MAX_LOG] + (1 - frac) * coefs[T.DDPM_MIN_LOG]
    return torch.exp(0.5 * log_variance)


def _needs_noise(noise: torch.Tensor | None, what: str) -> torch.Tensor:
    if noise is None:
        raise ValueError(f"{what} adds noise: pass `noise` (the reference draws none itself)")
    return noise


def ddpm_step(model_output, sample, coefs, *, prediction_type="epsilon", variance_type="fixed_small",
              clip_sample_range=None, threshold=None, noise=None, guidance_scale=None):
    """One DDPM reverse step x_t -> x_{t-1} (DDPM eq. 6-7, Algorithm 2). Returns (prev, x0).

    `threshold` is the per-sample s of dynamic thresholding ([B]; see dynamic_threshold_scale).
    """
    dt = compute_dtype(sample)
    c = coefs.to(dt)
    m, var = split_model_output(model_output, sample, variance_type, guidance_scale)
    x, m = sample.to(dt), m.to(dt)
    x0 = predict_x0(m, x, c[T.SQRT_ABAR], c[T.SQRT_1M_ABAR], prediction_type)
    x0 = clip_x0(x0, clip_sample_range, threshold)
    prev = c[T.DDPM_C_X0] * x0 + c[T.DDPM_C_XT] * x  # posterior mean, DDPM eq. 7
    std = c[T.DDPM_STD]
    if variance_type in T.LEARNED_VARIANCE_TYPES:
        if var is None:
            raise ValueError(f"variance_type={variance_type!r} needs model_output with 2x the sample's channels")
        std = std * learned_std(var.to(dt), c, variance_type)
    prev = prev + std * _needs_noise(noise, "ddpm_step").to(dt)
    return prev.to(sample.dtype), x0.to(sample.dtype)


def ddim_step(model_output, sample, coefs, *, prediction_type="epsilon", eta=0.0, use_clipped_model_output=False,
              clip_sample_range=None, threshold=None, noise=None, guidance_scale=None):
    """One DDIM step (DDIM eq. 12, sigma from eq. 16 scaled by eta). Returns (prev, x0)."""
    dt = compute_dtype(sample)
    c = coefs.to(dt)
    m, _ = split_model_output(model_output, sample, "fixed_small", guidance_scale)
    x, m = sample.to(dt), m.to(dt)
    sqrt_abar, sqrt_1m_abar = c[T.SQRT_ABAR], c[T.SQRT_1M_ABAR]
    x0 = predict_x0(m, x, sqrt_abar, sqrt_1m_abar, prediction_type)
    eps = predict_eps(m, x, sqrt_abar, sqrt_1m_abar, prediction_type)
    x0 = clip_x0(x0, clip_sample_range, threshold)
    if use_clipped_model_output:
        eps = (x - sqrt_abar * x0) / sqrt_1m_abar  # re-derive eps from the clipped x0
    std = eta * c[T.DDIM_SIGMA]
    direction = torch.sqrt(torch.clamp(c[T.DDIM_1M_ABAR_PREV] - std * std, min=0.0))  # "direction pointing to x_t"
    prev = c[T.DDIM_SQRT_ABAR_PREV] * x0 + direction * eps
    if eta > 0:
        prev = prev + std * _needs_noise(noise, "ddim_step with eta > 0").to(dt)
    return prev.to(sample.dtype), x0.to(sample.dtype)


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.reshape(-1, *([1] * (like.ndim - 1)))


def q_sample_coefs(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, like: torch.Tensor):
    """sqrt(abar_t), sqrt(1 - abar_t) per sample, computed in float32 from the float32 table."""
    abar = alphas_cumprod.to(like.device, torch.float32)[timesteps.to(like.device).long()]
    dt = compute_dtype(like)
    return _per_sample(abar.sqrt(), like).to(dt), _per_sample((1 - abar).sqrt(), like).to(dt)


def q_sample(x0, timesteps, alphas_cumprod, noise):
    """Forward noising with per-sample t (DDPM eq. 4): x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps."""
    a, b = q_sample_coefs(alphas_cumprod, timesteps, x0)
    dt = compute_dtype(x0)
    return (a * x0.to(dt) + b * noise.to(dt)).to(x0.dtype)


def v_target(x0, noise, timesteps, alphas_cumprod):
    """v-prediction target (Salimans & Ho 2022, sec. 4): v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0."""
    a, b = q_sample_coefs(alphas_cumprod, timesteps, x0)
    dt = compute_dtype(x0)
    return (a * noise.to(dt) - b * x0.to(dt)).to(x0.dtype)
