"""Eager PyTorch ground truth for every fused op: the generic step, q_sample and CFG.

The kernels (fastdiff/kernels/, csrc/) compute exactly these lines, term by term and in this order, so
fp32 results differ from the reference only by FMA contraction. The meaning of a row's numbers
is the sampler's business (fastdiff/samplers/*, each citing its paper); here they are just
coefficients (column names in fastdiff.tables).

Papers: classifier-free guidance = Ho & Salimans 2022 (eq. 6); dynamic thresholding = Saharia et
al. 2022 (Imagen, sec. 2.3); learned variance = Nichol & Dhariwal 2021 (IDDPM, eq. 15).
Math runs in float32, or float64 for float64 samples; outputs come back in the sample's dtype.

NaN policy: the "sqrt" variance mode clamps a negative predicted variance at 0 (diffusers takes
the square root of it: NaN).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from . import tables as T

Tensor = torch.Tensor


def compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def cfg_combine(uncond: Tensor, cond: Tensor, guidance_scale: float) -> Tensor:
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6): u + w (c - u)."""
    dt = compute_dtype(cond)
    u, c = uncond.to(dt), cond.to(dt)
    return (u + guidance_scale * (c - u)).to(cond.dtype)


def split_model_output(model_output: Tensor, sample: Tensor, guidance_scale: Optional[float]):
    """(uncond or None, cond, variance channels or None) of a model output.

    Under CFG the batch is [uncond; cond] (diffusers' chunk(2) order). A model output with twice
    the sample's channels is [prediction; variance] (diffusers' split); the variance channels are
    taken from the conditional half (as diffusers' IF / DiT pipelines do).
    """
    uncond, cond = model_output.chunk(2) if guidance_scale is not None else (None, model_output)
    channels = sample.shape[1] if sample.ndim > 1 else None
    if channels is None or model_output.shape[1] != 2 * channels:
        return uncond, cond, None
    return (uncond[:, :channels] if uncond is not None else None), cond[:, :channels], cond[:, channels:]


def guide(model_output: Tensor, sample: Tensor, guidance_scale: Optional[float], guidance_extra: Optional[Tensor],
          extra_scale: float, dt: torch.dtype) -> tuple[Tensor, Optional[Tensor]]:
    """(m, v): the guided prediction u + w (c - u) + w2 (c - e) and the variance channels, in `dt`.

    e (`guidance_extra`, e.g. SD3's skip-layer prediction) has the conditional half's shape.
    """
    uncond, cond, variance = split_model_output(model_output, sample, guidance_scale)
    m = cond.to(dt)
    if uncond is not None:
        u = uncond.to(dt)
        m = u + guidance_scale * (m - u)
        if guidance_extra is not None:
            e = guidance_extra[:, : cond.shape[1]].to(dt)
            m = m + extra_scale * (cond.to(dt) - e)
    return m, (variance.to(dt) if variance is not None else None)


def clip_x0(x0: Tensor, clip_range: Optional[float], threshold: Optional[Tensor]) -> Tensor:
    """Dynamic thresholding (clamp to [-s, s], then / s; Imagen sec. 2.3) wins over clipping."""
    if threshold is not None:
        s = threshold.to(x0.dtype).reshape(-1, *([1] * (x0.ndim - 1)))
        return torch.clamp(x0, -s, s) / s
    if clip_range is not None:
        return x0.clamp(-clip_range, clip_range)
    return x0


def noise_std(row: Tensor, variance_mode: int, v: Optional[Tensor]) -> Tensor:
    """std of the step's noise: the row's, or per element from the model's variance channels v.

    sqrt: std = NOISE_STD sqrt(max(v, 0)) (the model outputs a variance; clamped, our NaN policy).
    exp:  std = NOISE_STD exp(VAR_BIAS + VAR_SLOPE v) (a log-variance; IDDPM eq. 15 is the affine map
          of learned_range, a model that outputs log-variance channels has bias 0, slope 1/2).
    """
    std = row[T.NOISE_STD]
    if variance_mode == T.VAR_FIXED:
        return std
    if v is None:
        raise ValueError("a learned variance mode needs model_output with 2x the sample's channels")
    if variance_mode == T.VAR_SQRT:
        return std * torch.sqrt(torch.clamp(v, min=0.0))
    return std * torch.exp(row[T.VAR_BIAS] + row[T.VAR_SLOPE] * v)


