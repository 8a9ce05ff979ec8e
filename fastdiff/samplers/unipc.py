"""UniPCMultistepSampler: a drop-in for diffusers' UniPCMultistepScheduler (UniPC, Zhao et al. 2023,
"UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion Models", arXiv:2302.04867),
a table builder on the fused step.

With lambda = log(alpha / sigma), h = lambda_t - lambda_s0, m the converted model outputs (x0 with
predict_x0, else eps), r_k = (lambda_{s_k} - lambda_s0) / h and D1_k = (m_{s_k} - m0) / r_k
(UniPC Algorithm 2, the B(h) variant; hh = -h for predict_x0, B(h) = hh (bh1) or e^hh - 1 (bh2)):

    UniC-p (corrector, at step i, after the model saw x_i):
        x_i^c = (sigma_i / sigma_{i-1}) x_{i-1}^c - alpha_i (e^hh - 1) m_{i-1}
                - alpha_i B(h) (sum_k rho^c_k D1_k + rho^c_p (m_i - m_{i-1}))
    UniP-p (predictor, the next sample):
        x_{i+1} = (sigma_{i+1} / sigma_i) x_i^c - alpha_{i+1} (e^hh - 1) m_i - alpha_{i+1} B(h) sum_k rho^p_k D1_k

(alpha and sigma swap roles for predict_x0=False.) The rho solve small linear systems R rho = b
(UniPC eq. 8) that depend only on the schedule: diffusers solves them on the device every step
(`torch.linalg.solve`, a host sync); here `set_timesteps` solves them on the host in float32, in
diffusers' operation order (float64 with table_dtype="float64"). The corrected sample x_i^c is
linear in (x_{i-1}^c, the history m_{i-1} .. m_{i-p}, m_i) and m_i is linear in (x_i, model output,
x0), so corrector and predictor fold into ONE row of the fused step (fastdiff.tables):

    hist = m_i                                   -> slot i mod (K + 1)        (K = solver_order)
    out2 = x_i^c (the corrected sample)          -> slot K + 1 + (i mod 2)     (read by step i + 1)
    out  = x_{i+1} = OUT_X x + OUT_M m + OUT_X0 x0 + OUT_H1 x_{i-1}^c + OUT_H2.. m_{i-1} .. m_{i-K}

The order in force is part of the row: warm-up (diffusers' lower_order_nums: the predictor order
grows by one per step taken, the corrector uses the previous step's predictor order),
`lower_order_final` (order min(K, steps left), at any number of steps), `disable_corrector`
(step indices whose following corrector is skipped); warm-up rows are picked on the device for
the loop's first index (see MultistepSampler), so no step synchronises with the host.

Differences from diffusers, all on purpose: no host sync; `step` also takes `seed=` / `generator=`
(accepted and unused: UniPC draws no noise, so fastdiff.sample can pass them), `guidance_scale=`,
`skip_layer_output=` / `skip_layer_guidance_scale=`, `sample_offset=`, `out=`; solver_order is 1 to 3
(the row reads at most 4 history values); `solver_p` (another scheduler as predictor) is not
supported; flow_prediction needs use_flow_sigmas and predict_x0; a schedule whose coefficients are
not finite (lower_order_final=False with final_sigmas_type="zero": diffusers returns inf samples)
is a named error at set_timesteps.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import torch

from . import sigmas as S
from .base import check_choice
from .config import register_to_config
from .multistep import HISTORY, X, X0, ZERO, MultistepSampler, row_columns, table_from_rows

SOLVER_TYPES = ("bh1", "bh2")


class UniPCMultistepSampler(MultistepSampler):
    """Same constructor, config keys and defaults as `diffusers.UniPCMultistepScheduler` (plus
    `table_dtype`). A step is one fused op: corrector, predictor and history writes together."""

    diffusers_class_name = "UniPCMultistepScheduler"

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, solver_order: int = 2,
                 prediction_type: str = "epsilon", thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, sample_max_value: float = 1.0, predict_x0: bool = True,
                 solver_type: str = "bh2", lower_order_final: bool = True, disable_corrector: list[int] = [],  # noqa: B006
                 solver_p=None, use_karras_sigmas: bool = False, use_exponential_sigmas: bool = False,
                 use_beta_sigmas: bool = False, use_flow_sigmas: bool = False, flow_shift: float = 1.0,
                 timestep_spacing: str = "linspace", steps_offset: int = 0, final_sigmas_type: str = "zero",
                 rescale_betas_zero_snr: bool = False, use_dynamic_shifting: bool = False,
                 time_shift_type: str = "exponential", sigma_min: Optional[float] = None,
                 sigma_max: Optional[float] = None, shift_terminal: Optional[float] = None,
                 table_dtype: str = "float32"):
        if solver_type in ("midpoint", "heun", "logrho"):  # diffusers maps DPM-Solver's names (from_config)
            self.register_to_config(solver_type="bh2")
        config = self.config
        check_choice("solver_type", config.solver_type, SOLVER_TYPES)
        check_choice("time_shift_type", time_shift_type, S.TIME_SHIFT_TYPES)
        if solver_p is not None:
            raise ValueError("solver_p (another scheduler as UniPC's predictor) is not supported by "
                             "UniPCMultistepSampler; use the UniP predictor (solver_p=None)")
        if shift_terminal is not None and not use_flow_sigmas:
            raise ValueError("shift_terminal is only supported with use_flow_sigmas=True")
        if prediction_type == "flow_prediction" and not predict_x0:
            raise ValueError("prediction_type='flow_prediction' needs predict_x0=True (a flow model gives no noise "
                             "prediction to integrate)")
        if isinstance(disable_corrector, (str, bytes)) or not all(
                isinstance(k, (int, np.integer)) and not isinstance(k, bool) for k in disable_corrector):
            raise ValueError(f"disable_corrector must be a list of step indices (ints), got {disable_corrector!r}")
        self._init_multistep()
        self.predict_x0 = predict_x0
        self.disable_corrector = list(disable_corrector)
        self.solver_p = None

    # ---- configuration-derived properties -------------------------------------------------------
    @property
    def warmup_stages(self) -> int:  # steps taken 0 .. solver_order (the last: every later step)
        return self.config.solver_order + 1

    @property
    def history_slots(self) -> int:  # K + 1 model outputs, 2 corrected samples
        return self.config.solver_order + 3

    @property
    def history_reads(self) -> int:  # x_{i-1}^c, m_{i-1} .. m_{i-K}
        return self.config.solver_order + 1

    writes_history = True
    writes_out2 = True

    # ---- timesteps ----------------------------------------------------------------------------
    def set_timesteps(self, num_inference_steps: Optional[int] = None, device: str | torch.device | None = None,
                      sigmas: Optional[Sequence[float]] = None, mu: Optional[float] = None) -> None:
        """diffusers' schedule: spacing, then Karras / exponential / beta / flow sigmas (custom `sigmas`
        with use_flow_sigmas; `mu` = the dynamic shift, required with use_dynamic_shifting)."""
        config = self.config
        if config.use_dynamic_shifting and mu is None:
            raise ValueError("mu must be passed to set_timesteps when use_dynamic_shifting=True")
        T_ = config.num_train_timesteps
        if sigmas is not None:
            if not config.use_flow_sigmas:
                raise ValueError("custom sigmas are only supported with use_flow_sigmas=True")
            sigmas = np.array(sigmas, dtype=np.float64)
            S.check_descending(sigmas, "sigmas")
            num_inference_steps = len(sigmas)
        n = self._check_steps(num_inference_steps)
        steps = S.multistep_timesteps(n, config.timestep_spacing, config.steps_offset, T_)
        if steps.min() < 0 or steps.max() >= T_:
            raise ValueError(f"steps_offset={config.steps_offset} moves timesteps outside [0, {T_}): {steps.tolist()}")
        conversion = S.sigma_conversion(config)
        if conversion is not None:
            if sigmas is None:
                sigmas = S.vp_sigmas(self.alphas_cumprod)
            log_sigmas = np.log(sigmas)
            sigmas = S.convert_sigmas(conversion, np.flip(sigmas).copy(), n, config.sigma_min, config.sigma_max)
            if conversion == "use_karras_sigmas" and config.use_flow_sigmas:
                sigmas = sigmas / (sigmas + 1)
                steps = (sigmas * T_).copy()
            else:
                steps = S.sigmas_to_timesteps(sigmas, log_sigmas)
                if conversion == "use_karras_sigmas":
                    steps = steps.round()
            last = self._final_sigma(False, sigmas[-1])
        elif config.use_flow_sigmas:
            if sigmas is None:
                sigmas = np.linspace(1, 1 / T_, n + 1)[:-1]
            if config.use_dynamic_shifting:
                sigmas = S.time_shift(mu, 1.0, sigmas, config.time_shift_type)
            else:
                sigmas = S.flow_shift(sigmas, config.flow_shift)
            if config.shift_terminal:
                sigmas = S.stretch_shift_to_terminal(sigmas, config.shift_terminal)
            sigmas = np.array(sigmas, dtype=np.float64)
            if np.fabs(sigmas[0] - 1) < 1e-6:
                sigmas[0] -= 1e-6  # as diffusers: alpha = 1 - sigma must not be 0 (log(alpha) in the first steps)
            steps = (sigmas * T_).copy()
            last = self._final_sigma(False, sigmas[-1])
        else:
            sigmas = np.interp(steps, np.arange(0, T_), S.vp_sigmas(self.alphas_cumprod))
            last = self._final_sigma(True, 0.0)
        sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
        self._set_schedule(sigmas, steps, device)

    # ---- the rows ---------------------------------------------------------------------------------
    def _orders(self, i: int, taken: int) -> tuple[int, int]:
        """(corrector order or 0, predictor order) diffusers uses at step i after `taken` steps."""
        config, n, K = self.config, self.num_inference_steps, self.config.solver_order

        def predictor(j: int, before: int) -> int:  # diffusers' this_order at step j after `before` steps
            order = min(K, n - j) if config.lower_order_final else K
            return min(order, min(before, K) + 1)

        p = min(predictor(i, taken), i + 1)  # rows before the loop's first index are never read
        c = 0
        if taken >= 1 and i >= 1 and (i - 1) not in self.disable_corrector:
            c = min(predictor(i - 1, taken - 1), i)
        return c, p

    def _stage_table(self, stage: int) -> torch.Tensor:
        rows = [self._row(i, *self._orders(i, stage)) for i in range(self.num_inference_steps)]
        return table_from_rows(rows, f"UniPCMultistepSampler({self.config.solver_type}, order "
                                     f"{self.config.solver_order}, lower_order_final={self.config.lower_order_final}, "
                                     f"final_sigmas_type={self.config.final_sigmas_type!r})")

    def _make_row(self, i: int, corrector_order: int, predictor_order: int) -> dict[str, Any]:
        K = self.config.solver_order
        model_t = X0 if self.predict_x0 else self._eps(i, False)  # convert_model_output (no thresholding on eps)
        last_sample = HISTORY[0]
        previous = {j: HISTORY[j] for j in range(1, K + 1)}  # m_{i-j}
        sample = self._corrector(i, corrector_order, model_t, last_sample, previous) if corrector_order else X
        out = self._predictor(i, predictor_order, model_t, sample, previous)
        M_ = K + 1  # model-output slots
        reads = (M_ + (i - 1) % 2, *((i - j) % M_ for j in range(1, K + 1)))
        return row_columns(out, hist=model_t, out2=sample, reads=reads, hist_slot=i % M_, out2_slot=M_ + i % 2,
                           **self._x0_columns(i))

    def _bh(self, h: torch.Tensor, rks: list, order: int):
        """diffusers' B(h) quantities: hh, h phi_1, B(h), and the system R rho = b (UniPC eq. 8)."""
        dtype = h.dtype
        rks = torch.stack([*rks, torch.ones((), dtype=dtype)])
        hh = -h if self.predict_x0 else h
        h_phi_1 = torch.expm1(hh)  # h phi_1(h) = e^h - 1
        h_phi_k = h_phi_1 / hh - 1
        factorial_i = 1
        B_h = hh if self.config.solver_type == "bh1" else torch.expm1(hh)
        R, b = [], []
        for i in range(1, order + 1):
            R.append(torch.pow(rks, i - 1))
            b.append(h_phi_k * factorial_i / B_h)
            factorial_i *= i + 1
            h_phi_k = h_phi_k / hh - 1 / factorial_i
        return h_phi_1, B_h, torch.stack(R), torch.stack(b)

    def _bh_update(self, t: int, s0: int, order: int, x, m0, earlier: list):
        """What UniP and UniC share (diffusers' multistep_uni_{p,c}_bh_update, from step s0 to t): the
        first-order base x_t_, the scale of the correction, the divided differences D1 of the
        `earlier` (table index, model output) pairs against m0, and the system R rho = b."""
        s = self._scalars()
        alpha_t, sigma_t, alpha_s0, sigma_s0 = s.alpha[t], s.sig[t], s.alpha[s0], s.sig[s0]
        h = s.lam[t] - s.lam[s0]
        rks = [(s.lam[j] - s.lam[s0]) / h for j, _ in earlier]
        D1s = [(m - m0) / rk for (_, m), rk in zip(earlier, rks)]
        h_phi_1, B_h, R, b = self._bh(h, rks, order)
        if self.predict_x0:
            x_t_ = sigma_t / sigma_s0 * x - alpha_t * h_phi_1 * m0
            scale = alpha_t * B_h
        else:
            x_t_ = alpha_t / alpha_s0 * x - sigma_t * h_phi_1 * m0
            scale = sigma_t * B_h
        return x_t_, scale, D1s, R, b

    def _corrector(self, i: int, order: int, model_t, last_sample, previous):
        """UniC-p: diffusers' multistep_uni_c_bh_update at step i (m0 = m_{i-1}, x = x_{i-1}^c)."""
        m0 = previous[1]
        earlier = [(i - (k + 1), previous[k + 1]) for k in range(1, order)]
        x_t_, scale, D1s, R, b = self._bh_update(i, i - 1, order, last_sample, m0, earlier)
        rhos_c = torch.ones(1, dtype=R.dtype) * 0.5 if order == 1 else torch.linalg.solve(R, b)
        corr_res = ZERO
        for k, D1 in enumerate(D1s):
            corr_res = corr_res + rhos_c[k] * D1
        D1_t = model_t - m0
        return x_t_ - scale * (corr_res + rhos_c[-1] * D1_t)

    def _predictor(self, i: int, order: int, m0, x, previous):
        """UniP-p: diffusers' multistep_uni_p_bh_update at step i (m0 = m_i, x = x_i^c)."""
        earlier = [(i - k, previous[k]) for k in range(1, order)]
        x_t_, scale, D1s, R, b = self._bh_update(i + 1, i, order, x, m0, earlier)
        if not D1s:
            return x_t_
        rhos_p = torch.ones(1, dtype=R.dtype) * 0.5 if order == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1])
        pred_res = ZERO
        for k, D1 in enumerate(D1s):
            pred_res = pred_res + rhos_p[k] * D1
        return x_t_ - scale * pred_res

    # ---- the step -----------------------------------------------------------------------------
    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True, *,
             generator=None, seed: Optional[int] = None, guidance_scale: Optional[float] = None,
             skip_layer_output: Optional[torch.Tensor] = None, skip_layer_guidance_scale: float = 0.0,
             sample_offset: int = 0, out: Optional[torch.Tensor] = None):
        """One UniPC step in one fused op: the corrector on the previous step's sample (UniC), the model
        output converted into the history, and the predictor (UniP) to the next sample (`out=`: see
        BaseSampler). `generator` / `seed` are accepted and unused (no noise)."""
        return self._step(model_output, timestep, sample, None, None, return_dict, None, guidance_scale,
                          skip_layer_output, skip_layer_guidance_scale, sample_offset, out)
