"""fastdiff samplers inside diffusers' own DDPMPipeline / DDIMPipeline give diffusers' images.

A tiny randomly initialised UNet2DModel is built locally (no downloads). The default tables
(`table_dtype="float32"`) hold the coefficients diffusers itself computes, in its float32 operation
order, so stock diffusers matches to kernel rounding (measured: a few 1e-6 on the [0, 1] images;
the fused step's x_prev = a x + b x0 + s n rounds a little differently from diffusers' sequence of
tensor ops). `table_dtype="float64"` derives the coefficients in float64 from the same float32
schedule: it matches diffusers with its tables promoted to float64 (`float64_tables`). A 100-step
cosine DDPM run shows the two derivations apart (measured: each matches its twin to ~5e-6 and the
other one to ~2e-5).
"""
import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import fastdiff  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


STEPS = 5
BATCH = 2
TIGHT = 1e-5  # max pixel difference to the matching diffusers twin


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


def run(pipeline_class, unet, scheduler, seed=0, steps=STEPS, **kwargs) -> np.ndarray:
    pipe = pipeline_class(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = scheduler  # DDIMPipeline.__init__ converts any scheduler to DDIMScheduler: set it again
    images = pipe(batch_size=BATCH, generator=torch.Generator().manual_seed(seed), num_inference_steps=steps,
                  output_type="np", **kwargs).images
    assert type(pipe.scheduler) is type(scheduler)
    return images


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max())


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
    assert sampler.config.table_dtype == "float32"
    ours = run(pipeline_class, unet, sampler, **kwargs)
    theirs = run(pipeline_class, unet, scheduler_class.from_config(stock.config), **kwargs)
    ours64 = run(pipeline_class, unet, sampler_class.from_config(stock.config, table_dtype="float64"), **kwargs)
    exact = run(pipeline_class, unet, float64_tables(scheduler_class.from_config(stock.config)), **kwargs)
    print(f"\n{name}: float32 tables vs stock diffusers {max_diff(ours, theirs):.3g}, "
          f"float64 tables vs diffusers with float64 tables {max_diff(ours64, exact):.3g}")

    assert ours.shape == (BATCH, 16, 16, 3) and np.isfinite(ours).all()
    assert ours.std() > 0.05  # real images, not a constant
    np.testing.assert_allclose(ours, theirs, atol=TIGHT, rtol=0)
    np.testing.assert_allclose(ours64, exact, atol=TIGHT, rtol=0)
    other_seed = run(pipeline_class, unet, sampler, seed=1, **kwargs)
    assert np.abs(other_seed - ours).max() > 0.01  # the generator is what the images depend on


def test_table_dtype_tells_the_two_derivations_apart(unet):
    """100 cosine DDPM steps (fixed_small_log, where 1 - abar_t / abar_prev cancels most): float32 tables match
    stock diffusers, float64 tables match diffusers with float64 tables, each clearly closer to its own twin."""
    config = dict(beta_schedule="squaredcos_cap_v2", variance_type="fixed_small_log", clip_sample=False)
    pipeline = diffusers.DDPMPipeline
    ours = run(pipeline, unet, fastdiff.DDPMSampler(**config), steps=100)
    ours64 = run(pipeline, unet, fastdiff.DDPMSampler(**config, table_dtype="float64"), steps=100)
    theirs = run(pipeline, unet, diffusers.DDPMScheduler(**config), steps=100)
    exact = run(pipeline, unet, float64_tables(diffusers.DDPMScheduler(**config)), steps=100)
    matched = max(max_diff(ours, theirs), max_diff(ours64, exact))
    crossed = min(max_diff(ours, exact), max_diff(ours64, theirs))
    print(f"\n100 cosine DDPM steps: float32 vs stock {max_diff(ours, theirs):.3g}, float64 vs float64 twin "
          f"{max_diff(ours64, exact):.3g}; crossed: float32 vs float64 twin {max_diff(ours, exact):.3g}, "
          f"float64 vs stock {max_diff(ours64, theirs):.3g}")
    assert matched <= TIGHT
    assert crossed > 2 * matched
