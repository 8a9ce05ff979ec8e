"""DPMSolverMultistepSampler vs diffusers' DPMSolverMultistepScheduler (and k-diffusion as a second oracle).

Parity: single steps (both fed diffusers' sample each step, so errors do not accumulate) and whole
loops (each on its own trajectory), fp32 within 1e-4, over a grid of every option, on the reference
and C++ backends (the Triton interpreter on a small subset). The test model is a small random
denoiser (`Denoiser`): the ideal x0 of unit-variance data plus a fixed random channel mix, given in
the sampler's prediction type, so samples stay O(1) as in real use.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import grid_params, use_backend
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

import fastdiff
from fastdiff import tables as T
from kdiffusion_oracle import GivenNoise, sampling as kdiffusion_sampling

SHAPE = (2, 3, 6, 5)
ATOL = 1e-4  # DESIGN: fp32 loops vs diffusers


# ---- helpers shared with test_unipc.py -----------------------------------------------------------------
class Denoiser:
    """A small random denoiser in a sampler's prediction type: x0 = the ideal prediction for unit-variance
    data (VP: alpha x; flow: (1 - s) x / ((1 - s)^2 + s^2)) + 0.1 tanh(W x), W a fixed random channel mix."""

    def __init__(self, sampler, prediction_type: str, seed: int = 0, variance: bool = False):
        self.seed, self.W = seed, None
        self.abar = sampler.alphas_cumprod.double()
        self.T = sampler.config.num_train_timesteps
        self.flow = bool(sampler.config.get("use_flow_sigmas", False))
        self.prediction_type, self.variance, self.calls = prediction_type, variance, 0

    def __call__(self, x: torch.Tensor, t) -> torch.Tensor:
        self.calls += 1
        t = float(t.reshape(-1)[0]) if isinstance(t, torch.Tensor) else float(t)  # fastdiff.sample passes [B]
        channels = x.shape[1]
        if self.W is None or self.W.shape[0] != channels:
            g = torch.Generator().manual_seed(self.seed)
            self.W = torch.randn(channels, channels, generator=g, dtype=torch.float64) / channels**0.5
        if self.flow:
            s = min(max(t / self.T, 1e-3), 1.0)
            a = 1.0 - s
            ideal = a / (a * a + s * s)
        else:
            abar = float(self.abar[min(max(int(round(t)), 0), self.T - 1)])
            a, s = abar**0.5, (1 - abar) ** 0.5
            ideal = a
        x64 = x.double()
        x0 = ideal * x64 + 0.1 * torch.tanh((x64.movedim(1, -1) @ self.W.T).movedim(-1, 1))
        if self.prediction_type == "sample":
            out = x0
        elif self.prediction_type == "flow_prediction":
            out = (x64 - x0) / s
        else:
            eps = (x64 - a * x0) / s
            out = eps if self.prediction_type == "epsilon" else a * eps - s * x0
        out = out.to(x.dtype)
        if self.variance:  # [prediction; variance] channels (a small positive variance half)
            out = torch.cat([out, 1e-3 * (1 + x.abs())], 1)
        return out


def run_pair(ours, theirs, steps, model, *, shared: bool, set_kwargs=None, noise_seed=None, start=None,
             begin=None, shape=SHAPE, dtype=torch.float32, step_kwargs=None):
    """Step both samplers through a loop; returns (worst abs difference of any step, diffusers' final
    sample, ours). shared=True feeds both diffusers' sample at every step (single-step parity)."""
    set_kwargs = set_kwargs or {}
    if steps is not None:
        ours.set_timesteps(steps, **set_kwargs)
        theirs.set_timesteps(steps, **set_kwargs)
    else:
        ours.set_timesteps(**set_kwargs)
        theirs.set_timesteps(**set_kwargs)
    assert torch.equal(ours.timesteps, theirs.timesteps), (ours.timesteps, theirs.timesteps)
    assert torch.equal(ours.sigmas, theirs.sigmas.to(torch.float32))
    if begin == "auto":  # repeated timesteps (e.g. unrounded Karras on the cosine schedule): start at 0 as
        # pipelines do, since diffusers' timestep lookup takes the second match (its img2img rule)
        begin = 0 if len(set(theirs.timesteps.tolist())) < len(theirs.timesteps) else None
    if begin is not None:
        ours.set_begin_index(begin)
        theirs.set_begin_index(begin)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
    x_theirs, x_ours = x.clone(), x.clone()
    gens = {}
    if noise_seed is not None:
        gens = {"theirs": torch.Generator().manual_seed(noise_seed), "ours": torch.Generator().manual_seed(noise_seed)}
    worst = 0.0
    for t in theirs.timesteps[start or 0:]:
        kw_t = {"generator": gens["theirs"]} if gens else {}
        kw_o = {"generator": gens["ours"]} if gens else {}
        a = theirs.step(model(x_theirs, t), t, x_theirs, **kw_t).prev_sample
        mine = x_theirs if shared else x_ours
        b = ours.step(model(mine, t), t, mine, **kw_o, **(step_kwargs or {})).prev_sample
        assert b.dtype == a.dtype and b.shape == a.shape
        worst = max(worst, float((a.double() - b.double()).abs().max()))
        x_theirs, x_ours = a, (a if shared else b)
    return worst, x_theirs, x_ours


