"""Mean-predicting models (prediction_type="mean"), learned log-variance, the posterior-mean training
target and the 2015 KL loss, each against a hand-written eager reference (no fused code in it).

The fused step runs on every backend through FASTDIFF_BACKEND; a backend that cannot run here (no
extension, no triton) or does not expose the generic `step` yet is skipped with its reason. The
Triton interpreter is slow: it gets a small subset.
"""
import math

import pytest
from conftest import use_backend
import torch

import fastdiff
from fastdiff import noise as N
from fastdiff.training import diffusion_loss

# DESIGN "oracle chain": fp32 step vs reference. Step tables are float32 (derived in float64 here,
# rounded once), so float64 samples also agree to float32 coefficient rounding, not to 1e-15.
FP32 = dict(atol=1e-6, rtol=1e-5)
SHAPE = (3, 2, 4, 5)


# ---- the hand-written reference -------------------------------------------------------------------
def posterior(abar: torch.Tensor, t: int, prev: int):
    """(c_x0, c_xt, beta~, beta) of q(x_prev | x_t, x0), DDPM eq. 6-7, float64, written from the paper."""
    abar = abar.double()
    a_t = abar[t]
    a_p = abar[prev] if prev >= 0 else torch.tensor(1.0, dtype=torch.float64)
    beta = 1 - a_t / a_p
    c_x0 = a_p.sqrt() * beta / (1 - a_t)
    c_xt = (1 - beta).sqrt() * (1 - a_p) / (1 - a_t)
    return c_x0, c_xt, (1 - a_p) / (1 - a_t) * beta, beta


def hand_written_mean_step(model_output, x, t, abar, variance_type, noise):
    """x_{t-1} = mu + sigma_t n (no noise at t = 0); x0 = (mu - c_xt x) / c_x0 (what eq. 7 maps to mu)."""
    c = x.shape[1]
    mu = model_output[:, :c].double()
    c_x0, c_xt, beta_tilde, beta = posterior(abar, t, t - 1)
    if variance_type == "learned_log_variance":
        sigma = torch.exp(0.5 * model_output[:, c:].double())
    elif variance_type == "fixed_small":
        sigma = beta_tilde.sqrt()
    else:  # fixed_large
        sigma = beta.sqrt()
    prev = mu + (sigma * noise.double() if t > 0 else 0)
    return prev, (mu - c_xt * x.double()) / c_x0


