"""UniPCMultistepSampler vs diffusers' UniPCMultistepScheduler.

Parity: single steps (both fed diffusers' sample each step) and whole loops, fp32 within 1e-4, over a
grid of every option, on the reference and C++ backends (the Triton interpreter on a small subset),
with the small random denoiser of test_dpm_solver.py.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

import fastdiff
from fastdiff import tables as T
from conftest import grid_params, use_backend
from test_dpm_solver import ATOL, SHAPE, Denoiser, run_pair


def pair(config: dict):
    ours = fastdiff.UniPCMultistepSampler(**config)
    theirs = UniPCMultistepScheduler(**{k: v for k, v in config.items() if k != "table_dtype"})
    return ours, theirs, Denoiser(ours, config.get("prediction_type", "epsilon"))


SIGMA_MIN = {"final_sigmas_type": "sigma_min"}
FLOW = dict(use_flow_sigmas=True, prediction_type="flow_prediction")
GRID = {
    # order x solver type x predict_x0 (bh1 and predict_x0=False need a final sigma > 0: diffusers' last step is
    # NaN for them with final sigma 0, see test_final_sigma_zero_cases)
    **{f"o{o}-bh2": dict(solver_order=o) for o in (1, 2, 3)},
    **{f"o{o}-bh1": dict(solver_order=o, solver_type="bh1", **SIGMA_MIN) for o in (1, 2, 3)},
    **{f"o{o}-{st}-eps": dict(solver_order=o, solver_type=st, predict_x0=False, **SIGMA_MIN)
       for o in (1, 2, 3) for st in ("bh1", "bh2")},
    "sample": dict(prediction_type="sample"),
    "v": dict(prediction_type="v_prediction", solver_order=3),
    "v-eps": dict(prediction_type="v_prediction", predict_x0=False, **SIGMA_MIN),
    "sample-eps": dict(prediction_type="sample", predict_x0=False, **SIGMA_MIN),
    "threshold": dict(thresholding=True, sample_max_value=1.1, dynamic_thresholding_ratio=0.9),
    "disable-corrector": dict(disable_corrector=[0, 1, 5], solver_order=3),
    "no-lower-order-final": dict(lower_order_final=False, solver_order=3, **SIGMA_MIN),
    "sigma-min": dict(solver_order=3, **SIGMA_MIN),
    "karras": dict(use_karras_sigmas=True, solver_order=3),
    "karras-sigma-range": dict(use_karras_sigmas=True, sigma_min=0.05, sigma_max=60.0),
    "karras-flow": dict(use_karras_sigmas=True, **FLOW),
    "exponential": dict(use_exponential_sigmas=True),
    "beta": dict(use_beta_sigmas=True, **SIGMA_MIN),
    "flow": dict(**FLOW, flow_shift=3.0),
    "wan": dict(**FLOW, flow_shift=5.0, solver_order=2),
    "flow-o3-bh1": dict(**FLOW, flow_shift=3.0, solver_order=3, solver_type="bh1", **SIGMA_MIN),
    "flow-terminal": dict(**FLOW, flow_shift=2.0, shift_terminal=0.1),
    "flow-eps": dict(use_flow_sigmas=True, flow_shift=2.0),
    "leading": dict(timestep_spacing="leading", steps_offset=1, beta_schedule="scaled_linear", beta_start=0.00085,
                    beta_end=0.012),
    "trailing-zsnr": dict(timestep_spacing="trailing", rescale_betas_zero_snr=True, prediction_type="v_prediction"),
    "cosine": dict(beta_schedule="squaredcos_cap_v2", solver_order=3),
}
TRITON_SUBSET = ("o2-bh2", "o3-bh1-eps", "wan")


@pytest.mark.parametrize("backend,name", grid_params(GRID, TRITON_SUBSET))
def test_parity_grid(backend, name, monkeypatch):
    use_backend(backend, monkeypatch)
    # single steps on a >= 15-step schedule, a whole loop on a < 15-step one
    for steps, shared in ((20, True), (8, False)) if backend != "triton" else ((6, False),):
        ours, theirs, model = pair(GRID[name])
        worst, _, got = run_pair(ours, theirs, steps, model, shared=shared, begin="auto")
        assert worst <= ATOL, (name, steps, shared, worst)
        assert torch.isfinite(got).all()


@pytest.mark.parametrize("name,config,set_kwargs", [
    ("dynamic-shifting", dict(**FLOW, use_dynamic_shifting=True), dict(num_inference_steps=10, mu=1.1)),
    ("dynamic-linear", dict(**FLOW, use_dynamic_shifting=True, time_shift_type="linear"),
     dict(num_inference_steps=10, mu=2.0)),
    ("custom-sigmas", dict(**FLOW, solver_order=3), dict(sigmas=np.linspace(1.0, 0.05, 9).tolist())),
])
def test_parity_set_timesteps_options(name, config, set_kwargs):
    ours, theirs, model = pair(config)
    if "sigmas" in set_kwargs:  # diffusers multiplies the list: it needs an array
        ours.set_timesteps(**set_kwargs)
        theirs.set_timesteps(sigmas=np.array(set_kwargs["sigmas"]))
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
        xa, xb = x.clone(), x.clone()
        assert torch.equal(ours.timesteps, theirs.timesteps)
        for t in theirs.timesteps:
            xa = theirs.step(model(xa, t), t, xa).prev_sample
            xb = ours.step(model(xb, t), t, xb).prev_sample
        worst = float((xa - xb).abs().max())
    else:
        worst, _, _ = run_pair(ours, theirs, None, model, shared=False, set_kwargs=set_kwargs)
    assert worst <= ATOL


@pytest.mark.parametrize("config,shape", [(dict(), (2, 4, 8, 8)),
                                          (dict(**FLOW, flow_shift=5.0), (1, 4, 3, 6, 5))],  # Wan: a video latent
                         ids=["default", "wan-video"])
def test_fifty_step_loop_matches_diffusers(config, shape):
    """Done criterion of issue 12: a 50-step loop with a small random denoiser within 1e-4 of diffusers."""
    ours, theirs, model = pair(config)
    worst, _, _ = run_pair(ours, theirs, 50, model, shared=False, shape=shape)
    assert worst <= ATOL, worst


def test_float64_tables():
    ours, theirs, model = pair(dict(solver_order=3, table_dtype="float64"))
    worst, _, _ = run_pair(ours, theirs, 20, model, shared=False)
    assert worst <= ATOL


@pytest.mark.parametrize("start_kind", ["set_begin_index", "timestep"])
def test_img2img_start_warms_up_from_the_first_step_taken(start_kind):
    ours, theirs, model = pair(dict(solver_order=3, disable_corrector=[6]))
    begin = 5 if start_kind == "set_begin_index" else None
    worst, _, _ = run_pair(ours, theirs, 12, model, shared=False, begin=begin, start=5)
    assert worst <= ATOL


def test_final_sigma_zero_cases():
    """bh1 with a final sigma of 0: diffusers' last step is NaN (B(h) = -inf times a zero residual); ours drops
    the zero term and is finite. predict_x0=False with a final sigma of 0 (0 * inf coefficients; diffusers
    NaN) and lower_order_final=False with it (inf coefficients; diffusers inf) are named errors."""
    ours, theirs, model = pair(dict(solver_type="bh1"))
    _, expected, got = run_pair(ours, theirs, 8, model, shared=False)
    assert not torch.isfinite(expected).all() and torch.isfinite(got).all()
    for config in (dict(predict_x0=False), dict(lower_order_final=False)):
        with pytest.raises(ValueError, match="non-finite coefficients"):
            fastdiff.UniPCMultistepSampler(**config).set_timesteps(8)


@pytest.mark.parametrize("name", ["o3-bh2", "o2-bh1-eps", "disable-corrector", "no-lower-order-final"])
def test_rows_read_only_written_history(name):
    """Stage k (k steps taken) rows read the corrected sample only with a corrector (k >= 1) and at most the
    k previous model outputs; every other history coefficient is exactly 0; no row writes a slot it reads."""
    ours = fastdiff.UniPCMultistepSampler(**GRID[name])
    ours.set_timesteps(9)
    stages = ours._table(torch.device("cpu"))
    K = ours.config.solver_order
    assert stages.shape == (K + 1, 10, T.WIDTH)
    for k in range(K + 1):
        for i in range(9):
            row = stages[k, i]
            if k == 0 or i == 0:  # no corrector: out2 is the sample itself, no history read at all
                assert row[T.OUT2_X] == 1 and all(row[c] == 0 for c in (*T.OUT_H, *T.OUT2_H))
            for j in range(1, K + 1):  # h_{j+1} = m_{i-j}
                if j > min(k, i):
                    assert row[T.OUT_H[j]] == 0 and row[T.OUT2_H[j]] == 0, (k, i, j)
            assert int(row[T.HIST_SLOT]) == i % (K + 1) and int(row[T.OUT2_SLOT]) == K + 1 + i % 2
            assert int(row[T.READ_SLOT[0]]) == K + 1 + (i - 1) % 2
        T.check_history_slots(stages[k, :9])


def test_fused_guidance():
    ours, theirs, model = pair(dict(**FLOW, flow_shift=3.0))
    for s in (ours, theirs):
        s.set_timesteps(8)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    xa, xb = x.clone(), x.clone()
    w, w2 = 5.0, 1.5
    for t in theirs.timesteps:
        c, u, e = model(xa, t), 0.8 * model(xa, t), 0.9 * model(xa, t) + 0.05
        xa = theirs.step(u + w * (c - u) + w2 * (c - e), t, xa).prev_sample
        c, u, e = model(xb, t), 0.8 * model(xb, t), 0.9 * model(xb, t) + 0.05
        xb = ours.step(torch.cat([u, c]), t, xb, guidance_scale=w, skip_layer_output=e,
                       skip_layer_guidance_scale=w2).prev_sample
    assert float((xa - xb).abs().max()) <= ATOL


def test_sample_loop_matches_diffusers():
    """fastdiff.sample() (generator= for x_T; UniPC draws no step noise) equals a diffusers pipeline-style loop."""
    config = dict(**FLOW, flow_shift=3.0)
    ours, theirs, model = pair(config)
    got = fastdiff.sample(model, ours, SHAPE, num_inference_steps=10, generator=torch.Generator().manual_seed(4),
                          progress=False)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    theirs.set_timesteps(10)
    theirs.set_begin_index(0)
    for t in theirs.timesteps:
        x = theirs.step(model(x, t), t, x).prev_sample
    assert float((x - got).abs().max()) <= ATOL


def test_meta_device_loop(monkeypatch):
    monkeypatch.setenv("FASTDIFF_BACKEND", "reference")
    s = fastdiff.UniPCMultistepSampler(solver_order=3, disable_corrector=[1])
    s.set_timesteps(5, device="meta")
    x = torch.empty(SHAPE, device="meta")
    for t in s.timesteps:
        x = s.step(torch.empty((4, *SHAPE[1:]), device="meta"), t, x, guidance_scale=3.0).prev_sample
    assert x.device.type == "meta" and x.shape == SHAPE
    x2 = fastdiff.sample(lambda x, t: x, s, SHAPE, num_inference_steps=5, device="meta", seed=0, progress=False)
    assert x2.device.type == "meta"


def test_diffusers_surface(tmp_path):
    ours, theirs, model = pair(dict(solver_order=3))
    for s in (ours, theirs):
        s.set_timesteps(10)
    x = torch.randn(SHAPE)
    t = theirs.timesteps[0]
    for s in (ours, theirs):
        s.step(model(x, t), t, x)
    assert ours.step_index == theirs.step_index == 1
    noise = torch.randn(SHAPE)
    timesteps = theirs.timesteps[[1, 4]]
    for s in (ours, theirs):
        s.set_timesteps(10)
    assert torch.allclose(ours.add_noise(x, noise, timesteps), theirs.add_noise(x, noise, timesteps), atol=1e-6)
    assert ours.scale_model_input(x, t) is x and ours.init_noise_sigma == 1.0
    ours.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "scheduler_config.json").read_text())["_class_name"] == "UniPCMultistepScheduler"
    again = fastdiff.UniPCMultistepSampler.from_pretrained(tmp_path)
    assert again.config.solver_order == 3
    assert UniPCMultistepScheduler.from_pretrained(tmp_path).config.solver_order == 3
    # switching: DPM-Solver's config (solver_type midpoint -> bh2, as diffusers), and back
    dpm = DPMSolverMultistepScheduler(solver_order=3, use_karras_sigmas=True)
    switched, reference = (cls.from_config(dpm.config) for cls in (fastdiff.UniPCMultistepSampler,
                                                                    UniPCMultistepScheduler))
    for key in ("solver_type", "solver_order", "use_karras_sigmas", "predict_x0"):
        assert switched.config[key] == reference.config[key], key
    assert fastdiff.DPMSolverMultistepSampler.from_config(switched.config).config.solver_type == "midpoint"
    assert fastdiff.DDIMSampler.from_config(switched.config).config.num_train_timesteps == 1000


@pytest.mark.parametrize("kwargs,match", [
    (dict(solver_order=4), "solver_order"),
    (dict(solver_type="foo"), "solver_type"),
    (dict(prediction_type="flow_prediction"), "use_flow_sigmas"),
    (dict(use_flow_sigmas=True, prediction_type="flow_prediction", predict_x0=False), "predict_x0"),
    (dict(solver_p=object()), "solver_p"),
    (dict(shift_terminal=0.1), "shift_terminal"),
    (dict(disable_corrector=["a"]), "disable_corrector"),
    (dict(use_exponential_sigmas=True, use_karras_sigmas=True), "only one of"),
])
def test_bad_configs_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fastdiff.UniPCMultistepSampler(**kwargs)


def test_bad_calls_raise():
    with pytest.raises(ValueError, match="mu"):
        fastdiff.UniPCMultistepSampler(**FLOW, use_dynamic_shifting=True).set_timesteps(10)
    with pytest.raises(ValueError, match="use_flow_sigmas"):
        fastdiff.UniPCMultistepSampler().set_timesteps(sigmas=[0.9, 0.5])
    s = fastdiff.UniPCMultistepSampler()
    x = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="set_timesteps"):
        s.step(x, 999, x)
    s.set_timesteps(10)
    s.step(x, s.timesteps[0], x)
    with pytest.raises(ValueError, match="history"):
        s.step(torch.randn(1, 3, 6, 5), s.timesteps[1], torch.randn(1, 3, 6, 5))
    assert math.isfinite(float(s.sigmas[0]))