def pair(config: dict, prediction_type=None, variance=False):
    """(ours, diffusers', the test denoiser) for a config; sde_third_order / table_dtype are ours only."""
    ours = fastdiff.DPMSolverMultistepSampler(**config)
    theirs = DPMSolverMultistepScheduler(**{k: v for k, v in config.items() if k not in ("sde_third_order", "table_dtype")})
    model = Denoiser(ours, prediction_type or config.get("prediction_type", "epsilon"), variance=variance)
    return ours, theirs, model


# ---- the parity grid ----------------------------------------------------------------------------------
SIGMA_MIN = {"final_sigmas_type": "sigma_min"}
GRID = {
    # algorithm x order x solver type
    **{f"{a}-o{o}-{st}": dict(algorithm_type=a, solver_order=o, solver_type=st, sde_third_order="diffusers")
       for a in ("dpmsolver++", "sde-dpmsolver++") for o in (1, 2, 3) for st in ("midpoint", "heun")},
    **{f"{a}-o{o}-{st}": dict(algorithm_type=a, solver_order=o, solver_type=st, **SIGMA_MIN)
       for a in ("dpmsolver", "sde-dpmsolver") for o in (1, 2, 3) for st in ("midpoint", "heun")
       if not (a == "sde-dpmsolver" and o == 3)},
    # prediction types, thresholding, learned variance
    "sample": dict(prediction_type="sample"),
    "v": dict(prediction_type="v_prediction"),
    "v-threshold": dict(prediction_type="v_prediction", thresholding=True, sample_max_value=1.2,
                        dynamic_thresholding_ratio=0.9),
    "eps-threshold-o3": dict(thresholding=True, sample_max_value=1.1, solver_order=3),
    "dpmsolver-threshold": dict(algorithm_type="dpmsolver", thresholding=True, sample_max_value=1.1, **SIGMA_MIN),
    "dpmsolver-sample": dict(algorithm_type="dpmsolver", prediction_type="sample", **SIGMA_MIN),
    "dpmsolver-v": dict(algorithm_type="dpmsolver", prediction_type="v_prediction", solver_order=3, **SIGMA_MIN),
    "learned": dict(variance_type="learned"),
    "learned_range-sde": dict(variance_type="learned_range", algorithm_type="sde-dpmsolver++"),
    # final steps
    "no-lower-order-final": dict(lower_order_final=False, solver_order=3),
    "euler-at-final": dict(euler_at_final=True, solver_order=3, **SIGMA_MIN),
    "sigma-min-o3": dict(solver_order=3, **SIGMA_MIN),
    "sigma-min-no-lof": dict(solver_order=3, lower_order_final=False, **SIGMA_MIN),
    # sigma schedules
    "karras": dict(use_karras_sigmas=True),
    "karras-sde": dict(use_karras_sigmas=True, algorithm_type="sde-dpmsolver++"),
    "karras-cosine": dict(use_karras_sigmas=True, beta_schedule="squaredcos_cap_v2"),
    "exponential": dict(use_exponential_sigmas=True, solver_order=3),
    "beta": dict(use_beta_sigmas=True),
    "lu": dict(use_lu_lambdas=True),
    "lu-cosine": dict(use_lu_lambdas=True, beta_schedule="squaredcos_cap_v2"),
    "flow": dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0),
    "flow-sde-o3": dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=6.0,
                        algorithm_type="sde-dpmsolver++", solver_order=3, sde_third_order="diffusers"),
    "flow-eps": dict(use_flow_sigmas=True, flow_shift=2.0),
    "flow-sigma-min": dict(use_flow_sigmas=True, prediction_type="flow_prediction", **SIGMA_MIN),
    # spacing, schedules
    "leading": dict(timestep_spacing="leading", steps_offset=1, beta_schedule="scaled_linear", beta_start=0.00085,
                    beta_end=0.012),
    "trailing-zsnr": dict(timestep_spacing="trailing", rescale_betas_zero_snr=True, prediction_type="v_prediction"),
    "lambda-clipped-cosine": dict(beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1),
    "trained-betas": dict(trained_betas=np.linspace(1e-4, 0.03, 1000).tolist()),
}
TRITON_SUBSET = ("dpmsolver++-o2-midpoint", "sde-dpmsolver++-o3-midpoint", "flow")


