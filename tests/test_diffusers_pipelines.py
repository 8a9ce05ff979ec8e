"""fastdiff samplers inside diffusers' own DDPMPipeline / DDIMPipeline give diffusers' images.

A tiny randomly initialised UNet2DModel is built locally (no downloads). Tolerances: diffusers
computes its per-step coefficients in float32 (1 - abar_t / abar_prev cancels), fastdiff derives
them in float64 from the same float32 tables. With diffusers' tables promoted to float64 the two
agree to float32 rounding (atol 1e-5 on the [0, 1] images); against stock diffusers they differ
by the float32 cancellation error of diffusers' coefficients, ~1e-5 per step, so a few steps
stay below 1e-3 on the images.
"""
import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import fastdiff  # noqa: E402

STEPS = 5
BATCH = 2


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    model = diffusers.UNet2DModel(
        sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
        norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    return model.eval()


def float64_tables(scheduler):
    """diffusers' scheduler with its tables in float64: its step then matches fastdiff's float64-derived rows."""
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.double()
    scheduler.one = torch.tensor(1.0, dtype=torch.float64)
    if hasattr(scheduler, "final_alpha_cumprod"):
        scheduler.final_alpha_cumprod = scheduler.final_alpha_cumprod.double()
    return scheduler


def run(pipeline_class, unet, scheduler, seed=0, **kwargs) -> np.ndarray:
    pipe = pipeline_class(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = scheduler  # DDIMPipeline.__init__ converts any scheduler to DDIMScheduler: set it again
    images = pipe(batch_size=BATCH, generator=torch.Generator().manual_seed(seed), num_inference_steps=STEPS,
                  output_type="np", **kwargs).images
    assert type(pipe.scheduler) is type(scheduler)
    return images


CASES = [
    ("ddpm", diffusers.DDPMPipeline, diffusers.DDPMScheduler, fastdiff.DDPMSampler, {}),
    ("ddim", diffusers.DDIMPipeline, diffusers.DDIMScheduler, fastdiff.DDIMSampler, {"eta": 0.0}),
    ("ddim-eta1", diffusers.DDIMPipeline, diffusers.DDIMScheduler, fastdiff.DDIMSampler, {"eta": 1.0}),
]


@pytest.mark.parametrize("name,pipeline_class,scheduler_class,sampler_class,kwargs", CASES, ids=[c[0] for c in CASES])
def test_pipeline_with_fastdiff_sampler_equals_diffusers(unet, name, pipeline_class, scheduler_class, sampler_class,
                                                         kwargs):
    stock = scheduler_class(num_train_timesteps=1000)
    sampler = sampler_class.from_config(stock.config)
    ours = run(pipeline_class, unet, sampler, **kwargs)
    exact = run(pipeline_class, unet, float64_tables(scheduler_class.from_config(stock.config)), **kwargs)
    theirs = run(pipeline_class, unet, stock, **kwargs)

    assert ours.shape == (BATCH, 16, 16, 3) and np.isfinite(ours).all()
    assert ours.std() > 0.05  # real images, not a constant
    np.testing.assert_allclose(ours, exact, atol=1e-5, rtol=0)
    np.testing.assert_allclose(ours, theirs, atol=1e-3, rtol=0)
    other_seed = run(pipeline_class, unet, sampler, seed=1, **kwargs)
    assert np.abs(other_seed - ours).max() > 0.01  # the generator is what the images depend on
