"""DDPMSampler: a drop-in for diffusers' DDPMScheduler (Ho et al. 2020), a table builder on the fused step.

The reverse step (DDPM eq. 6-7, Algorithm 2), with prev the next timestep of the schedule:

    x0      = (x - sqrt(1 - abar_t) eps) / sqrt(abar_t)                          (eq. 15; or v / sample)
    x_prev  = sqrt(abar_prev) beta_t / (1 - abar_t) x0
              + sqrt(alpha_t) (1 - abar_prev) / (1 - abar_t) x  +  sigma_t n      (eq. 7)

beta_t = 1 - abar_t / abar_prev; sigma_t^2 = the posterior variance (1 - abar_prev) / (1 - abar_t)
beta_t ("fixed_small"), beta_t ("fixed_large"), or learned (IDDPM eq. 15); no noise at t = 0.

A model can also predict the reverse mean itself, mu_theta(x_t, t) of p(x_{t-1} | x_t)
(`prediction_type="mean"`, Sohl-Dickstein et al. 2015, sec. 2.2-2.3), with a fixed variance or its
own log-variance channels (`variance_type="learned_log_variance"`: model_output = [mu; v],
sigma_t = exp(v / 2)). Then x_{t-1} = mu + sigma_t n, and pred_original_sample is the x0 that
eq. 7 maps to mu: x0 = (mu - c_xt x_t) / c_x0 (c_x0, c_xt: the coefficients of eq. 7 from t to
t - 1). Both are rows of the same generic fused step (`mean_rows`), on every backend.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from .. import schedules
from .. import tables as T
from .base import BaseSampler, TrainingTimestepNoising, check_vp_config, spaced_timesteps, table_dtype, upload
from .config import register_to_config

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")  # x0 as two numbers (shared with DDIMSampler)
DDPM_PREDICTION_TYPES = (*PREDICTION_TYPES, "mean")  # + a model of the reverse mean (DDPMSampler only)
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range",
                  "learned_log_variance")


def x0_coefficients(prediction_type: str, abar_t: torch.Tensor) -> dict[str, torch.Tensor]:
    """x0 = (x0_x x + x0_m m) x0_scale for a VP model output m (as diffusers' DDPM / DDIM compute it)."""
    one, beta_prod_t = torch.ones_like(abar_t), 1 - abar_t
    if prediction_type == "epsilon":  # DDPM eq. 15
        return {"x0_x": one, "x0_m": -beta_prod_t ** 0.5, "x0_scale": 1 / abar_t ** 0.5}
    if prediction_type == "sample":
        return {"x0_x": 0 * one, "x0_m": one, "x0_scale": one}
    if prediction_type == "v_prediction":  # Salimans & Ho 2022, sec. 4
        return {"x0_x": abar_t ** 0.5, "x0_m": -beta_prod_t ** 0.5, "x0_scale": one}
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def posterior_mean_coefficients(abar_t: torch.Tensor, abar_prev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_x0, c_xt) of the posterior mean mu~ = c_x0 x0 + c_xt x_t of q(x_prev | x_t, x0) (DDPM eq. 7),
    in diffusers' operation order (beta_t = 1 - abar_t / abar_prev)."""
    current_alpha_t = abar_t / abar_prev
    c_x0 = (abar_prev ** 0.5 * (1 - current_alpha_t)) / (1 - abar_t)
    c_xt = current_alpha_t ** 0.5 * (1 - abar_prev) / (1 - abar_t)
    return c_x0, c_xt


def mean_rows(abar: torch.Tensor, t: torch.Tensor, prev: torch.Tensor, out_x0: torch.Tensor, out_x: torch.Tensor,
              clipped: bool) -> dict[str, torch.Tensor]:
    """Step-table columns for prediction_type="mean": the model output m is mu_theta(x_t, t), the mean of
    p(x_{t-1} | x_t) (Sohl-Dickstein et al. 2015, sec. 2.2).

    x0 = (m - c_xt x_t) / c_x0, with (c_x0, c_xt) of eq. 7 from t to t - 1 (the step the model was
    trained for): the x0 whose posterior mean is m. Then
    - a step from t to t - 1 without clipping gives out = m exactly (OUT_M = 1);
    - with clip_sample / thresholding, x0 is clipped and out is eq. 7's posterior mean of the clipped
      x0 (what diffusers does for every other prediction type), and with a spaced schedule
      (prev < t - 1) out is eq. 7 from t to prev of that x0 (out_x0, out_x: those coefficients).
    A zero beta_t (c_x0 = 0: mu carries nothing of x0) gives x0 = m, a finite stand-in. A learned
    log-variance is the model's one-step variance; a spaced schedule uses it as it is.
    """
    one = torch.ones_like(out_x0)
    abar_before = torch.where(t > 0, abar[(t - 1).clamp(min=0)], one)
    c_x0, c_xt = posterior_mean_coefficients(abar[t], abar_before)
    invertible = c_x0 > 0
    direct = (prev == t - 1) & torch.tensor(not clipped)
    return {"x0_x": torch.where(invertible, -c_xt, 0 * one), "x0_m": one,
            "x0_scale": torch.where(invertible, 1 / torch.where(invertible, c_x0, one), one),
            "out_m": torch.where(direct, one, 0 * one), "out_x0": torch.where(direct, 0 * one, out_x0),
            "out_x": torch.where(direct, 0 * one, out_x)}


class DDPMSampler(BaseSampler, TrainingTimestepNoising):
    """Same constructor, config keys and defaults as `diffusers.DDPMScheduler`.

    Differences, all on purpose: `step` never synchronises with the device; it also takes
    `variance_noise=`, `seed=` (in-kernel Philox noise), `guidance_scale=` (CFG fused into the
    step, model_output = [uncond; cond]) and `sample_offset=` (global index of sample 0, for
    noise that does not depend on how a batch is split); NaN cases of diffusers are finite
    (fixed_large_log: std = sqrt(beta_t); learned: a negative variance is clamped at 0); a
    timestep outside the schedule raises instead of an IndexError. `table_dtype="float64"`
    derives the coefficients in float64 instead of diffusers' float32. Beyond diffusers:
    `prediction_type="mean"` (the model predicts the reverse mean) and
    `variance_type="learned_log_variance"` (model_output = [prediction; log-variance]); see the
    module docstring.
    """

    diffusers_class_name = "DDPMScheduler"
    keyed_by_timestep = True

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, variance_type: str = "fixed_small",
                 clip_sample: bool = True, prediction_type: str = "epsilon", thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, clip_sample_range: float = 1.0,
                 sample_max_value: float = 1.0, timestep_spacing: str = "leading", steps_offset: int = 0,
                 rescale_betas_zero_snr: bool = False, table_dtype: str = "float32"):
        schedules.effective_variance_type(variance_type, VARIANCE_TYPES)  # unknown: fixed_small + a warning (diffusers: silent)
        check_vp_config(self.config, DDPM_PREDICTION_TYPES)
        self._init_schedule(self.config)
        self._set_schedule(np.arange(0, num_train_timesteps)[::-1].copy(), device=None)

    @property
    def variance_type(self) -> str:
        return self.config.variance_type

    @property
    def variance_mode(self) -> int:
        return {"learned": T.VAR_SQRT, "learned_range": T.VAR_EXP,
                "learned_log_variance": T.VAR_EXP}.get(self.config.variance_type, T.VAR_FIXED)

    # ---- the table ----------------------------------------------------------------------------
    def _build_table(self) -> torch.Tensor:
        """One row per training timestep t (NaN for t not in the schedule), in diffusers' operation order."""
        config, dtype = self.config, table_dtype(self.config.table_dtype)
        T_ = config.num_train_timesteps
        steps = self._timesteps_host  # never read back from the device (a sync, or impossible on meta)
        t = torch.from_numpy(steps)
        prev = torch.from_numpy(np.append(steps[1:], -1))
        abar = self.alphas_cumprod.to(dtype)
        abar_t = abar[t]
        abar_prev = torch.where(prev >= 0, abar[prev.clamp(min=0)], torch.ones_like(abar_t))
        beta_prod_t, beta_prod_t_prev = 1 - abar_t, 1 - abar_prev
        current_alpha_t = abar_t / abar_prev
        current_beta_t = 1 - current_alpha_t
        out_x0 = (abar_prev ** 0.5 * current_beta_t) / beta_prod_t  # eq. 7
        out_x = current_alpha_t ** 0.5 * beta_prod_t_prev / beta_prod_t  # eq. 7
        # abar_t = 1 (leading zero betas): x_t is x0 and eq. 7 is 0 / 0 (diffusers: NaN). The limit as
        # beta_t -> 0 is x_prev = x0: out_x0 = 1, out_x = 0, no noise.
        noise_free = beta_prod_t == 0
        out_x0 = torch.where(noise_free, torch.ones_like(out_x0), out_x0)
        out_x = torch.where(noise_free, torch.zeros_like(out_x), out_x)
        if config.prediction_type == "mean":
            clipped = bool(config.clip_sample or config.thresholding)
            coefficients = mean_rows(abar, t, prev, out_x0, out_x, clipped)
        else:
            coefficients = {**x0_coefficients(config.prediction_type, abar_t), "out_x0": out_x0, "out_x": out_x}
        rows = {
            **coefficients,
            **self._noise_columns(beta_prod_t_prev / beta_prod_t * current_beta_t, current_beta_t),
            "noise_counter": t.to(dtype),  # Philox counter: the timestep (seeded noise keyed by t)
        }
        rows["noise_std"] = torch.where((t > 0) & ~noise_free, rows["noise_std"], 0)  # diffusers adds no noise at t = 0
        for name in ("var_bias", "var_slope"):
            if name in rows:
                rows[name] = torch.where(noise_free, torch.zeros_like(rows[name]), rows[name])
        full = {name: torch.zeros(T_, dtype=dtype).index_copy_(0, t, value.to(dtype)) for name, value in rows.items()}
        table = T.step_table(T_, dtype=dtype, **full)
        unscheduled = torch.ones(T_ + 1, dtype=torch.bool).index_fill_(0, t, False)
        return table.masked_fill_(unscheduled[:, None], float("nan"))  # a timestep outside the schedule: NaN

    def _noise_columns(self, posterior_variance: torch.Tensor, beta_t: torch.Tensor) -> dict[str, torch.Tensor]:
        """std of the noise (diffusers' `_get_variance` and its square root), or the learned-variance map.

        fixed_large_log: diffusers takes the square root of log(beta_t) (NaN); we read it as the
        log-variance it names: std = exp(log(beta_t) / 2) = sqrt(beta_t), as fixed_large.
        learned_range (IDDPM eq. 15): log var = frac log beta_t + (1 - frac) log beta~_t, frac = (v + 1) / 2,
        i.e. std = exp(bias + slope v) with bias = (max + min) / 4, slope = (max - min) / 4.
        learned_log_variance: v is the log-variance itself (Sohl-Dickstein et al. 2015's models output
        (mean, log variance)): std = exp(v / 2), bias 0, slope 1/2.
        """
        variance = torch.clamp(posterior_variance, min=1e-20)
        variance_type = schedules.effective_variance_type(self.config.variance_type, VARIANCE_TYPES, warn=False)
        one = torch.ones_like(variance)
        if variance_type == "fixed_small":
            return {"noise_std": variance ** 0.5}
        if variance_type == "fixed_small_log":
            return {"noise_std": torch.exp(0.5 * torch.log(variance))}
        if variance_type in ("fixed_large", "fixed_large_log"):
            return {"noise_std": beta_t ** 0.5}
        if variance_type == "learned":
            return {"noise_std": one}
        if variance_type == "learned_log_variance":
            return {"noise_std": one, "var_bias": 0 * one, "var_slope": 0.5 * one}
        min_log, max_log = torch.log(variance), torch.log(beta_t)
        return {"noise_std": one, "var_bias": (max_log + min_log) / 4, "var_slope": (max_log - min_log) / 4}

    # ---- training: the posterior mean target, the Gaussian KL's two sides ---------------------------
    def _posterior_float64(self) -> dict[str, torch.Tensor]:
        """Per training timestep t, float64 [T]: q(x_{t-1} | x_t, x0) = N(c_x0 x0 + c_xt x_t, variance)
        (DDPM eq. 6-7) with beta_t = 1 - abar_t / abar_{t-1} (abar_{-1} = 1), from diffusers' float32
        alphas_cumprod (the forward process add_noise / q_sample implement), in float64."""
        abar = self.alphas_cumprod.to(torch.float64)
        abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
        c_x0, c_xt = posterior_mean_coefficients(abar, abar_prev)
        beta = 1 - abar / abar_prev
        return {"c_x0": c_x0, "c_xt": c_xt, "beta": beta, "variance": (1 - abar_prev) / (1 - abar) * beta}

    def _one_step_posterior(self, device: torch.device) -> dict[str, torch.Tensor]:
        """_posterior_float64 and the x0 map of the prediction type, rounded once to float32, on `device`."""
        def make(d):
            values = self._posterior_float64()
            if self.config.prediction_type != "mean":
                values.update(x0_coefficients(self.config.prediction_type, self.alphas_cumprod.to(torch.float64)))
            return {name: upload(value.to(torch.float32), d) for name, value in values.items()}
        return self._on(device, ("posterior", self.config.prediction_type, id(self.alphas_cumprod)), make)

    def training_table(self, device: torch.device) -> torch.Tensor:
        """q-sample rows x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) n and the target of the prediction type;
        for "mean", the posterior mean mu~_t(x_t, x0) = c_x0 x0 + c_xt x_t (DDPM eq. 7) as p x0 + q n:
        p = c_x0 + c_xt sqrt(abar_t), q = c_xt sqrt(1 - abar_t) (at t = 0: x0 itself)."""
        if self.config.prediction_type != "mean":
            return super().training_table(device)

        def make(d):
            abar = self.alphas_cumprod.to(torch.float32)  # a, b as add_noise computes them (float32)
            a, b = (abar ** 0.5).double(), ((1 - abar) ** 0.5).double()
            post = self._posterior_float64()
            return upload(T.q_sample_table(a, b, post["c_x0"] + post["c_xt"] * a, post["c_xt"] * b), d)
        return self._on(device, ("q_sample", "mean", id(self.alphas_cumprod)), make)

    @staticmethod
    def _per_sample(values: torch.Tensor, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return values[timesteps].to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))

    def posterior_mean_log_variance(self, x0: torch.Tensor, x_t: torch.Tensor,
                                    timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance of q(x_{t-1} | x_t, x0) (DDPM eq. 6-7), per sample's timestep ([B] int64).
        At t = 0 the variance is 0 (log-variance -inf): x_{-1} is x0 itself."""
        post = self._one_step_posterior(x_t.device)
        c_x0, c_xt = (self._per_sample(post[name], timesteps, x_t) for name in ("c_x0", "c_xt"))
        mean = c_x0 * x0 + c_xt * x_t
        return mean, torch.log(self._per_sample(post["variance"], timesteps, x_t)).expand_as(mean)

    def model_mean_log_variance(self, model_output: torch.Tensor, x_t: torch.Tensor,
                                timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance of p_theta(x_{t-1} | x_t) for model_output = [prediction; v] (2x x_t's channels).

        Mean: the prediction itself ("mean"), else eq. 7's posterior mean of the x0 it implies (no
        clipping, as in training). Log-variance: v ("learned_log_variance"), or IDDPM eq. 15's
        frac log beta_t + (1 - frac) log beta~_t with frac = (v + 1) / 2 ("learned_range"; beta~_t
        clamped at 1e-20 as the step's table). Differentiable in model_output.
        """
        variance_type = self.config.variance_type
        if variance_type not in ("learned_log_variance", "learned_range"):
            raise ValueError("a model mean and log-variance needs a model that outputs its variance: "
                             "variance_type 'learned_log_variance' or 'learned_range', got "
                             f"{variance_type!r}")
        channels = x_t.shape[1]
        if model_output.ndim != x_t.ndim or model_output.shape[1] != 2 * channels \
                or model_output.shape[0] != x_t.shape[0] or model_output.shape[2:] != x_t.shape[2:]:
            raise ValueError(f"model output has shape {tuple(model_output.shape)}; a sample of shape "
                             f"{tuple(x_t.shape)} needs [prediction; log-variance] = "
                             f"{(x_t.shape[0], 2 * channels, *x_t.shape[2:])}")
        m, v = model_output[:, :channels], model_output[:, channels:]
        post = self._one_step_posterior(x_t.device)
        at = lambda name: self._per_sample(post[name], timesteps, x_t)  # noqa: E731
        if self.config.prediction_type == "mean":
            mean = m
        else:
            x0 = (at("x0_x") * x_t + at("x0_m") * m) * at("x0_scale")
            mean = at("c_x0") * x0 + at("c_xt") * x_t
        if variance_type == "learned_log_variance":
            return mean, v
        max_log, min_log = torch.log(at("beta")), torch.log(torch.clamp(at("variance"), min=1e-20))
        frac = (v + 1) / 2
        return mean, frac * max_log + (1 - frac) * min_log

    # ---- timesteps ----------------------------------------------------------------------------
    def _set_schedule(self, timesteps: np.ndarray, device) -> None:
        self._schedule = set(timesteps.tolist())
        self._previous = dict(zip(timesteps.tolist(), timesteps[1:].tolist() + [-1]))
        self._install_schedule(torch.from_numpy(timesteps), device)

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device: str | torch.device | None = None,
                      timesteps: Optional[list[int]] = None) -> None:
        """Choose the inference timesteps (spacing from the config, or custom descending `timesteps`)."""
        T_ = self.config.num_train_timesteps
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError("pass either num_inference_steps or timesteps, not both")
        if timesteps is not None:
            steps = np.array(list(timesteps), dtype=np.int64)
            if steps.ndim != 1 or len(steps) == 0 or np.any(np.diff(steps) >= 0) or steps[0] >= T_ or steps[-1] < 0:
                raise ValueError(f"timesteps must be a non-empty strictly descending list in [0, {T_}), got {list(timesteps)}")
            self.custom_timesteps, self.num_inference_steps = True, len(steps)
        else:
            if not isinstance(num_inference_steps, (int, np.integer)) or not 1 <= num_inference_steps <= T_:
                raise ValueError(f"num_inference_steps must be an int in [1, num_train_timesteps={T_}], "
                                 f"got {num_inference_steps!r}")
            steps = spaced_timesteps(T_, int(num_inference_steps), self.config.timestep_spacing, self.config.steps_offset)
            if steps.min() < 0 or steps.max() >= T_:
                raise ValueError(f"steps_offset={self.config.steps_offset} moves timesteps outside [0, {T_}): {steps.tolist()}")
            self.custom_timesteps, self.num_inference_steps = False, int(num_inference_steps)
        self._set_schedule(steps, device)

    def previous_timestep(self, timestep):
        """The next timestep of the schedule (-1 after the last), as diffusers defines it."""
        prev = self._previous.get(int(timestep))
        if prev is None:
            self._check_host_timestep(int(timestep))
        return torch.tensor(prev) if isinstance(timestep, torch.Tensor) else prev

    def _check_host_timestep(self, t: int) -> None:
        if t not in self._schedule:
            shown = sorted(self._schedule, reverse=True)
            shown = shown if len(shown) <= 12 else shown[:6] + ["..."] + shown[-6:]
            raise ValueError(f"timestep {t} is not in the schedule set by set_timesteps: {shown}")

    # ---- the step -----------------------------------------------------------------------------
    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True, *, variance_noise: Optional[torch.Tensor] = None, seed: Optional[int] = None,
             guidance_scale: Optional[float] = None, sample_offset: int = 0, out: Optional[torch.Tensor] = None,
             skip_layer_output: Optional[torch.Tensor] = None, skip_layer_guidance_scale: float = 0.0):
        """One reverse step x_t -> x_{t-1} (DDPM Algorithm 2 / eq. 7) in one fused op (`out=`: see BaseSampler)."""
        extra, extra_scale = self._skip_layer_guidance(skip_layer_output, skip_layer_guidance_scale)
        self._check_step_inputs(model_output, sample, guidance_scale, self._plan().variance_mode != T.VAR_FIXED,
                                guidance_extra=extra)
        index, host_t = self._timestep_index(timestep, sample.device)
        host_last = host_t == 0  # diffusers draws no noise at t = 0 (a device t: the row's std is 0)
        noise, seed = self._noise(sample, model_output, generator, variance_noise, seed, not host_last)
        return self._run_step(model_output, sample, self._table(sample.device), index, noise=noise, seed=seed,
                              sample_offset=sample_offset, guidance_scale=guidance_scale, advance=False,
                              guidance_extra=extra, extra_scale=extra_scale, out=out, return_dict=return_dict)

    # ---- diffusers' variance helper -----------------------------------------------------------
    def _get_variance(self, t, predicted_variance: Optional[torch.Tensor] = None,
                      variance_type: Optional[str] = None) -> torch.Tensor:
        """diffusers' DDPMScheduler._get_variance, value for value (float32, its operation order).

        What it returns depends on the type, as in diffusers: the posterior variance beta~_t
        (fixed_small, clamped at 1e-20), its square root (fixed_small_log), beta_t (fixed_large),
        log(beta_t) (fixed_large_log), `predicted_variance` itself (learned), the log-variance
        interpolated by `predicted_variance` in [-1, 1] (learned_range, IDDPM eq. 15). A type
        diffusers does not know falls through to beta~_t, as in diffusers; learned_log_variance
        (fastdiff) returns `predicted_variance`, the log-variance itself. The fused step does
        not call this: its noise std is a column of the step table.
        """
        prev_t = self.previous_timestep(t)
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else torch.tensor(1.0)
        current_beta_t = 1 - alpha_prod_t / alpha_prod_t_prev
        variance = (1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * current_beta_t  # DDPM eq. 7
        variance = torch.clamp(variance, min=1e-20)
        if variance_type is None:
            variance_type = self.config.variance_type
        if variance_type == "fixed_small_log":
            variance = torch.exp(0.5 * torch.log(variance))
        elif variance_type == "fixed_large":
            variance = current_beta_t
        elif variance_type == "fixed_large_log":
            variance = torch.log(current_beta_t)
        elif variance_type in ("learned", "learned_log_variance"):
            return predicted_variance
        elif variance_type == "learned_range":
            min_log, max_log = torch.log(variance), torch.log(current_beta_t)
            frac = (predicted_variance + 1) / 2
            variance = frac * max_log + (1 - frac) * min_log
        return variance