@pytest.mark.parametrize("backend,name", grid_params(GRID, TRITON_SUBSET))
def test_parity_grid(backend, name, monkeypatch):
    use_backend(backend, monkeypatch)
    config = GRID[name]
    noisy = "sde" in config.get("algorithm_type", "")
    # single steps on a >= 15-step schedule, a whole loop on a < 15-step one (lower_order_final applies)
    for steps, shared in ((20, True), (8, False)) if backend != "triton" else ((6, False),):
        ours, theirs, model = pair(config, variance=config.get("variance_type") is not None)
        worst, expected, got = run_pair(ours, theirs, steps, model, shared=shared,
                                        noise_seed=7 if noisy else None, begin="auto")
        assert worst <= ATOL, (name, steps, shared, worst)
        assert torch.isfinite(got).all()


@pytest.mark.parametrize("name,set_kwargs", [
    ("custom-timesteps", dict(timesteps=[999, 850, 700, 500, 300, 120, 40, 5])),
    ("dynamic-shifting", dict(num_inference_steps=10, mu=0.9)),
])
def test_parity_set_timesteps_options(name, set_kwargs):
    config = dict(algorithm_type="dpmsolver++", solver_order=3)
    if name == "dynamic-shifting":
        config = dict(use_flow_sigmas=True, prediction_type="flow_prediction", use_dynamic_shifting=True)
    ours, theirs, model = pair(config)
    worst, _, _ = run_pair(ours, theirs, None, model, shared=False, set_kwargs=set_kwargs)
    assert worst <= ATOL
    if name == "dynamic-shifting":  # diffusers writes e^mu into its config; ours replaces the config with it
        assert ours.config.flow_shift == pytest.approx(math.exp(0.9)) == theirs.config.flow_shift


def test_float64_tables_are_closer_to_exact_math():
    """table_dtype='float64' derives the coefficients in float64: still within 1e-4 of diffusers' float32 loop."""
    config = dict(solver_order=3, use_karras_sigmas=True, table_dtype="float64")
    ours, theirs, model = pair(config)
    worst, _, _ = run_pair(ours, theirs, 20, model, shared=False)
    assert worst <= ATOL


@pytest.mark.parametrize("config", [dict(), dict(algorithm_type="sde-dpmsolver++", use_karras_sigmas=True),
                                    dict(solver_order=3, prediction_type="v_prediction")],
                         ids=["2M", "2M-SDE-karras", "3M-v"])
