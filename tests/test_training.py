"""fastdiff.training.diffusion_loss vs a hand-written loss on diffusers' add_noise / get_velocity."""
import pytest
import torch

import fastdiff
from fastdiff import noise as N
from fastdiff.training import diffusion_loss

diffusers = pytest.importorskip("diffusers")

SHAPE = (4, 3, 5, 7)


class RecordingModel(torch.nn.Module):
    """A 1x1 conv that remembers what it was called with."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 3, 1)
        self.inputs = []

    def forward(self, x, t, labels=None):
        self.inputs.append((x.clone(), t.clone(), labels))
        return self.conv(x) + t.float()[:, None, None, None] / 1000


def hand_written_loss(model, x0, t, noise, prediction_type, reduction="mean"):
    """The training loss of diffusers' train_unconditional.py, written out with diffusers' scheduler."""
    scheduler = diffusers.DDPMScheduler(prediction_type=prediction_type)
    x_t = scheduler.add_noise(x0, noise, t)
    target = {"epsilon": noise, "sample": x0, "v_prediction": scheduler.get_velocity(x0, noise, t)}[prediction_type]
    return torch.nn.functional.mse_loss(model(x_t, t), target, reduction=reduction)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_generator_noise_equals_hand_written_loss(prediction_type):
    x0, t = torch.randn(SHAPE), torch.tensor([0, 10, 500, 999])
    sampler = fastdiff.DDPMSampler(prediction_type=prediction_type)
    got = diffusion_loss(RecordingModel(), x0, sampler, timesteps=t, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    expected = hand_written_loss(RecordingModel(), x0, t, noise, prediction_type)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_seeded_noise_is_the_philox_q_sample_stream(prediction_type):
    x0, t = torch.randn(SHAPE), torch.tensor([3, 200, 700, 999])
    sampler = fastdiff.DDPMSampler(prediction_type=prediction_type)
    model = RecordingModel()
    got = diffusion_loss(model, x0, sampler, timesteps=t, seed=42, reduction="none")
    noise = N.randn(SHAPE, 42, counter=0, stream=N.STREAM_Q_SAMPLE)
    expected = hand_written_loss(RecordingModel(), x0, t, noise, prediction_type, reduction="none")
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    x_t, t_seen, _ = model.inputs[0]
    assert torch.equal(t_seen, t)
    torch.testing.assert_close(x_t, diffusers.DDPMScheduler().add_noise(x0, noise, t), atol=1e-6, rtol=1e-6)


def test_timesteps_are_drawn_uniformly_per_sample_and_follow_the_seed():
    model, x0, sampler = RecordingModel(), torch.randn(64, 3, 2, 2), fastdiff.DDPMSampler(num_train_timesteps=50)
    a = diffusion_loss(model, x0, sampler, seed=7)
    b = diffusion_loss(model, x0, sampler, seed=7)
    diffusion_loss(model, x0, sampler, seed=8)
    (_, t7, _), (_, t7_again, _), (_, t8, _) = model.inputs
    assert t7.shape == (64,) and t7.dtype == torch.int64
    assert 0 <= int(t7.min()) and int(t7.max()) < 50 and len(t7.unique()) > 20
    assert torch.equal(t7, t7_again) and torch.equal(a, b)
    assert not torch.equal(t7, t8)


def test_one_shared_timestep_and_cond_reach_the_model():
    model, labels = RecordingModel(), torch.tensor([1, 2, 3, 4])
    diffusion_loss(model, torch.randn(SHAPE), fastdiff.DDIMSampler(), timesteps=17, seed=0, cond={"labels": labels})
    _, t, seen_labels = model.inputs[0]
    assert t.tolist() == [17] * 4 and seen_labels is labels


def test_reductions_and_gradients():
    model, x0, sampler = RecordingModel(), torch.randn(SHAPE), fastdiff.DDPMSampler()
    t = torch.tensor([5, 6, 7, 8])
    none = diffusion_loss(model, x0, sampler, timesteps=t, seed=3, reduction="none")
    total = diffusion_loss(model, x0, sampler, timesteps=t, seed=3, reduction="sum")
    mean = diffusion_loss(model, x0, sampler, timesteps=t, seed=3)
    assert none.shape == SHAPE
    torch.testing.assert_close(total, none.sum())
    torch.testing.assert_close(mean, none.mean())
    mean.backward()
    assert model.conv.weight.grad is not None and model.conv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(seed=1, generator=torch.Generator()), ValueError, "at most one of seed"),
    (dict(reduction="avg"), ValueError, "reduction must be one of"),
    (dict(timesteps=torch.tensor([0, 1, 2, 1000])), ValueError, r"in \[0, 1000\), got \[1000\]"),
    (dict(timesteps=torch.tensor([0.5, 1.0, 2.0, 3.0])), TypeError, "must be integers"),
    (dict(timesteps=torch.tensor([1, 2])), ValueError, "1 or batch=4 entries"),
])
def test_errors_name_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        diffusion_loss(RecordingModel(), torch.randn(SHAPE), fastdiff.DDPMSampler(), **kwargs)


def test_a_model_with_the_wrong_output_shape_is_reported():
    with pytest.raises(ValueError, match="model output has shape"):
        diffusion_loss(lambda x, t: x[:, :1], torch.randn(SHAPE), fastdiff.DDPMSampler(), seed=0)
