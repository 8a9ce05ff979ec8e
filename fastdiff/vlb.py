"""The variational bound's per-timestep terms: `diffusion_loss(..., loss="kl")`.

Sohl-Dickstein et al. 2015 ("Deep Unsupervised Learning using Nonequilibrium Thermodynamics"),
eq. 14 / Appendix B: the negative log-likelihood bound is a sum over timesteps of

    KL( q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t) )

between two Gaussians, which has a closed form (their released code, model.py get_negL_bound):

    KL(N(mu_q, s_q^2) || N(mu_p, s_p^2)) = log s_p - log s_q + (s_q^2 + (mu_q - mu_p)^2) / (2 s_p^2) - 1/2
                                         = 1/2 (lv_p - lv_q + (e^{lv_q} + (mu_q - mu_p)^2) e^{-lv_p} - 1)

per element, in nats, with lv = log s^2. q's side is the forward process posterior (DDPM eq. 6-7:
mean c_x0 x_0 + c_xt x_t, variance beta~_t); p's side is the model's (mean, log variance).

t = 0 (the last reverse step, x_0 -> data): the posterior q(x_{-1} | x_0, data) is a point mass
(beta~_0 = 0), so its KL is not finite. The 2015 paper fixes that step to the forward kernel
(Appendix B.2, "edge effect") and its code never trains it; a fastdiff DDPMSampler does use the
model at t = 0 (its mean, without noise), so we train it with the term DDPM uses there (Ho et al.
2020, sec. 3.3, L_0), the negative log-likelihood of the data under p_theta(x_{-1} | x_0):

    -log N(x; mu_p, e^{lv_p}) = 1/2 (log 2 pi + lv_p + (x - mu_p)^2 e^{-lv_p})

(a Gaussian decoder for continuous data; IDDPM discretizes it for 8-bit images). Both terms
are terms of the bound, so with t uniform, T times their mean estimates the bound on -log p(x)
per dimension, up to the prior term L_T, which has no parameters.
"""
from __future__ import annotations

import math

import torch

Tensor = torch.Tensor


def normal_kl(mean_q: Tensor, log_var_q: Tensor, mean_p: Tensor, log_var_p: Tensor) -> Tensor:
    """KL(N(mean_q, e^{log_var_q}) || N(mean_p, e^{log_var_p})) per element, in nats."""
    return 0.5 * (log_var_p - log_var_q + (torch.exp(log_var_q) + (mean_q - mean_p) ** 2) * torch.exp(-log_var_p) - 1.0)


def gaussian_nll(x: Tensor, mean: Tensor, log_var: Tensor) -> Tensor:
    """-log N(x; mean, e^{log_var}) per element, in nats."""
    return 0.5 * (math.log(2 * math.pi) + log_var + (x - mean) ** 2 * torch.exp(-log_var))


def kl_terms(sampler, model_output: Tensor, x0: Tensor, x_t: Tensor, timesteps: Tensor) -> Tensor:
    """Per element: KL(q(x_{t-1} | x_t, x0) || p_theta(x_{t-1} | x_t)) for t > 0, -log p_theta(x0 | x_t) at t = 0.

    model_output: [prediction; log-variance] (2x x0's channels), read by the sampler's
    `model_mean_log_variance` (DDPMSampler with variance_type "learned_log_variance" or
    "learned_range"). Computed in float32 (float64 for float64 inputs).
    """
    dt = torch.float64 if x0.dtype == torch.float64 else torch.float32
    x0, x_t = x0.to(dt), x_t.to(dt)
    mean_p, log_var_p = sampler.model_mean_log_variance(model_output.to(dt), x_t, timesteps)
    mean_q, log_var_q = sampler.posterior_mean_log_variance(x0, x_t, timesteps)
    last = (timesteps == 0).reshape(-1, *([1] * (x0.ndim - 1)))
    # The KL where t > 0 (q's log-variance is -inf at t = 0: replaced before it can make a NaN).
    kl = normal_kl(mean_q, torch.where(last, torch.zeros_like(log_var_q), log_var_q), mean_p, log_var_p)
    return torch.where(last, gaussian_nll(x0, mean_p, log_var_p), kl)


def check_sampler(sampler) -> None:
    """loss="kl" needs a sampler that knows both sides of the KL (DDPMSampler) and a learned variance."""
    if not (hasattr(sampler, "model_mean_log_variance") and hasattr(sampler, "posterior_mean_log_variance")):
        raise ValueError(f"loss='kl' needs a DDPMSampler (the DDPM posterior q(x_(t-1) | x_t, x_0)), "
                         f"got {type(sampler).__name__}")
    if sampler.config.variance_type not in ("learned_log_variance", "learned_range"):
        raise ValueError("loss='kl' needs a model that outputs its log-variance: variance_type "
                         f"'learned_log_variance' or 'learned_range', got {sampler.config.variance_type!r}")