def test_fifty_step_loop_matches_diffusers(config):
    """Done criterion of issue 12: a 50-step loop with a small random denoiser within 1e-4 of diffusers."""
    ours, theirs, model = pair(config)
    worst, expected, got = run_pair(ours, theirs, 50, model, shared=False, noise_seed=3, shape=(2, 4, 8, 8))
    assert worst <= ATOL, worst


@pytest.mark.parametrize("start_kind", ["set_begin_index", "timestep"])
def test_img2img_start_warms_up_from_the_first_step_taken(start_kind):
    """diffusers counts warm-up from the first step taken: starting at index 4 uses orders 1, 2, 3 there."""
    config = dict(solver_order=3)
    ours, theirs, model = pair(config)
    begin = 4 if start_kind == "set_begin_index" else None
    worst, _, _ = run_pair(ours, theirs, 12, model, shared=False, begin=begin, start=4)
    assert worst <= ATOL


def test_device_found_first_index_picks_the_same_rows():
    """The first index found on the device (a CUDA timestep) gathers the same warm-up rows as a host one."""
    ours = fastdiff.DPMSolverMultistepSampler(solver_order=3)
    ours.set_timesteps(12)
    device = torch.device("cpu")
    stages = ours._table(device)
    for b in (0, 3, 11):
        ours._active, ours._step_index = None, b
        host = ours._loop_table(device, torch.tensor([b]))
        ours._active, ours._step_index = None, None
        on_device = ours._loop_table(device, torch.tensor([b]))
        assert torch.equal(host.nan_to_num(), on_device.nan_to_num())
        for i in range(b, 12):  # row i comes from stage min(i - b, last)
            assert torch.equal(host[i], stages[min(i - b, stages.shape[0] - 1), i])
        assert torch.isnan(host[12]).all()  # the sentinel


# ---- warm-up rows, history ring -------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["dpmsolver++-o3-midpoint", "sde-dpmsolver++-o2-heun", "dpmsolver-o3-heun",
                                  "eps-threshold-o3", "no-lower-order-final"])
def test_rows_read_only_written_history(name):
    """Stage k (k steps taken) rows read at most the k previous entries: every other history coefficient is
    exactly 0, so the zero-initialised (or stale) ring never leaks in; no row writes a slot it reads."""
    ours = fastdiff.DPMSolverMultistepSampler(**GRID[name])
    ours.set_timesteps(9)
    stages = ours._table(torch.device("cpu"))
    K = ours.config.solver_order
    assert stages.shape == (K, 10, T.WIDTH)
    for k in range(K):
        for i in range(9):
            row = stages[k, i]
            for j in range(1, T.MAX_HISTORY_READS + 1):  # h_j = the entry of step i - j
                if j > min(k, i):
                    assert row[T.OUT_H[j - 1]] == 0 and row[T.OUT2_H[j - 1]] == 0, (k, i, j)
            if K > 1:
                assert int(row[T.HIST_SLOT]) == i % K
                assert [int(row[T.READ_SLOT[j]]) for j in range(K - 1)] == [(i - j - 1) % K for j in range(K - 1)]
        T.check_history_slots(stages[k, :9])
        assert torch.isnan(stages[k, 9]).all()  # the sentinel row


# ---- k-diffusion, the second oracle -----------------------------------------------------------------------
def _kdiffusion_run(sampler_fn, ours: fastdiff.DPMSolverMultistepSampler, steps, noises=None, **kwargs):
    """k-diffusion on the same schedule: EDM variables x_edm = x_vp / alpha, sigma = diffusers' sigmas."""
    model = Denoiser(ours, "sample")
    ts = ours.timesteps
    sigmas = ours.sigmas.double()
    t_of = {float(s): t for s, t in zip(sigmas[:-1].tolist(), ts.tolist())}

    def denoiser(x_edm, sigma):
        s = float(sigma.reshape(-1)[0])
        alpha = 1 / math.sqrt(s * s + 1)
        return model((x_edm * alpha).to(torch.float32), t_of[s]).double()

    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    extra = {"noise_sampler": GivenNoise([n.double() for n in noises])} if noises is not None else {}
    out = sampler_fn(denoiser, x.clone() / (1 / math.sqrt(float(sigmas[0]) ** 2 + 1)), sigmas, disable=True,
                     **extra, **kwargs)
    return x, out * (1 / math.sqrt(float(sigmas[-1]) ** 2 + 1)), model