def linear(row: Tensor, columns: tuple[int, ...], terms: tuple[Tensor, ...]) -> Tensor:
    """sum_k row[columns[k]] * terms[k], summed left to right (the kernels' order)."""
    total = row[columns[0]] * terms[0]
    for column, term in zip(columns[1:], terms[1:]):
        total = total + row[column] * term
    return total


class StepResult(NamedTuple):
    prev: Tensor  # out, in the sample's dtype
    x0: Tensor  # the clipped x0 prediction, in the sample's dtype
    out2: Optional[Tensor]  # the second output (compute dtype), when the row writes one
    hist: Optional[Tensor]  # the history entry (compute dtype), when the row writes one


def step(model_output: Tensor, sample: Tensor, row: Tensor, history: tuple[Tensor, ...] = (),
         noise: Optional[Tensor] = None, *, guidance_scale: Optional[float] = None,
         guidance_extra: Optional[Tensor] = None, extra_scale: float = 0.0, variance: int = T.VAR_FIXED,
         clip_range: Optional[float] = None, threshold: Optional[Tensor] = None, write_out2: bool = False,
         write_history: bool = False) -> StepResult:
    """The generic step (fastdiff.tables, module docstring) for one row and the history values read.

    history: the values h_1 .. h_k of the slots the row reads (k = the step's history reads).
    noise: the step's standard normal noise, or None for a step without noise.
    """
    dt = compute_dtype(sample)
    r = row.to(dt)
    m, v = guide(model_output, sample, guidance_scale, guidance_extra, extra_scale, dt)
    x = sample.to(dt)
    n = noise.to(dt) if noise is not None else None
    if n is not None:
        x = x + r[T.PRE_NOISE] * n
    x0 = clip_x0((r[T.X0_X] * x + r[T.X0_M] * m) * r[T.X0_SCALE], clip_range, threshold)
    h = tuple(value.to(dt) for value in history)
    k = len(h)
    out = linear(r, (T.OUT_X, T.OUT_M, T.OUT_X0, *T.OUT_H[:k]), (x, m, x0, *h))
    if n is not None:
        out = out + noise_std(r, variance, v) * n
    out2 = linear(r, (T.OUT2_X, T.OUT2_M, T.OUT2_X0, *T.OUT2_H[:k]), (x, m, x0, *h)) if write_out2 else None
    hist = linear(r, (T.HIST_X, T.HIST_M, T.HIST_X0), (x, m, x0)) if write_history else None
    return StepResult(out.to(sample.dtype), x0.to(sample.dtype), out2, hist)


def dynamic_threshold(x0: Tensor, ratio: float, max_value: float) -> Tensor:
    """Imagen sec. 2.3: per sample s = clamp(quantile(|x0|, ratio), 1, max_value), [B] float32.

    diffusers calls torch.quantile (linear interpolation between order statistics), which sorts and
    refuses more than 2**24 elements; two per-sample selections (kthvalue) give the same value.
    """
    flat = x0.reshape(x0.shape[0], -1).to(compute_dtype(x0)).abs()
    n = flat.shape[1]
    position = torch.tensor(ratio, dtype=flat.dtype) * (n - 1)  # as torch.quantile: in the input's dtype
    lo = int(position)
    hi = min(int(torch.ceil(position)), n - 1)
    lower = flat.kthvalue(lo + 1, dim=1).values
    upper = flat.kthvalue(hi + 1, dim=1).values if hi != lo else lower
    s = torch.lerp(lower, upper, (position - lo).to(flat.device))
    return torch.clamp(s, min=1.0, max=max_value).float()


def q_sample(x0: Tensor, rows: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
    """(x_t, target) with one q-sample row per sample ([B, Q_WIDTH], fastdiff.tables):
    x_t = a x0 + b n (DDPM eq. 4 and its relatives), target = p x0 + q n."""
    dt = compute_dtype(x0)
    r = rows.to(dt).reshape(x0.shape[0], *([1] * (x0.ndim - 1)), T.Q_WIDTH)
    x, n = x0.to(dt), noise.to(dt)
    x_t = r[..., T.Q_A] * x + r[..., T.Q_B] * n
    target = r[..., T.Q_P] * x + r[..., T.Q_Q] * n
    return x_t.to(x0.dtype), target.to(x0.dtype)
