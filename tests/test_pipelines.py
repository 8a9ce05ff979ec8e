"""Tiny real diffusers pipelines with fastdiff samplers give diffusers' images (issue 14).

Each pipeline is built locally from tiny random components (no Hub download): a 2-block
UNet2DConditionModel or a 1-layer SD3 / Wan transformer, a 1-block AutoencoderKL (AutoencoderKLWan
for Wan), 2-layer CLIP text encoders (a 2-layer UMT5 encoder for Wan) and a CLIP tokenizer made from
the small local vocabulary in tests/assets (tests/assets/make_tiny_clip_tokenizer.py). Images are
16x16 (Wan: 5 frames), CFG is on (guidance_scale 5 with a negative prompt), 4 steps.

For every (pipeline, diffusers scheduler, fastdiff sampler) case, with the same generator:
- the sampler passed at construction gives diffusers' images (max pixel difference <= 1e-3 on the
  [0, 1] images; the final latents are compared too);
- swapped in the way users do it (`pipe.scheduler = X.from_config(pipe.scheduler.config)`, from
  the config a checkpoint ships) it gives what diffusers' own class gives when swapped in;
- `test_compatibles_swap_*`: every class `pipe.scheduler.compatibles` lists, ours and diffusers',
  loads from the other's config and samples, in both directions.
The issue's failing case (DDPM with diffusers' defaults through StableDiffusionPipeline, whose
__init__ patches `steps_offset` / `clip_sample` into `scheduler._internal_dict`) is reproduced in
`test_issue_14_*`: ignoring the patch changes the images by ~0.7 (0.007 with clip_sample=False);
fastdiff now follows it.
"""
import functools
import os

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

import fastdiff  # noqa: E402
from diffusers_twins import buildable_compatible_names  # noqa: E402


pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),  # diffusers' deprecation notes (e.g. the SD config patch)
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),  # numpy 2 notes inside some diffusers schedulers
]

TOKENIZER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "tiny-clip-tokenizer")
STEPS = 4
ATOL = 1e-3  # max pixel difference on the [0, 1] images (issue 14)


# ---- tiny components ------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def tokenizer():
    return transformers.CLIPTokenizer.from_pretrained(TOKENIZER)


def clip_config(**kwargs):
    tok = tokenizer()
    return transformers.CLIPTextConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        vocab_size=len(tok), max_position_embeddings=tok.model_max_length, hidden_size=32, intermediate_size=37,
        num_attention_heads=4, num_hidden_layers=2, **kwargs)


def tiny_vae(**kwargs):
    return diffusers.AutoencoderKL(block_out_channels=[16], in_channels=3, out_channels=3, latent_channels=4,
                                   down_block_types=["DownEncoderBlock2D"], up_block_types=["UpDecoderBlock2D"],
                                   norm_num_groups=8, sample_size=16, **kwargs).eval()


def tiny_unet(**kwargs):
    return diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, **kwargs).eval()