@pytest.mark.parametrize("kind,config", [
    ("2m", dict()),
    ("2m", dict(use_karras_sigmas=True)),
    ("2m", dict(use_karras_sigmas=True, final_sigmas_type="sigma_min", lower_order_final=False)),
    ("2m_sde", dict(algorithm_type="sde-dpmsolver++", use_karras_sigmas=True)),
    ("2m_sde", dict(algorithm_type="sde-dpmsolver++", solver_type="heun")),
    ("3m_sde", dict(algorithm_type="sde-dpmsolver++", solver_order=3, solver_type="heun", lower_order_final=False)),
    ("3m_sde", dict(algorithm_type="sde-dpmsolver++", solver_order=3, solver_type="heun", use_karras_sigmas=True)),
], ids=["2m", "2m-karras", "2m-karras-sigma-min", "2m-sde-karras", "2m-sde-heun", "3m-sde", "3m-sde-karras"])
def test_kdiffusion_oracle(kind, config, monkeypatch):
    """DPM++ 2M, 2M SDE and (our default) 3M SDE equal k-diffusion's sample_dpmpp_* on the same sigmas with
    the same noise. Where the definitions agree: k-diffusion's 3M SDE warms up with a heun-type second
    order (so solver_type='heun') and never lowers the order before the final sigma-0 step (so
    lower_order_final=False, or >= 15 steps); its default noise is a Brownian tree keyed by sigma (here
    the given normals, `GivenNoise`); it runs in EDM variables x / alpha (converted here)."""
    kd = kdiffusion_sampling()
    monkeypatch.setenv("FASTDIFF_BACKEND", "reference")
    steps = 16 if config.get("lower_order_final", True) else 10
    ours = fastdiff.DPMSolverMultistepSampler(**config, prediction_type="sample")
    ours.set_timesteps(steps)
    noises = [torch.randn(SHAPE, generator=torch.Generator().manual_seed(100 + i)) for i in range(steps)]
    fn = {"2m": kd.sample_dpmpp_2m, "2m_sde": kd.sample_dpmpp_2m_sde, "3m_sde": kd.sample_dpmpp_3m_sde}[kind]
    kwargs = {"solver_type": config.get("solver_type", "midpoint")} if kind == "2m_sde" else {}
    x, expected, model = _kdiffusion_run(fn, ours, steps, noises if "sde" in kind else None, **kwargs)
    x = x.to(torch.float32)
    for i, t in enumerate(ours.timesteps):
        kw = {"variance_noise": noises[i]} if "sde" in kind else {}
        x = ours.step(model(x, t), t, x, **kw).prev_sample
    assert float((x.double() - expected).abs().max()) <= ATOL


def test_kdiffusion_3m_sde_differs_from_diffusers_third_order():
    """The default third-order SDE (k-diffusion's) differs from diffusers' only from the first third-order step."""
    config = dict(algorithm_type="sde-dpmsolver++", solver_order=3)
    a, b = (fastdiff.DPMSolverMultistepSampler(**config, sde_third_order=mode) for mode in ("k-diffusion", "diffusers"))
    for s in (a, b):
        s.set_timesteps(20)
    ta, tb = (s._table(torch.device("cpu")).nan_to_num() for s in (a, b))
    assert torch.equal(ta[:2], tb[:2])  # warm-up stages: orders 1 and 2
    differs = (ta[2] != tb[2]).any(1)
    assert differs[2:19].all() and not differs[19]  # the last step is first order (final sigma 0)


