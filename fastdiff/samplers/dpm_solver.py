"""DPMSolverMultistepSampler: a drop-in for diffusers' DPMSolverMultistepScheduler, a table builder on the
fused step (DPM-Solver, Lu et al. 2022, arXiv:2206.00927; DPM-Solver++, Lu et al. 2022, arXiv:2211.01095).

With lambda = log(alpha / sigma), h = lambda_t - lambda_s0, r0 = h_0 / h, r1 = h_1 / h (the previous
step sizes) and m0, m1, m2 the data predictions x0 of this and the two previous steps, DPM-Solver++
multistep reads (DPM-Solver++ eq. 8 and Algorithm 2; the third order as in DPM-Solver's code):

    order 1 (DDIM):  x_t = (sigma_t / sigma_s0) x - alpha_t (e^-h - 1) m0
    order 2:         D1 = (m0 - m1) / r0
                     midpoint: x_t = ... - 1/2 alpha_t (e^-h - 1) D1;  heun: ... + alpha_t ((e^-h - 1) / h + 1) D1
    order 3:         D1_0 = (m0 - m1) / r0,  D1_1 = (m1 - m2) / r1,  D2 = (D1_0 - D1_1) / (r0 + r1)
                     D1 = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1)
                     x_t = ... + alpha_t ((e^-h - 1) / h + 1) D1 - alpha_t ((e^-h - 1 + h) / h^2 - 1/2) D2

sde-dpmsolver++ solves the reverse SDE instead (x_t keeps e^-h of x, the data terms weigh 1 - e^-2h, and
sigma_t sqrt(1 - e^-2h) n is added); the deprecated dpmsolver / sde-dpmsolver integrate the noise
prediction eps instead of x0 (DPM-Solver eq. 3.7). Every term is linear in (x, m, x0, the history)
with coefficients that depend only on the schedule, so `set_timesteps` computes one table row per
step and order in force, and a step is one fused op (fastdiff.tables):

    x0 = (X0_X x + X0_M m) X0_SCALE  (then thresholding)        the prediction type as numbers
    hist  = this step's history quantity: x0 (dpmsolver++ kinds) or eps (dpmsolver kinds, re-derived
            from the thresholded x0 when thresholding, as diffusers does), written to slot i mod K
    out   = OUT_X x + OUT_M m + OUT_X0 x0 + OUT_H1 m1 + OUT_H2 m2 + NOISE_STD n
    h1, h2 = slots (i - 1) mod K and (i - 2) mod K: the ring of K = solver_order history slots

The order in force is part of the row: warm-up (the first solver_order - 1 steps after the loop's
first step), `lower_order_final` (fewer than 15 steps), `euler_at_final`, a final sigma of 0. Rows
for each warm-up stage are built once; the first step of a loop picks, on the device, the rows for
its first index (diffusers counts warm-up from the first step taken, img2img included), so no step
synchronises with the host and one captured step replays a whole loop.

The third-order SDE update (sde-dpmsolver++, solver_order=3). diffusers 0.42 weighs D2 with
alpha_t ((1 - e^-2h - 2h) / (2h)^2 - 1/2), which tends to -alpha_t as h -> 0; the DPM-Solver
derivation (the integral of 2 e^-2(lambda_t - lambda) x0(lambda) over the step, the same phi_3 as
the ODE's third order) gives alpha_t ((1 - e^-2h - 2h) / (2h)^2 + 1/2) = -alpha_t phi_3(2h), which
tends to 0 like h / 3, and is what k-diffusion's `sample_dpmpp_3m_sde` uses. diffusers' sign is a
bug, not a choice: integrating a smooth x0(lambda) with exact history, its third-order SDE step
converges with order 1.0 (global error halves when h halves) while k-diffusion's and the second-order
step converge with order 2 (tests/test_dpm_solver.py, `test_sde_third_order_convergence`). So the default,
`sde_third_order="k-diffusion"`, uses the +1/2; `sde_third_order="diffusers"` reproduces diffusers
bit for bit in its operation order. (Aside, documented not changed: with D2 = (D1_0 - D1_1) / (r0 + r1)
~ h^2 x0'' / 2, a Taylor-exact third order would weigh D2 twice as much, -2 phi_3; every reference
implementation -- DPM-Solver's multistep code, diffusers' ODE third order, k-diffusion -- uses
-phi_3, so the "3M" updates converge with order 2, with a smaller constant than 2M.)

Other differences from diffusers, all on purpose: `step` never synchronises with the device and takes
`seed=` (in-kernel Philox noise for the SDE kinds, counter = the step index), `guidance_scale=`
(CFG fused, model_output = [uncond; cond]), `skip_layer_output=` / `skip_layer_guidance_scale=`
(SD3-style skip-layer guidance, fused), `sample_offset=` and `out=`; learned-variance outputs keep
their first C channels for any C (diffusers slices `[:, :3]`); flow_prediction without use_flow_sigmas,
custom `timesteps` with use_flow_sigmas and a third order for sde-dpmsolver (all of which diffusers
accepts and then computes garbage or crashes on) are named errors; `set_timesteps(mu=)` replaces the
config with one whose flow_shift is e^mu (diffusers writes the same into its config).
`table_dtype="float64"` derives the coefficients in float64 instead of diffusers' float32.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

from . import sigmas as S
from .base import check_choice
from .config import register_to_config
from .multistep import HISTORY, X, X0, MultistepSampler, row_columns, table_from_rows

ALGORITHM_TYPES = ("dpmsolver++", "sde-dpmsolver++", "dpmsolver", "sde-dpmsolver")
SOLVER_TYPES = ("midpoint", "heun")
SDE_THIRD_ORDER = ("k-diffusion", "diffusers")
VARIANCE_TYPES = (None, "learned", "learned_range")


class DPMSolverMultistepSampler(MultistepSampler):
    """Same constructor, config keys and defaults as `diffusers.DPMSolverMultistepScheduler`, plus
    `sde_third_order` and `table_dtype` (module docstring). A step is one fused op with the history
    of data (or noise) predictions in a device ring buffer; no host synchronisation anywhere."""

    diffusers_class_name = "DPMSolverMultistepScheduler"

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, solver_order: int = 2,
                 prediction_type: str = "epsilon", thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, sample_max_value: float = 1.0,
                 algorithm_type: str = "dpmsolver++", solver_type: str = "midpoint", lower_order_final: bool = True,
                 euler_at_final: bool = False, use_karras_sigmas: bool = False, use_exponential_sigmas: bool = False,
                 use_beta_sigmas: bool = False, use_lu_lambdas: bool = False, use_flow_sigmas: bool = False,
                 flow_shift: float = 1.0, final_sigmas_type: str = "zero", lambda_min_clipped: float = -float("inf"),
                 variance_type: Optional[str] = None, timestep_spacing: str = "linspace", steps_offset: int = 0,
                 rescale_betas_zero_snr: bool = False, use_dynamic_shifting: bool = False,
                 time_shift_type: str = "exponential", sde_third_order: str = "k-diffusion",
                 table_dtype: str = "float32"):
        # diffusers maps the names of its other solvers onto these (a config switched with from_config)
        renamed = {}
        if algorithm_type == "deis":
            renamed["algorithm_type"] = "dpmsolver++"
        if solver_type in ("logrho", "bh1", "bh2"):
            renamed["solver_type"] = "midpoint"
        if renamed:
            self.register_to_config(**renamed)
        config = self.config
        check_choice("algorithm_type", config.algorithm_type, ALGORITHM_TYPES)
        check_choice("solver_type", config.solver_type, SOLVER_TYPES)
        check_choice("variance_type", variance_type, VARIANCE_TYPES)
        check_choice("sde_third_order", sde_third_order, SDE_THIRD_ORDER)
        check_choice("time_shift_type", time_shift_type, ("exponential",))
        if config.algorithm_type in ("dpmsolver", "sde-dpmsolver") and final_sigmas_type == "zero":
            raise ValueError(f"final_sigmas_type='zero' is not supported for algorithm_type={config.algorithm_type!r} "
                             "(its noise-prediction update divides by sigma = 0): use final_sigmas_type='sigma_min'")
        if config.algorithm_type == "sde-dpmsolver" and solver_order == 3:
            raise ValueError("algorithm_type='sde-dpmsolver' has no third-order update (diffusers crashes at its third "
                             "step): use solver_order 1 or 2, or algorithm_type='sde-dpmsolver++'")
        if config.algorithm_type in ("dpmsolver", "sde-dpmsolver") and prediction_type == "flow_prediction":
            raise ValueError(f"algorithm_type={config.algorithm_type!r} integrates the noise prediction, which a "
                             "flow_prediction model does not give: use dpmsolver++ or sde-dpmsolver++")
        if use_lu_lambdas and (use_karras_sigmas or use_exponential_sigmas or use_beta_sigmas or use_flow_sigmas):
            raise ValueError("use_lu_lambdas cannot be combined with karras / exponential / beta / flow sigmas")
        self._init_multistep()

    # ---- configuration-derived properties -------------------------------------------------------
    @property
    def noisy(self) -> bool:
        return self.config.algorithm_type in ("sde-dpmsolver++", "sde-dpmsolver")

    @property
    def variance_channels(self) -> bool:
        return self.config.variance_type in ("learned", "learned_range")

    @property
    def _data_prediction(self) -> bool:  # DPM-Solver++ kinds integrate x0, the deprecated kinds eps
        return self.config.algorithm_type in ("dpmsolver++", "sde-dpmsolver++")

    @property
    def warmup_stages(self) -> int:
        return self.config.solver_order

    @property
    def history_slots(self) -> int:
        return self.config.solver_order if self.config.solver_order > 1 else 0

    @property
    def history_reads(self) -> int:
        return self.config.solver_order - 1

    @property
    def writes_history(self) -> bool:
        return self.config.solver_order > 1

    # ---- timesteps ----------------------------------------------------------------------------
    def set_timesteps(self, num_inference_steps: Optional[int] = None, device: str | torch.device | None = None,
                      mu: Optional[float] = None, timesteps: Optional[list[int]] = None) -> None:
        """diffusers' schedule: spacing (or custom `timesteps`), then Karras / Lu / exponential / beta /
        flow sigmas; `mu` (dynamic shifting) sets flow_shift = e^mu in the config, as diffusers."""
        if mu is not None:
            if not (self.config.use_dynamic_shifting and self.config.time_shift_type == "exponential"):
                raise ValueError("mu needs use_dynamic_shifting=True (and time_shift_type='exponential')")
            self.register_to_config(flow_shift=float(np.exp(mu)))  # a new config object: tables rebuild
        config = self.config
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("pass exactly one of num_inference_steps and timesteps")
        T_ = config.num_train_timesteps
        if timesteps is not None:
            for key in ("use_karras_sigmas", "use_lu_lambdas", "use_exponential_sigmas", "use_beta_sigmas",
                        "use_flow_sigmas"):
                if config[key]:
                    raise ValueError(f"custom timesteps cannot be used with {key}=True")
            steps = np.array(list(timesteps)).astype(np.int64)
            if steps.ndim != 1 or len(steps) == 0 or np.any(np.diff(steps) >= 0) or steps[0] >= T_ or steps[-1] < 0:
                raise ValueError(f"timesteps must be a non-empty strictly descending list in [0, {T_}), "
                                 f"got {list(timesteps)}")
            n = len(steps)
        else:
            n = self._check_steps(num_inference_steps)
            last = S.lambda_clipped_last_timestep(self.lambda_t, config.lambda_min_clipped, T_)
            steps = S.multistep_timesteps(n, config.timestep_spacing, config.steps_offset, T_, last)
            if steps.min() < 0 or steps.max() >= T_:
                raise ValueError(f"steps_offset={config.steps_offset} moves timesteps outside [0, {T_}): "
                                 f"{steps.tolist()}")
        sigmas = S.vp_sigmas(self.alphas_cumprod)
        log_sigmas = np.log(sigmas)
        conversion = S.sigma_conversion(config)
        if conversion is not None:
            sigmas = S.convert_sigmas(conversion, np.flip(sigmas).copy(), n)
            steps = S.sigmas_to_timesteps(sigmas, log_sigmas)
            if conversion == "use_karras_sigmas" and config.beta_schedule != "squaredcos_cap_v2":
                steps = steps.round()
        elif config.use_lu_lambdas:
            lambdas = S.lu_lambdas(np.flip(log_sigmas.copy()), n)
            sigmas = np.exp(lambdas)
            steps = S.sigmas_to_timesteps(sigmas, log_sigmas)
            if config.beta_schedule != "squaredcos_cap_v2":
                steps = steps.round()
        elif config.use_flow_sigmas:
            sigmas = S.flow_sigmas(T_, n, config.flow_shift)
            steps = (sigmas * T_).copy()
        else:
            sigmas = np.interp(steps, np.arange(0, len(sigmas)), sigmas)
        sigmas = np.concatenate([sigmas, [self._final_sigma(True, 0.0)]]).astype(np.float32)
        self._set_schedule(sigmas, steps, device)

    # ---- the rows ---------------------------------------------------------------------------------
    def _order(self, i: int, stage: int) -> int:
        """The order diffusers uses at step i after `stage` steps taken (its lower_order_nums)."""
        config, n = self.config, self.num_inference_steps
        lower_final = i == n - 1 and (config.euler_at_final or (config.lower_order_final and n < 15)
                                      or config.final_sigmas_type == "zero")
        lower_second = i == n - 2 and config.lower_order_final and n < 15
        if config.solver_order == 1 or stage < 1 or lower_final:
            order = 1
        elif config.solver_order == 2 or stage < 2 or lower_second:
            order = 2
        else:
            order = 3
        return min(order, i + 1)  # rows before the loop's first index are never read; keep them well-formed

    def _stage_table(self, stage: int) -> torch.Tensor:
        rows = [self._row(i, self._order(i, stage)) for i in range(self.num_inference_steps)]
        return table_from_rows(rows, f"{type(self).__name__}({self.config.algorithm_type}, order "
                                     f"{self.config.solver_order})")

    def _make_row(self, i: int, order: int) -> dict[str, Any]:
        """Row i: diffusers' update of this order, term by term, on the step's inputs (Lin)."""
        config, K = self.config, self.config.solver_order
        thresholded = bool(config.thresholding)
        # this step's history quantity: x0 (DPM-Solver++) or eps (DPM-Solver), after thresholding
        model_output = X0 if self._data_prediction else self._eps(i, thresholded)
        history = (model_output, HISTORY[0], HISTORY[1])  # m0, m1, m2 (previous steps: slots (i-1), (i-2) mod K)
        update = (self._first_order, self._second_order, self._third_order)[order - 1]
        out, noise_std = update(i, history)
        reads = tuple((i - k) % K for k in range(1, K)) if K > 1 else ()
        return row_columns(out, hist=model_output if K > 1 else None, reads=reads, hist_slot=i % K if K > 1 else 0,
                           noise_std=noise_std, **self._x0_columns(i))

    def _lambdas(self, i: int, back: int):
        """(alpha_t, sigma_t) of the target sigma and (alpha, sigma, lambda) of sigmas i, i-1, ..., i-back."""
        s = self._scalars()
        target = (s.alpha[i + 1], s.sig[i + 1], s.lam[i + 1])
        return target, [(s.alpha[i - j], s.sig[i - j], s.lam[i - j]) for j in range(back + 1)]

    def _first_order(self, i: int, m):
        """DPM-Solver(++)-1 (equivalent to DDIM): diffusers' dpm_solver_first_order_update."""
        (alpha_t, sigma_t, lambda_t), [(alpha_s, sigma_s, lambda_s)] = self._lambdas(i, 0)
        h = lambda_t - lambda_s
        algorithm, x0, noise = self.config.algorithm_type, m[0], 0.0
        if algorithm == "dpmsolver++":
            x_t = (sigma_t / sigma_s) * X - (alpha_t * (torch.exp(-h) - 1.0)) * x0
        elif algorithm == "dpmsolver":
            x_t = (alpha_t / alpha_s) * X - (sigma_t * (torch.exp(h) - 1.0)) * x0
        elif algorithm == "sde-dpmsolver++":
            x_t = (sigma_t / sigma_s * torch.exp(-h)) * X + (alpha_t * (1 - torch.exp(-2.0 * h))) * x0
            noise = sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h))
        else:  # sde-dpmsolver
            x_t = (alpha_t / alpha_s) * X - 2.0 * (sigma_t * (torch.exp(h) - 1.0)) * x0
            noise = sigma_t * torch.sqrt(torch.exp(2 * h) - 1.0)
        return x_t, noise

    def _second_order(self, i: int, m):
        """Multistep DPM-Solver(++)-2M: diffusers' multistep_dpm_solver_second_order_update."""
        (alpha_t, sigma_t, lambda_t), [(alpha_s0, sigma_s0, lambda_s0), (_, _, lambda_s1)] = self._lambdas(i, 1)
        m0, m1 = m[0], m[1]
        h, h_0 = lambda_t - lambda_s0, lambda_s0 - lambda_s1
        r0 = h_0 / h
        D0, D1 = m0, (1.0 / r0) * (m0 - m1)
        algorithm, midpoint, noise = self.config.algorithm_type, self.config.solver_type == "midpoint", 0.0
        if algorithm == "dpmsolver++":  # DPM-Solver++ eq. 8 / Algorithm 2
            x_t = (sigma_t / sigma_s0) * X - (alpha_t * (torch.exp(-h) - 1.0)) * D0
            if midpoint:
                x_t = x_t - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * D1
            else:
                x_t = x_t + (alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0)) * D1
        elif algorithm == "dpmsolver":
            x_t = (alpha_t / alpha_s0) * X - (sigma_t * (torch.exp(h) - 1.0)) * D0
            if midpoint:
                x_t = x_t - 0.5 * (sigma_t * (torch.exp(h) - 1.0)) * D1
            else:
                x_t = x_t - (sigma_t * ((torch.exp(h) - 1.0) / h - 1.0)) * D1
        elif algorithm == "sde-dpmsolver++":
            x_t = (sigma_t / sigma_s0 * torch.exp(-h)) * X + (alpha_t * (1 - torch.exp(-2.0 * h))) * D0
            if midpoint:
                x_t = x_t + 0.5 * (alpha_t * (1 - torch.exp(-2.0 * h))) * D1
            else:
                x_t = x_t + (alpha_t * ((1.0 - torch.exp(-2.0 * h)) / (-2.0 * h) + 1.0)) * D1
            noise = sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h))
        else:  # sde-dpmsolver
            x_t = (alpha_t / alpha_s0) * X - 2.0 * (sigma_t * (torch.exp(h) - 1.0)) * D0
            if midpoint:
                x_t = x_t - (sigma_t * (torch.exp(h) - 1.0)) * D1
            else:
                x_t = x_t - 2.0 * (sigma_t * ((torch.exp(h) - 1.0) / h - 1.0)) * D1
            noise = sigma_t * torch.sqrt(torch.exp(2 * h) - 1.0)
        return x_t, noise

    def _third_order(self, i: int, m):
        """Multistep DPM-Solver(++)-3M: diffusers' multistep_dpm_solver_third_order_update (the SDE's D2
        weight per `sde_third_order`, module docstring)."""
        (alpha_t, sigma_t, lambda_t), [(alpha_s0, sigma_s0, lambda_s0), (_, _, lambda_s1), (_, _, lambda_s2)] = \
            self._lambdas(i, 2)
        m0, m1, m2 = m
        h, h_0, h_1 = lambda_t - lambda_s0, lambda_s0 - lambda_s1, lambda_s1 - lambda_s2
        r0, r1 = h_0 / h, h_1 / h
        D0 = m0
        D1_0, D1_1 = (1.0 / r0) * (m0 - m1), (1.0 / r1) * (m1 - m2)
        D1 = D1_0 + (r0 / (r0 + r1)) * (D1_0 - D1_1)
        D2 = (1.0 / (r0 + r1)) * (D1_0 - D1_1)
        algorithm, noise = self.config.algorithm_type, 0.0
        if algorithm == "dpmsolver++":
            x_t = ((sigma_t / sigma_s0) * X - (alpha_t * (torch.exp(-h) - 1.0)) * D0
                   + (alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0)) * D1
                   - (alpha_t * ((torch.exp(-h) - 1.0 + h) / h**2 - 0.5)) * D2)
        elif algorithm == "dpmsolver":
            x_t = ((alpha_t / alpha_s0) * X - (sigma_t * (torch.exp(h) - 1.0)) * D0
                   - (sigma_t * ((torch.exp(h) - 1.0) / h - 1.0)) * D1
                   - (sigma_t * ((torch.exp(h) - 1.0 - h) / h**2 - 0.5)) * D2)
        else:  # sde-dpmsolver++ (sde-dpmsolver has no third order: rejected in __init__)
            half = 0.5 if self.config.sde_third_order == "k-diffusion" else -0.5  # -phi_3(2h) vs diffusers' sign
            x_t = ((sigma_t / sigma_s0 * torch.exp(-h)) * X + (alpha_t * (1.0 - torch.exp(-2.0 * h))) * D0
                   + (alpha_t * ((1.0 - torch.exp(-2.0 * h)) / (-2.0 * h) + 1.0)) * D1
                   + (alpha_t * ((1.0 - torch.exp(-2.0 * h) - 2.0 * h) / (2.0 * h) ** 2 + half)) * D2)
            noise = sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h))
        return x_t, noise

    # ---- the step -----------------------------------------------------------------------------
    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             variance_noise: Optional[torch.Tensor] = None, return_dict: bool = True, *, seed: Optional[int] = None,
             guidance_scale: Optional[float] = None, skip_layer_output: Optional[torch.Tensor] = None,
             skip_layer_guidance_scale: float = 0.0, sample_offset: int = 0, out: Optional[torch.Tensor] = None):
        """One multistep DPM-Solver(++) step in one fused op: converts the model output, writes it into
        the history ring and takes the update of the order in force (`out=`: see BaseSampler).

        SDE kinds: noise from `generator` (drawn as diffusers draws it, every step), `variance_noise`,
        or `seed` (in-kernel Philox, counter = the step index); none: a seed from torch's CPU generator.
        """
        return self._step(model_output, timestep, sample, generator, variance_noise, return_dict, seed,
                          guidance_scale, skip_layer_output, skip_layer_guidance_scale, sample_offset, out)