@functools.lru_cache(maxsize=None)
def components(kind: str) -> dict:
    """The modules of a tiny pipeline of `kind` (random weights, seeded), shared by every test."""
    torch.manual_seed(0)
    if kind == "sd":
        return dict(unet=tiny_unet(cross_attention_dim=32, attention_head_dim=8), vae=tiny_vae(),
                    text_encoder=transformers.CLIPTextModel(clip_config()).eval(), tokenizer=tokenizer(),
                    safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if kind == "sdxl":  # two text encoders; added time ids: 6 x 8 + pooled 32 = 80
        unet = tiny_unet(attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
                         addition_time_embed_dim=8, transformer_layers_per_block=(1, 1),
                         projection_class_embeddings_input_dim=6 * 8 + 32, cross_attention_dim=64)
        return dict(unet=unet, vae=tiny_vae(), text_encoder=transformers.CLIPTextModel(clip_config()).eval(),
                    text_encoder_2=transformers.CLIPTextModelWithProjection(clip_config(projection_dim=32)).eval(),
                    tokenizer=tokenizer(), tokenizer_2=tokenizer(), add_watermarker=False)
    if kind == "sd3":  # without T5: the pipeline uses zeros for its embeddings (joint dim 64 = the two CLIPs)
        transformer = diffusers.SD3Transformer2DModel(
            sample_size=16, patch_size=1, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8,
            num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=64, pooled_projection_dim=64).eval()
        return dict(transformer=transformer,
                    vae=tiny_vae(use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609,
                                 scaling_factor=1.5035),
                    text_encoder=transformers.CLIPTextModelWithProjection(clip_config(projection_dim=32)).eval(),
                    text_encoder_2=transformers.CLIPTextModelWithProjection(clip_config(projection_dim=32)).eval(),
                    tokenizer=tokenizer(), tokenizer_2=tokenizer(), text_encoder_3=None, tokenizer_3=None)
    if kind == "wan":  # a text-to-video pipeline: 5 frames of 16x16, latents 2 x 2 x 2
        text_encoder = transformers.UMT5EncoderModel(transformers.UMT5Config(
            vocab_size=len(tokenizer()), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8)).eval()
        transformer = diffusers.WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
            text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
            rope_max_seq_len=32).eval()
        vae = diffusers.AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                         temperal_downsample=[False, True, True]).eval()
        return dict(tokenizer=tokenizer(), text_encoder=text_encoder, transformer=transformer, vae=vae)
    raise ValueError(f"kind must be one of sd, sdxl, sd3, wan; got {kind!r}")


PIPELINES = {"sd": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline", "sd3": "StableDiffusion3Pipeline",
             "wan": "WanPipeline"}
CALL_KWARGS = {"wan": dict(num_frames=5, max_sequence_length=16)}

# The scheduler_config.json each kind of checkpoint ships (SD 1.5, SDXL base, SD3 medium, Wan 2.1 T2V).
CHECKPOINT_CONFIGS = {
    "sd": {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
           "clip_sample": False, "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
           "steps_offset": 1, "trained_betas": None},
    "sdxl": {"_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
             "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear", "num_train_timesteps": 1000,
             "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True,
             "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False},
    "sd3": {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0},
    "wan": {"_class_name": "UniPCMultistepScheduler", "beta_end": 0.02, "beta_schedule": "linear", "beta_start": 0.0001,
            "disable_corrector": [], "dynamic_thresholding_ratio": 0.995, "final_sigmas_type": "zero",
            "flow_shift": 3.0, "lower_order_final": True, "num_train_timesteps": 1000, "predict_x0": True,
            "prediction_type": "flow_prediction", "rescale_betas_zero_snr": False, "sample_max_value": 1.0,
            "solver_order": 2, "solver_p": None, "solver_type": "bh2", "steps_offset": 0, "thresholding": False,
            "timestep_spacing": "linspace", "trained_betas": None, "use_beta_sigmas": False,
            "use_exponential_sigmas": False, "use_flow_sigmas": True, "use_karras_sigmas": False},
}


def checkpoint_scheduler(kind: str):
    """The scheduler a pipeline of `kind` loads from its checkpoint (diffusers' class, from the file's config)."""
    config = CHECKPOINT_CONFIGS[kind]
    return getattr(diffusers, config["_class_name"]).from_config(config)


def build(kind: str, scheduler):
    if not hasattr(diffusers, PIPELINES[kind]):  # pyproject allows diffusers >= 0.30; Wan came in 0.33
        pytest.skip(f"diffusers {diffusers.__version__} has no {PIPELINES[kind]}")
    pipe = getattr(diffusers, PIPELINES[kind])(**components(kind), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe, kind: str, steps: int = STEPS, seed: int = 0) -> tuple[np.ndarray, torch.Tensor]:
    """(images in [0, 1], final latents) for one prompt with CFG, from a fixed generator."""
    latents = {}

    def keep_latents(pipe, i, t, tensors):
        latents["final"] = tensors["latents"].clone()
        return tensors

    out = pipe("a photo of a cat", negative_prompt="blurry", height=16, width=16, num_inference_steps=steps,
               guidance_scale=5.0, generator=torch.Generator().manual_seed(seed), output_type="np",
               callback_on_step_end=keep_latents, callback_on_step_end_tensor_inputs=["latents"],
               **CALL_KWARGS.get(kind, {}))
    images = out.frames if kind == "wan" else out.images
    assert np.isfinite(images).all() and torch.isfinite(latents["final"]).all()
    return images, latents["final"]


def fastdiff_class(name: str):
    return getattr(fastdiff, name)


def compare(ours, theirs, label: str) -> float:
    (images, latents), (their_images, their_latents) = ours, theirs
    diff = float(np.abs(images - their_images).max())
    latent_diff = float((latents - their_latents).abs().max())
    print(f"\n{label}: max pixel difference {diff:.3g} (latents {latent_diff:.3g})")
    assert images.shape == their_images.shape
    assert diff <= ATOL, f"{label}: max pixel difference {diff:.3g} > {ATOL} (latents differ by {latent_diff:.3g})"
    return diff


# ---- the cases ------------------------------------------------------------------------------------
SD15 = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, steps_offset=1)
SDXL = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
            timestep_spacing="leading")