def _sde_mean_error(mode: str, steps: int) -> float:
    """|x_N - exact| for the SDE mean update (noise 0) when the data prediction x0(lambda) is a known smooth
    function and the history is exact: x(lambda_e) = sigma_e / sigma_0 e^-(lambda_e - lambda_0) x_0
    + alpha_e int 2 e^-2(lambda_e - lambda) x0(lambda) dlambda (the exact solution of the mean ODE)."""
    from scipy import integrate

    sampler = fastdiff.DPMSolverMultistepSampler(algorithm_type="sde-dpmsolver++", solver_order=3,
                                                 use_exponential_sigmas=True, final_sigmas_type="sigma_min",
                                                 euler_at_final=True, prediction_type="sample",
                                                 sde_third_order=mode, table_dtype="float64")
    sampler.set_timesteps(steps + 1)  # uniform in lambda; the last step (h = 0 to sigma_min, Euler) is not taken
    sig = sampler.sigmas.double()
    lam = -torch.log(sig)  # VP: lambda = log(alpha / sigma_vp) = -log(sigma)

    def f(lmb):
        return math.cos(0.5 * lmb) + 0.05 * lmb * lmb

    x = torch.zeros(1, 1, dtype=torch.float64)
    zero = torch.zeros_like(x)
    for i, t in enumerate(sampler.timesteps[:steps]):
        x0 = torch.full_like(x, f(float(lam[i])))
        x = sampler.step(x0, t, x, variance_noise=zero).prev_sample
    l0, le = float(lam[0]), float(lam[steps])
    alpha_e = 1 / math.sqrt(float(sig[steps]) ** 2 + 1)
    integral = integrate.quad(lambda lmb: 2 * math.exp(-2 * (le - lmb)) * f(lmb), l0, le, epsabs=1e-14, epsrel=1e-13)[0]
    return abs(float(x) - alpha_e * integral)


def test_sde_third_order_convergence(monkeypatch):
    """The 3rd-order SDE question of issue 12, numerically: halving h halves diffusers' global error (order 1:
    its D2 weight tends to -alpha_t, a sign error) and quarters k-diffusion's (order 2, as the ODE 3M)."""
    monkeypatch.setenv("FASTDIFF_BACKEND", "reference")
    orders = {}
    for mode in ("diffusers", "k-diffusion"):
        errors = [_sde_mean_error(mode, n) for n in (20, 40, 80)]
        orders[mode] = [math.log2(errors[i] / errors[i + 1]) for i in range(2)]
    assert all(0.8 < o < 1.3 for o in orders["diffusers"]), orders
    assert all(o > 1.7 for o in orders["k-diffusion"]), orders


# ---- guidance, noise options, the diffusers surface --------------------------------------------------------
def test_fused_cfg_and_skip_layer_guidance():
    """guidance_scale (CFG on [uncond; cond]) and skip_layer_output equal diffusers stepping the combined output."""
    ours, theirs, model = pair(dict(solver_order=2))
    for s in (ours, theirs):
        s.set_timesteps(8)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    xa, xb = x.clone(), x.clone()
    w, w2 = 4.5, 2.0
    for t in theirs.timesteps:
        c, u, e = model(xa, t), 0.7 * model(xa, t) + 0.1, 0.9 * model(xa, t)
        combined = u + w * (c - u) + w2 * (c - e)
        xa = theirs.step(combined, t, xa).prev_sample
        c, u, e = model(xb, t), 0.7 * model(xb, t) + 0.1, 0.9 * model(xb, t)
        xb = ours.step(torch.cat([u, c]), t, xb, guidance_scale=w, skip_layer_output=e,
                       skip_layer_guidance_scale=w2).prev_sample
    assert float((xa - xb).abs().max()) <= ATOL


def test_sde_noise_options():
    """variance_noise is used as given; seed= is deterministic and independent of the batch split."""
    config = dict(algorithm_type="sde-dpmsolver++")
    ours, theirs, model = pair(config)
    for s in (ours, theirs):
        s.set_timesteps(6)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    xa, xb = x.clone(), x.clone()
    for i, t in enumerate(theirs.timesteps):
        n = torch.randn(SHAPE, generator=torch.Generator().manual_seed(50 + i))
        xa = theirs.step(model(xa, t), t, xa, variance_noise=n).prev_sample
        xb = ours.step(model(xb, t), t, xb, variance_noise=n).prev_sample
    assert float((xa - xb).abs().max()) <= ATOL

    def seeded(batch_slices):
        parts = []
        for lo, hi in batch_slices:
            s = fastdiff.DPMSolverMultistepSampler(**config)
            s.set_timesteps(6)
            xs = x[lo:hi].clone()
            for t in s.timesteps:
                xs = s.step(model(xs, t), t, xs, seed=1234, sample_offset=lo).prev_sample
            parts.append(xs)
        return torch.cat(parts)

    whole = seeded([(0, 2)])
    assert torch.equal(whole, seeded([(0, 2)]))
    assert torch.allclose(whole, seeded([(0, 1), (1, 2)]), atol=1e-6)
    assert not torch.allclose(whole, xb, atol=1e-3)  # really noisy