def model_output_for(variance_type, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    channels = SHAPE[1] * (2 if variance_type.startswith("learned") else 1)
    out = torch.randn((SHAPE[0], channels, *SHAPE[2:]), generator=g, dtype=dtype)
    if channels > SHAPE[1]:
        out[:, SHAPE[1]:] = out[:, SHAPE[1]:] - 6.0  # log-variances around log(2.5e-3)
    return out, torch.randn(SHAPE, generator=g, dtype=dtype), torch.randn(SHAPE, generator=g, dtype=dtype)


def mean_sampler(variance_type="learned_log_variance", **kwargs):
    options = dict(prediction_type="mean", variance_type=variance_type, clip_sample=False, table_dtype="float64")
    return fastdiff.DDPMSampler(**{**options, **kwargs})


# ---- the fused mean step --------------------------------------------------------------------------
@pytest.mark.parametrize("variance_type", ["learned_log_variance", "fixed_small", "fixed_large"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("schedule", [dict(), dict(beta_schedule="sigmoid_2015", num_train_timesteps=40)])
def test_mean_step_equals_hand_written(backend, monkeypatch, variance_type, dtype, schedule):
    use_backend(backend, monkeypatch, dtype)
    sampler = mean_sampler(variance_type, **schedule)
    T_ = sampler.config.num_train_timesteps
    for i, t in enumerate([T_ - 1, T_ // 2, 7, 1, 0]):
        model_output, x, noise = model_output_for(variance_type, dtype, seed=i)
        out = sampler.step(model_output, t, x, variance_noise=noise)
        prev, x0 = hand_written_mean_step(model_output, x, t, sampler.alphas_cumprod, variance_type, noise)
        assert out.prev_sample.dtype == dtype and out.pred_original_sample.dtype == dtype
        torch.testing.assert_close(out.prev_sample, prev.to(dtype), **FP32)
        # x0 = (mu - c_xt x) / c_x0 amplifies the rounding of mu - c_xt x by 1 / c_x0 (up to ~8e3 here).
        scale = 1.0 / float(posterior(sampler.alphas_cumprod, t, t - 1)[0])
        torch.testing.assert_close(out.pred_original_sample, x0.to(dtype), atol=FP32["atol"] * scale,
                                   rtol=FP32["rtol"])


def test_mean_step_on_triton_interpreter(monkeypatch):
    use_backend("triton", monkeypatch)
    sampler = mean_sampler(beta_schedule="sigmoid_2015", num_train_timesteps=40)
    for i, t in enumerate([39, 0]):
        model_output, x, noise = model_output_for("learned_log_variance", torch.float32, seed=i)
        out = sampler.step(model_output, t, x, variance_noise=noise)
        prev, _ = hand_written_mean_step(model_output, x, t, sampler.alphas_cumprod, "learned_log_variance", noise)
        torch.testing.assert_close(out.prev_sample, prev.float(), **FP32)


def test_default_float32_tables_give_the_mean_exactly(backend, monkeypatch):
    """A one-step mean step without clipping is OUT_M = 1: prev is mu + sigma n whatever the table dtype."""
    use_backend(backend, monkeypatch)
    sampler = mean_sampler(table_dtype="float32", beta_schedule="sigmoid_2015", num_train_timesteps=40)
    model_output, x, noise = model_output_for("learned_log_variance", torch.float32, seed=3)
    out = sampler.step(model_output, 0, x, variance_noise=noise)
    assert torch.equal(out.prev_sample, model_output[:, :2])  # t = 0: the mean, no noise
    assert torch.equal(out.pred_original_sample, model_output[:, :2])  # c_x0 = 1, c_xt = 0 at t = 0
    out = sampler.step(model_output, 20, x, variance_noise=noise)
    torch.testing.assert_close(out.prev_sample, model_output[:, :2] + torch.exp(0.5 * model_output[:, 2:]) * noise,
                               **FP32)


def test_seeded_noise_is_the_philox_step_stream(backend, monkeypatch):
    use_backend(backend, monkeypatch)
    sampler = mean_sampler(beta_schedule="sigmoid_2015", num_train_timesteps=40)
    model_output, x, _ = model_output_for("learned_log_variance", torch.float32, seed=4)
    prev = sampler.step(model_output, 17, x, seed=123, sample_offset=5).prev_sample
    noise = N.randn(SHAPE, 123, counter=17, stream=N.STREAM_STEP, sample_offset=5)
    torch.testing.assert_close(prev, model_output[:, :2] + torch.exp(0.5 * model_output[:, 2:]) * noise, **FP32)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_learned_log_variance_with_other_prediction_types(backend, monkeypatch, prediction_type):
    """std = exp(v / 2) around the usual eq. 7 mean of the x0 the prediction implies."""
    use_backend(backend, monkeypatch)
    sampler = fastdiff.DDPMSampler(prediction_type=prediction_type, variance_type="learned_log_variance",
                                   clip_sample=False, table_dtype="float64")
    model_output, x, noise = model_output_for("learned_log_variance", torch.float64, seed=5)
    t = 600
    abar = sampler.alphas_cumprod.double()[t]
    m = model_output[:, :2]
    x0 = {"epsilon": (x - (1 - abar).sqrt() * m) / abar.sqrt(), "sample": m,
          "v_prediction": abar.sqrt() * x - (1 - abar).sqrt() * m}[prediction_type]
    c_x0, c_xt, _, _ = posterior(sampler.alphas_cumprod, t, t - 1)
    want = c_x0 * x0 + c_xt * x + torch.exp(0.5 * model_output[:, 2:]) * noise
    torch.testing.assert_close(sampler.step(model_output, t, x, variance_noise=noise).prev_sample, want, **FP32)


def test_clipping_and_spaced_schedules_go_through_x0(monkeypatch):
    """clip_sample: out is eq. 7's posterior mean of the clipped x0; a spaced schedule: eq. 7 from t to
    prev of the x0 that the one-step posterior maps to mu."""
    monkeypatch.setenv("FASTDIFF_BACKEND", "reference")
    sampler = mean_sampler("fixed_small", clip_sample=True, clip_sample_range=0.5)
    sampler.set_timesteps(10)  # leading: 900, 800, ..., 0
    t, prev_t = 500, 400
    model_output, x, noise = model_output_for("fixed_small", torch.float64, seed=6)
    out = sampler.step(model_output, t, x, variance_noise=noise)
    c1_x0, c1_xt, _, _ = posterior(sampler.alphas_cumprod, t, t - 1)
    x0 = ((model_output - c1_xt * x) / c1_x0).clamp(-0.5, 0.5)
    c_x0, c_xt, beta_tilde, _ = posterior(sampler.alphas_cumprod, t, prev_t)
    torch.testing.assert_close(out.pred_original_sample, x0, **FP32)
    torch.testing.assert_close(out.prev_sample, c_x0 * x0 + c_xt * x + beta_tilde.sqrt() * noise, **FP32)
    # Unclipped, one step: the same route gives mu back (up to rounding).
    loose = mean_sampler("fixed_small", clip_sample=True, clip_sample_range=1e6)
    out = loose.step(model_output, t, x, variance_noise=noise)
    c_x0, c_xt, beta_tilde, _ = posterior(loose.alphas_cumprod, t, t - 1)
    torch.testing.assert_close(out.prev_sample, model_output + beta_tilde.sqrt() * noise, **FP32)


def test_sample_loop_equals_a_hand_written_loop(backend, monkeypatch):
    """fastdiff.sample with a mean / log-variance model vs the 2015 sampling loop written out in eager torch."""
    use_backend(backend, monkeypatch)
    torch.manual_seed(0)
    net = torch.nn.Linear(2, 4)

    def model(x, t):
        out = net(x)
        return torch.cat([0.9 * x + 0.1 * out[:, :2], -4.0 + 0.1 * out[:, 2:] + t[:, None] / 40], dim=1)

    sampler = mean_sampler(beta_schedule="sigmoid_2015", num_train_timesteps=40)
    with torch.no_grad():
        got = fastdiff.sample(model, sampler, (6, 2), num_inference_steps=40, seed=9, progress=False)
        x = N.randn((6, 2), 9, counter=0, stream=N.STREAM_INITIAL_NOISE)
        for t in range(39, -1, -1):
            out = model(x, torch.full((6,), t))
            noise = N.randn((6, 2), 9, counter=t, stream=N.STREAM_STEP)
            x = out[:, :2] + (torch.exp(0.5 * out[:, 2:]) * noise if t > 0 else 0)
    torch.testing.assert_close(got, x, atol=1e-5, rtol=1e-5)  # 40 fp32 steps of rounding


def test_inputs_are_checked():
    sampler = mean_sampler()
    with pytest.raises(ValueError, match="'learned_log_variance'.*needs model_output with 2 x 2"):
        sampler.step(torch.randn(SHAPE), 5, torch.randn(SHAPE))
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        fastdiff.DDIMSampler(prediction_type="mean")  # DDIM has no mean model (not asked for)
    with pytest.warns(UserWarning, match="variance_type='learned_log_var' is not one of"):
        fastdiff.DDPMSampler(variance_type="learned_log_var")  # as diffusers: sampled as fixed_small


# ---- training: the posterior-mean target ------------------------------------------------------------
def test_mse_target_of_a_mean_model_is_the_posterior_mean():
    sampler = fastdiff.DDPMSampler(prediction_type="mean", beta_schedule="sigmoid_2015", num_train_timesteps=40)
    x0, t = torch.randn(5, 2, 3), torch.tensor([0, 1, 12, 25, 39])
    seen = {}

    def model(x_t, timesteps):
        seen["x_t"] = x_t
        return torch.zeros_like(x_t)

    got = diffusion_loss(model, x0, sampler, timesteps=t, generator=torch.Generator().manual_seed(2),
                         reduction="none")
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
    abar = sampler.alphas_cumprod.double()[t][:, None, None]
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    coefficients = [posterior(sampler.alphas_cumprod, int(s), int(s) - 1) for s in t]
    c_x0 = torch.stack([c[0] for c in coefficients])[:, None, None]
    c_xt = torch.stack([c[1] for c in coefficients])[:, None, None]
    target = c_x0 * x0 + c_xt * x_t
    torch.testing.assert_close(seen["x_t"], x_t.float(), **FP32)
    torch.testing.assert_close(got, target.float() ** 2, **FP32)  # (0 - target)^2
    torch.testing.assert_close(target[0].float(), x0[0])  # t = 0: the mean of x_{-1} is x0 itself


# ---- training: the 2015 KL ----------------------------------------------------------------------------
def hand_written_kl(model_output, x0, x_t, t, abar, prediction_type="mean"):
    """Sohl-Dickstein et al. 2015 (their model.py get_negL_bound) per element for t > 0:
    log s_p - log s_q + (s_q^2 + (mu_q - mu_p)^2) / (2 s_p^2) - 1/2; at t = 0 -log N(x0; mu_p, s_p^2)."""
    c = x0.shape[1]
    rows = []
    for b in range(x0.shape[0]):
        s = int(t[b])
        c_x0, c_xt, beta_tilde, _ = posterior(abar, s, s - 1)
        m, lv = model_output[b, :c].double(), model_output[b, c:].double()
        xb, xtb = x0[b].double(), x_t[b].double()
        if prediction_type == "epsilon":
            a = abar.double()[s]
            m = c_x0 * (xtb - (1 - a).sqrt() * m) / a.sqrt() + c_xt * xtb
        sigma_p = torch.exp(0.5 * lv)
        if s == 0:
            rows.append(torch.log(sigma_p) + 0.5 * math.log(2 * math.pi) + (xb - m) ** 2 / (2 * sigma_p ** 2))
            continue
        mu_q, sigma_q = c_x0 * xb + c_xt * xtb, beta_tilde.sqrt()
        rows.append(torch.log(sigma_p) - torch.log(sigma_q) + (sigma_q ** 2 + (mu_q - m) ** 2) / (2 * sigma_p ** 2)
                    - 0.5)
    return torch.stack(rows)


class RecordingMeanModel(torch.nn.Module):
    """x_t -> [mean; log-variance] with a 1x1 conv; remembers x_t."""

    def __init__(self, channels=2):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(channels, 2 * channels, 1)
        self.seen = []

    def forward(self, x_t, t):
        self.seen.append(x_t)
        out = self.conv(x_t)
        return torch.cat([x_t + 0.1 * out[:, :2], -5.0 + out[:, 2:] + t.float()[:, None, None, None] / 10], dim=1)


@pytest.mark.parametrize("prediction_type", ["mean", "epsilon"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_kl_loss_equals_the_closed_form(prediction_type, reduction):
    sampler = fastdiff.DDPMSampler(prediction_type=prediction_type, variance_type="learned_log_variance",
                                   beta_schedule="sigmoid_2015", num_train_timesteps=40)
    model, x0 = RecordingMeanModel(), torch.randn(SHAPE)
    t = torch.tensor([0, 13, 39])
    got = diffusion_loss(model, x0, sampler, loss="kl", timesteps=t, seed=5, reduction=reduction)
    x_t = model.seen[0]
    with torch.no_grad():
        want = hand_written_kl(model(x_t, t), x0, x_t, t, sampler.alphas_cumprod, prediction_type)
    want = {"none": want, "mean": want.mean(), "sum": want.sum()}[reduction]
    torch.testing.assert_close(got, want.float(), atol=2e-5, rtol=2e-5)


def test_kl_with_learned_range_uses_iddpm_log_variance():
    sampler = fastdiff.DDPMSampler(prediction_type="mean", variance_type="learned_range", num_train_timesteps=100)
    x0, t = torch.randn(SHAPE), torch.tensor([3, 50, 99])
    v = torch.rand(SHAPE) * 2 - 1
    mu = torch.randn(SHAPE)
    got = diffusion_loss(lambda x, s: torch.cat([mu, v], 1), x0, sampler, loss="kl", timesteps=t, seed=1,
                         reduction="none")
    log_var = torch.stack([
        (v[b].double() + 1) / 2 * torch.log(posterior(sampler.alphas_cumprod, int(s), int(s) - 1)[3])
        + (1 - v[b].double()) / 2 * torch.log(posterior(sampler.alphas_cumprod, int(s), int(s) - 1)[2])
        for b, s in enumerate(t)])  # IDDPM eq. 15
    x_t = fastdiff.DDPMSampler(num_train_timesteps=100).add_noise(
        x0, N.randn(SHAPE, 1, counter=0, stream=N.STREAM_Q_SAMPLE), t)
    want = hand_written_kl(torch.cat([mu.double(), log_var], 1), x0, x_t, t, sampler.alphas_cumprod)
    torch.testing.assert_close(got, want.float(), atol=2e-5, rtol=2e-5)


def test_kl_vanishes_for_the_true_posterior():
    """A model that returns q(x_{t-1} | x_t, x0) itself (it peeks at x0) has KL 0 for every t > 0."""
    sampler = fastdiff.DDPMSampler(prediction_type="mean", variance_type="learned_log_variance",
                                   beta_schedule="sigmoid_2015", num_train_timesteps=40, table_dtype="float64")
    x0, t = torch.randn(40, 2, dtype=torch.float64), torch.arange(40)

    def oracle(x_t, s):
        mean, log_var = sampler.posterior_mean_log_variance(x0, x_t, s)
        return torch.cat([mean, torch.where(s[:, None] > 0, log_var, torch.zeros_like(log_var))], 1)

    terms = diffusion_loss(oracle, x0, sampler, loss="kl", timesteps=t, seed=0, reduction="none")
    assert terms[1:].abs().max() < 1e-4
    torch.testing.assert_close(terms[0], torch.full((2,), 0.5 * math.log(2 * math.pi), dtype=torch.float64))


def test_kl_gradients_reach_mean_and_log_variance():
    sampler = fastdiff.DDPMSampler(prediction_type="mean", variance_type="learned_log_variance",
                                   beta_schedule="sigmoid_2015", num_train_timesteps=40)
    mean_head, var_head = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    model = lambda x, t: torch.cat([mean_head(x), var_head(x) - 3.0], 1)  # noqa: E731
    for t in (torch.zeros(8, dtype=torch.int64), torch.full((8,), 30)):  # the NLL term and a KL term
        mean_head.zero_grad(), var_head.zero_grad()
        diffusion_loss(model, torch.randn(8, 2), sampler, loss="kl", timesteps=t, seed=3).backward()
        for head in (mean_head, var_head):
            assert torch.isfinite(head.weight.grad).all() and head.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("sampler,match", [
    (fastdiff.DDPMSampler(prediction_type="mean"), "variance_type 'learned_log_variance' or 'learned_range'"),
    (fastdiff.DDIMSampler(), "needs a DDPMSampler"),
])
def test_kl_needs_a_ddpm_sampler_with_learned_log_variance(sampler, match):
    with pytest.raises(ValueError, match=match):
        diffusion_loss(lambda x, t: torch.cat([x, x], 1), torch.randn(4, 2), sampler, loss="kl", seed=0)


def test_unknown_loss_and_wrong_output_shape_are_refused():
    sampler = mean_sampler()
    with pytest.raises(ValueError, match=r"loss must be one of \('mse', 'kl'\)"):
        diffusion_loss(lambda x, t: x, torch.randn(4, 2), sampler, loss="huber", seed=0)
    with pytest.raises(ValueError, match=r"needs \[prediction; log-variance\] = \(4, 4\)"):
        diffusion_loss(lambda x, t: x, torch.randn(4, 2), sampler, loss="kl", seed=0)