CASES = [  # (id, pipeline kind, diffusers scheduler, fastdiff sampler, constructor keywords)
    ("sd-ddpm-defaults", "sd", "DDPMScheduler", "DDPMSampler", {}),  # issue 14's case
    ("sd-ddpm-noclip", "sd", "DDPMScheduler", "DDPMSampler", {"clip_sample": False}),
    ("sd-ddpm-sd15", "sd", "DDPMScheduler", "DDPMSampler", SD15),
    ("sd-ddim-defaults", "sd", "DDIMScheduler", "DDIMSampler", {}),
    ("sd-ddim-sd15", "sd", "DDIMScheduler", "DDIMSampler", dict(SD15, set_alpha_to_one=False)),
    ("sdxl-euler", "sdxl", "EulerDiscreteScheduler", "EulerDiscreteSampler", SDXL),
    ("sdxl-euler-ancestral", "sdxl", "EulerAncestralDiscreteScheduler", "EulerAncestralDiscreteSampler", SDXL),
    ("sdxl-dpmsolver++", "sdxl", "DPMSolverMultistepScheduler", "DPMSolverMultistepSampler", SDXL),
    ("sd3-flowmatch-euler", "sd3", "FlowMatchEulerDiscreteScheduler", "FlowMatchEulerDiscreteSampler", {"shift": 3.0}),
    ("wan-unipc", "wan", "UniPCMultistepScheduler", "UniPCMultistepSampler",
     dict(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)),
]
SWAPS = sorted({(kind, theirs, ours) for _, kind, theirs, ours, _ in CASES})


@pytest.mark.parametrize("kind", list(PIPELINES))
def test_builders_run_with_diffusers_own_scheduler(kind):
    """The tiny pipelines themselves work with the scheduler their checkpoints ship, and depend on the seed."""
    images, latents = sample(build(kind, checkpoint_scheduler(kind)), kind)
    other, _ = sample(build(kind, checkpoint_scheduler(kind)), kind, seed=1)
    assert images.shape[-3:] == (16, 16, 3) and images.std() > 0.01
    assert np.abs(other - images).max() > 0.01


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_sampler_at_construction_gives_diffusers_images(case):
    name, kind, theirs_name, ours_name, kwargs = case
    ours_cls = fastdiff_class(ours_name)
    theirs = sample(build(kind, getattr(diffusers, theirs_name)(**kwargs)), kind)
    ours = sample(build(kind, ours_cls(**kwargs)), kind)
    compare(ours, theirs, f"{name}: {ours_name}(**kwargs) at construction vs {theirs_name}")