def test_step_index_begin_index_and_add_noise():
    ours, theirs, model = pair(dict())
    for s in (ours, theirs):
        s.set_timesteps(10)
        assert s.step_index is None and s.begin_index is None
    x = torch.randn(SHAPE)
    t = theirs.timesteps[0]
    ours.step(model(x, t), t, x)
    theirs.step(model(x, t), t, x)
    assert ours.step_index == theirs.step_index == 1
    noise = torch.randn(SHAPE)
    timesteps = theirs.timesteps[[2, 5]]
    for s in (ours, theirs):
        s.set_timesteps(10)
    assert torch.allclose(ours.add_noise(x, noise, timesteps), theirs.add_noise(x, noise, timesteps), atol=1e-6)
    for s in (ours, theirs):
        s.set_begin_index(3)
    assert ours.begin_index == theirs.begin_index == 3
    assert torch.allclose(ours.add_noise(x, noise, timesteps), theirs.add_noise(x, noise, timesteps), atol=1e-6)
    assert ours.init_noise_sigma == theirs.init_noise_sigma == 1.0
    assert ours.scale_model_input(x, t) is x
    assert len(ours) == len(theirs) == 1000


def test_config_round_trip_and_switching(tmp_path):
    """save/load, diffusers' configs in, and switching between samplers with from_config (diffusers' renames)."""
    ours = fastdiff.DPMSolverMultistepSampler(solver_order=3, use_karras_sigmas=True, algorithm_type="sde-dpmsolver++")
    ours.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert saved["_class_name"] == "DPMSolverMultistepScheduler"
    again = fastdiff.DPMSolverMultistepSampler.from_pretrained(tmp_path)
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(again.config) == public(ours.config)
    theirs = DPMSolverMultistepScheduler.from_pretrained(tmp_path)  # diffusers reads our file
    assert theirs.config.solver_order == 3 and theirs.config.use_karras_sigmas
    # from UniPC's config: diffusers maps solver_type bh2 -> midpoint
    unipc = UniPCMultistepScheduler(solver_order=3, use_flow_sigmas=True, prediction_type="flow_prediction")
    switched = fastdiff.DPMSolverMultistepSampler.from_config(unipc.config)
    reference = DPMSolverMultistepScheduler.from_config(unipc.config)
    for key in ("solver_type", "solver_order", "use_flow_sigmas", "prediction_type", "algorithm_type"):
        assert switched.config[key] == reference.config[key], key
    ddim = fastdiff.DDIMSampler.from_config(ours.config)  # and on to another sampler
    assert ddim.config.num_train_timesteps == 1000
    back = fastdiff.UniPCMultistepSampler.from_config(ours.config)
    assert back.config.solver_type == "bh2" and back.config.solver_order == 3
    from_ddim = fastdiff.DPMSolverMultistepSampler.from_config(DDIMScheduler(timestep_spacing="trailing").config)
    assert from_ddim.config.timestep_spacing == "trailing"
    deis = fastdiff.DPMSolverMultistepSampler(algorithm_type="deis")
    assert deis.config.algorithm_type == "dpmsolver++"