@pytest.mark.parametrize("swap", SWAPS, ids=[f"{k}-{o}" for k, _, o in SWAPS])
def test_sampler_swapped_in_with_from_config_gives_diffusers_images(swap):
    """pipe.scheduler = X.from_config(pipe.scheduler.config), from the scheduler a checkpoint ships."""
    kind, theirs_name, ours_name = swap
    ours_cls = fastdiff_class(ours_name)
    pipe = build(kind, checkpoint_scheduler(kind))
    pipe.scheduler = getattr(diffusers, theirs_name).from_config(pipe.scheduler.config)
    theirs = sample(pipe, kind)
    pipe = build(kind, checkpoint_scheduler(kind))
    pipe.scheduler = ours_cls.from_config(pipe.scheduler.config)
    assert type(pipe.scheduler) is ours_cls
    compare(sample(pipe, kind), theirs, f"{kind}: {ours_name}.from_config(checkpoint config) vs {theirs_name}")


# ---- issue 14: the pipeline's config patch ----------------------------------------------------------
@pytest.mark.parametrize("clip_sample", [True, False], ids=["defaults", "clip_sample=False"])
def test_issue_14_sd_pipeline_patch_is_followed(clip_sample):
    """StableDiffusionPipeline.__init__ rewrites steps_offset (0 -> 1) and clip_sample (-> False) in
    scheduler._internal_dict. A sampler that keeps the values it was built with gives other images:
    emulated here by putting diffusers' original config back after construction (the issue measured
    0.77 / 0.0077 with fastdiff before the fix). fastdiff follows the patch: diffusers' images."""
    kwargs = {} if clip_sample else {"clip_sample": False}
    patched = build("sd", diffusers.DDPMScheduler(**kwargs))
    theirs = sample(patched, "sd")
    unpatched = build("sd", diffusers.DDPMScheduler(**kwargs))
    unpatched.scheduler._internal_dict = diffusers.DDPMScheduler(**kwargs).config  # what ignoring the patch means
    stale, _ = sample(unpatched, "sd")
    stale_diff = float(np.abs(stale - theirs[0]).max())
    print(f"\nignoring the patch ({'defaults' if clip_sample else 'clip_sample=False'}): max pixel difference "
          f"{stale_diff:.3g}")
    assert stale_diff > (0.1 if clip_sample else 1e-3)  # the patch matters: this test can see the bug
    sampler = fastdiff.DDPMSampler(**kwargs)
    ours = sample(build("sd", sampler), "sd")
    assert sampler.config.steps_offset == 1 and sampler.config.clip_sample is False  # patched, as diffusers'
    compare(ours, theirs, f"issue 14, DDPMSampler({kwargs or ''}) through StableDiffusionPipeline")


# ---- swapping the way UIs do it: every compatible class, both directions -------------------------------
def our_samplers() -> list:
    """fastdiff samplers of the SD (Karras) family, as `compatibles` lists them (new ones appear as they land)."""
    return [c for c in fastdiff.DDPMSampler().compatibles if c.__module__.startswith("fastdiff")]


def swap_and_sample(pipe, cls) -> None:
    """One step after `pipe.scheduler = cls.from_config(pipe.scheduler.config)`: it loads and samples."""
    source = type(pipe.scheduler).__name__
    pipe.scheduler = cls.from_config(pipe.scheduler.config)
    assert type(pipe.scheduler) is cls
    images, _ = sample(pipe, "sd", steps=1)
    assert images.shape == (1, 16, 16, 3), f"{source} -> {cls.__name__}"


@pytest.mark.parametrize("source", ["DDPMSampler", "DDIMSampler", "EulerDiscreteSampler",
                                    "EulerAncestralDiscreteSampler", "DPMSolverMultistepSampler",
                                    "UniPCMultistepSampler"])