def test_sample_loop_with_generator_matches_diffusers():
    """fastdiff.sample() with generator= draws x_T and the SDE noise as diffusers does: same samples."""
    config = dict(algorithm_type="sde-dpmsolver++", use_karras_sigmas=True)
    ours, theirs, model = pair(config)
    got = fastdiff.sample(model, ours, (2, 3, 6, 5), num_inference_steps=12, generator=torch.Generator().manual_seed(5),
                          progress=False)
    g = torch.Generator().manual_seed(5)
    x = torch.randn((2, 3, 6, 5), generator=g) * theirs.init_noise_sigma
    theirs.set_timesteps(12)
    theirs.set_begin_index(0)
    for t in theirs.timesteps:
        x = theirs.step(model(x, t), t, x, generator=g).prev_sample
    assert float((x - got).abs().max()) <= ATOL
    seeded = fastdiff.sample(model, fastdiff.DPMSolverMultistepSampler(**config), (2, 3, 6, 5), num_inference_steps=12,
                             seed=3, progress=False, guidance_scale=2.0, cond={}, uncond={})
    assert torch.isfinite(seeded).all()


@pytest.mark.parametrize("config", [dict(solver_order=3), dict(algorithm_type="sde-dpmsolver++", thresholding=False)])
def test_meta_device_loop(config, monkeypatch):
    """A whole loop on the meta device: no step reads a device value on the host."""
    monkeypatch.setenv("FASTDIFF_BACKEND", "reference")
    s = fastdiff.DPMSolverMultistepSampler(**config)
    s.set_timesteps(4, device="meta")  # (meta-device ops run slowly through Python reference kernels)
    x = torch.empty(SHAPE, device="meta")
    for t in s.timesteps:
        x = s.step(torch.empty((4, *SHAPE[1:]), device="meta"), t, x, guidance_scale=3.0, seed=1).prev_sample
    assert x.device.type == "meta" and x.shape == SHAPE
    x2 = fastdiff.sample(lambda x, t: x, s, SHAPE, num_inference_steps=4, device="meta", seed=0, progress=False)
    assert x2.device.type == "meta"


# ---- bad inputs ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    (dict(solver_order=4), "solver_order"),
    (dict(solver_order=0), "solver_order"),
    (dict(algorithm_type="dpmsolver"), "final_sigmas_type"),
    (dict(algorithm_type="sde-dpmsolver", solver_order=3, final_sigmas_type="sigma_min"), "third-order"),
    (dict(prediction_type="flow_prediction"), "use_flow_sigmas"),
    (dict(algorithm_type="foo"), "algorithm_type"),
    (dict(solver_type="foo"), "solver_type"),
    (dict(use_karras_sigmas=True, use_beta_sigmas=True), "only one of"),
    (dict(beta_schedule="sigmoid"), "beta_schedule"),
    (dict(variance_type="fixed_small"), "variance_type"),
    (dict(sde_third_order="exact"), "sde_third_order"),
])
def test_bad_configs_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fastdiff.DPMSolverMultistepSampler(**kwargs)


def test_bad_calls_raise():
    s = fastdiff.DPMSolverMultistepSampler(use_karras_sigmas=True)
    x = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="set_timesteps"):
        s.step(x, 999, x)
    with pytest.raises(ValueError, match="custom timesteps"):
        s.set_timesteps(timesteps=[900, 500, 100])
    with pytest.raises(ValueError, match="mu"):
        s.set_timesteps(10, mu=0.5)
    with pytest.raises(ValueError, match="num_inference_steps"):
        s.set_timesteps(0)
    s.set_timesteps(10)
    t0, t1 = s.timesteps[0], s.timesteps[1]
    s.step(x, t0, x)
    with pytest.raises(ValueError, match="history"):  # the sample's shape changed mid-loop
        s.step(torch.randn(1, 3, 6, 5), t1, torch.randn(1, 3, 6, 5))
    with pytest.raises(ValueError, match="model_output"):
        s.step(torch.randn(2, 6, 6, 5), t1, x)  # variance channels without variance_type
    sde = fastdiff.DPMSolverMultistepSampler(algorithm_type="sde-dpmsolver++")
    sde.set_timesteps(10)
    with pytest.raises(ValueError, match="at most one"):
        sde.step(x, sde.timesteps[0], x, seed=1, variance_noise=x)