def test_compatibles_swap_from_ours(source):
    """From a fastdiff sampler: every class of its `compatibles` (fastdiff's and diffusers') loads and samples."""
    cls = fastdiff_class(source)
    pipe = build("sd", cls.from_config(CHECKPOINT_CONFIGS["sd"]))
    compatibles = pipe.scheduler.compatibles
    names = [c.__name__ for c in compatibles]
    assert buildable_compatible_names(diffusers.DDPMScheduler()) <= set(names)
    assert {"DDPMSampler", "DDIMSampler"} <= set(names)
    for target in compatibles:
        pipe.scheduler = cls.from_config(CHECKPOINT_CONFIGS["sd"])
        swap_and_sample(pipe, target)


@pytest.mark.parametrize("source", sorted(c.name for c in diffusers.schedulers.scheduling_utils.KarrasDiffusionSchedulers))
def test_compatibles_swap_from_diffusers(source):
    """From each diffusers scheduler of the family (what diffusers' `compatibles` lists, which cannot name
    fastdiff's): every fastdiff sampler loads from its config and samples. (Back to each diffusers class:
    test_compatibles_swap_from_ours.)"""
    theirs_cls = getattr(diffusers, source)
    if type(theirs_cls).__name__ == "DummyObject":
        pytest.skip(f"{source} needs an optional package that is not installed")
    theirs = theirs_cls.from_config(CHECKPOINT_CONFIGS["sd"])  # once: KDPM2's __init__ alone takes ~2 s
    pipe = build("sd", theirs)
    for ours_cls in our_samplers():
        pipe.scheduler = theirs
        swap_and_sample(pipe, ours_cls)


# ---- a saved pipeline folder (README "Use") ------------------------------------------------------------
def test_readme_recipe_on_a_saved_pipeline_folder(tmp_path):
    """README: load a pipeline folder, build it again with a fastdiff sampler from its scheduler subfolder."""
    build("sd", checkpoint_scheduler("sd")).save_pretrained(tmp_path)
    loaded = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    sampler = fastdiff.DDIMSampler.from_pretrained(tmp_path, subfolder="scheduler")
    pipe = diffusers.StableDiffusionPipeline(**{**loaded.components, "scheduler": sampler})
    pipe.set_progress_bar_config(disable=True)
    theirs = diffusers.StableDiffusionPipeline(
        **{**loaded.components, "scheduler": diffusers.DDIMScheduler.from_pretrained(tmp_path, subfolder="scheduler")})
    theirs.set_progress_bar_config(disable=True)
    compare(sample(pipe, "sd"), sample(theirs, "sd"), "saved SD folder, DDIMSampler.from_pretrained(subfolder=)")


def test_pipeline_from_pretrained_with_a_fastdiff_scheduler(tmp_path):
    """Once diffusers is loaded, fastdiff samplers subclass its SchedulerMixin: pipelines accept them in
    from_pretrained(scheduler=...), save them, and load the saved folder with the fastdiff sampler again."""
    build("sd", checkpoint_scheduler("sd")).save_pretrained(tmp_path)
    sampler = fastdiff.DDIMSampler.from_pretrained(tmp_path, subfolder="scheduler")
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path, scheduler=sampler)
    assert pipe.scheduler is sampler
    pipe.save_pretrained(tmp_path / "again")
    again = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "again")
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert type(again.scheduler) is fastdiff.DDIMSampler and public(again.scheduler.config) == public(sampler.config)
    again.set_progress_bar_config(disable=True)
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(
        tmp_path, scheduler=diffusers.DDIMScheduler.from_pretrained(tmp_path, subfolder="scheduler"))
    theirs.set_progress_bar_config(disable=True)
    compare(sample(again, "sd"), sample(theirs, "sd"), "saved with a fastdiff sampler, loaded back")
