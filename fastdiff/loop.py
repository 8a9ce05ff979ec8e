"""sample(): the whole denoising loop for any fastdiff sampler, with fused classifier-free guidance,
progress, callbacks, trajectories and optional CUDA-graph replay.

    import fastdiff
    from fastdiff.loop import sample

    sampler = fastdiff.DDIMSampler.from_config(pipe.scheduler.config)
    images = sample(unet, sampler, (16, 3, 64, 64), num_inference_steps=50, seed=0, device="cuda")

The loop never waits for the device: the timesteps live on the sample's device, each step gathers
its coefficients there, and noise comes from the in-kernel Philox stream (`seed=`), so a CUDA loop
queues work as fast as Python can issue it, and `cuda_graph=True` can replay it.

Several GPUs (or processes): every process samples its own slice of the batch with the same
`seed` and `sample_offset` = the global index of its first sample. Philox noise is keyed by the
global sample index, so the gathered result is the single-process result, whatever the split:

    # torchrun --nproc_per_node=8 sample_ddp.py
    import torch, torch.distributed as dist
    import fastdiff
    from fastdiff.loop import sample

    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(rank % torch.cuda.device_count())
    total = 64                                  # global batch, divisible by world
    per_rank = total // world
    sampler = fastdiff.DDIMSampler.from_config(scheduler_config)
    x = sample(model, sampler, (per_rank, 3, 32, 32), num_inference_steps=50, seed=1234,
               sample_offset=rank * per_rank, device="cuda", progress=(rank == 0))
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x)                   # parts[r] = samples r*per_rank ... (r+1)*per_rank-1
    images = torch.cat(parts)                   # == sample(model, sampler, (64, 3, 32, 32), seed=1234)
    dist.destroy_process_group()

(This holds when the model treats every sample independently, as a denoiser does; batched
matrix products may still round differently for different batch sizes, by ~1e-7.)
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from . import noise as N
from .samplers.base import BaseSampler, randn_like_diffusers

Callback = Callable[[int, torch.Tensor, torch.Tensor], None]


# ---- inputs -----------------------------------------------------------------------------------
def _check_sampler(sampler: Any) -> None:
    if not isinstance(sampler, BaseSampler):
        hint = ""
        if hasattr(sampler, "config") and hasattr(sampler, "step"):
            hint = " (for a diffusers scheduler use fastdiff.DDPMSampler / DDIMSampler .from_config(scheduler.config))"
        raise TypeError(f"sampler must be a fastdiff sampler (DDPMSampler, DDIMSampler), got "
                        f"{type(sampler).__name__}{hint}")


def _check_noise_source(seed: int | None, generator, cuda_graph: bool) -> None:
    if seed is not None and generator is not None:
        raise ValueError("pass at most one of seed (in-kernel Philox noise) and generator (torch.randn noise, "
                         "as diffusers draws it); got both")
    if seed is not None:
        N.check_seed(seed)
    if cuda_graph and generator is not None:
        raise ValueError("cuda_graph=True needs seed= (or no seed): noise drawn from a torch.Generator on the "
                         "host cannot be replayed by a CUDA graph; got generator=")


def _resolve_device(device, x_T: torch.Tensor | None, model) -> torch.device:
    """The explicit device, else x_T's, else the model's parameters', else the CPU."""
    if device is not None:
        return torch.device(device)
    if x_T is not None:
        return x_T.device
    if isinstance(model, torch.nn.Module):
        for parameter in model.parameters():
            return parameter.device
    return torch.device("cpu")


def _check_shape(shape: Sequence[int] | None, x_T: torch.Tensor | None) -> tuple[int, ...]:
    if shape is None and x_T is None:
        raise ValueError("pass shape (e.g. (batch, channels, height, width)) or x_T; got neither")
    if x_T is not None:
        if not isinstance(x_T, torch.Tensor) or not x_T.is_floating_point():
            raise TypeError(f"x_T must be a floating-point tensor, got {type(x_T).__name__}"
                            + (f" of dtype {x_T.dtype}" if isinstance(x_T, torch.Tensor) else ""))
        if shape is not None and tuple(shape) != tuple(x_T.shape):
            raise ValueError(f"shape {tuple(shape)} does not match x_T's shape {tuple(x_T.shape)}")
        shape = x_T.shape
    shape = tuple(shape)
    if len(shape) < 2 or not all(isinstance(s, int) and s > 0 for s in shape):
        raise ValueError(f"shape must be (batch, ...) with at least 2 positive ints, got {shape}")
    return shape


def _check_guidance(guidance_scale: float | None, cond, uncond) -> None:
    if guidance_scale is None:
        if uncond is not None:
            raise ValueError("uncond is only used with guidance_scale; pass guidance_scale= or drop uncond")
        return
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)):
        raise TypeError(f"guidance_scale must be a float, got {type(guidance_scale).__name__}")
    if cond is None or uncond is None:
        raise ValueError("guidance_scale needs both cond and uncond (dicts of model keyword arguments, e.g. "
                         "cond={'labels': y}, uncond={'labels': null_labels}); got "
                         f"cond={'None' if cond is None else 'a dict'}, uncond={'None' if uncond is None else 'a dict'}")
    if set(cond) != set(uncond):
        raise ValueError(f"cond and uncond must have the same keys, got {sorted(cond)} and {sorted(uncond)}")


def _check_cond_batch(cond: Mapping[str, Any] | None, batch: int, name: str) -> None:
    for key, value in (cond or {}).items():
        if isinstance(value, torch.Tensor) and (value.ndim == 0 or value.shape[0] != batch):
            raise ValueError(f"{name}[{key!r}] must have batch {batch} in dim 0, got shape {tuple(value.shape)}")


def _model_kwargs(cond, uncond, guidance_scale, device) -> dict[str, Any]:
    """The keyword arguments of the model call: cond, or for CFG the [uncond; cond] batch (diffusers' order)."""
    if cond is None:
        return {}
    if guidance_scale is None:
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in cond.items()}
    kwargs = {}
    for key, value in cond.items():
        other = uncond[key]
        if isinstance(value, torch.Tensor):
            kwargs[key] = torch.cat([other.to(device), value.to(device)])
        elif value is other or value == other:  # non-tensor options (e.g. return_dict) must agree
            kwargs[key] = value
        else:
            raise ValueError(f"cond[{key!r}] and uncond[{key!r}] are not tensors and differ: {value!r} vs {other!r}")
    return kwargs


def _step_options(sampler: BaseSampler, eta: float) -> dict[str, Any]:
    """`eta=` for samplers whose step takes it (DDIM); any other sampler must get eta=0."""
    if "eta" in inspect.signature(sampler.step).parameters:
        return {"eta": float(eta)}
    if eta != 0.0:
        raise ValueError(f"eta={eta!r} is only used by samplers with an eta (DDIMSampler); "
                         f"{type(sampler).__name__} needs eta=0.0")
    return {}


# ---- one step ---------------------------------------------------------------------------------
def model_prediction(output) -> torch.Tensor:
    """A model's prediction: a tensor, diffusers' output object (.sample) or a tuple (first item)."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "sample"):
        return output.sample
    if isinstance(output, (tuple, list)):
        return output[0]
    raise TypeError(f"model must return a tensor, an object with .sample or a tuple, got {type(output).__name__}")


def _denoise_step(model, sampler, x, t, kwargs, guidance_scale, noise_kwargs, options) -> torch.Tensor:
    """Model call (one batched call on [x; x] for CFG) + one fused sampler step; no host sync."""
    model_input = sampler.scale_model_input(x, t)
    if guidance_scale is not None:
        model_input = torch.cat([model_input, model_input])
    # The model gets one timestep per batch element (a [B] view of the device scalar t).
    prediction = model_prediction(model(model_input, t.expand(model_input.shape[0]), **kwargs))
    return sampler.step(prediction, t, x, guidance_scale=guidance_scale, **noise_kwargs, **options).prev_sample


def _initial_noise(shape, seed, generator, sample_offset, device, dtype) -> torch.Tensor:
    if generator is not None:
        return randn_like_diffusers(shape, generator, device, dtype)  # what diffusers' pipelines draw
    return N.randn(shape, seed, counter=0, stream=N.STREAM_INITIAL_NOISE, sample_offset=sample_offset,
                   device=device, dtype=dtype)


# ---- the loop ---------------------------------------------------------------------------------
@torch.no_grad()
def sample(
    model: Callable[..., Any],
    sampler: BaseSampler,
    shape: Sequence[int] | None = None,
    *,
    x_T: torch.Tensor | None = None,
    num_inference_steps: int = 50,
    guidance_scale: float | None = None,
    cond: Mapping[str, Any] | None = None,
    uncond: Mapping[str, Any] | None = None,
    seed: int | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    eta: float = 0.0,
    callback: Callback | None = None,
    return_trajectory: bool = False,
    progress: bool = True,
    cuda_graph: bool = False,
    sample_offset: int = 0,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
    """Run the reverse process from x_T to x_0 and return x_0 (and the trajectory when asked).

    model: called as `model(x, t, **cond)` with t a [batch] int64 tensor on the sample's device;
        returns the prediction (a tensor, diffusers' `.sample` output, or a tuple).
    sampler: a fastdiff sampler; `set_timesteps(num_inference_steps, device)` is called here.
    shape / x_T: the batch to sample; x_T is drawn from the seed / generator when not given.
    guidance_scale, cond, uncond: classifier-free guidance. One model call per step on [x; x] with
        each tensor of `uncond` and `cond` concatenated along the batch ([uncond; cond], as
        diffusers); the guidance u + w (c - u) is fused into the sampler step.
    seed: in-kernel Philox noise; sample i (global index `sample_offset + i`) gets the same x_T and
        step noise in any batch split. generator: torch.randn draws exactly as diffusers' pipelines
        (same images as diffusers for the same generator). Neither: a seed from torch's default
        generator (so torch.manual_seed makes runs repeatable).
    eta: DDIM's eta (0 = deterministic DDIM); must be 0 for samplers without one.
    callback(i, t, x): after step i, with its timestep (a device scalar) and the new sample (with
        cuda_graph=True a buffer the next step overwrites: clone it to keep it).
    return_trajectory: also return [x_T, x after step 1, ..., x_0] (clones, on the device).
    cuda_graph: capture model call + fused step once in a CUDA graph and replay it every step.
    """
    _check_sampler(sampler)
    _check_noise_source(seed, generator, cuda_graph)
    shape = _check_shape(shape, x_T)
    _check_guidance(guidance_scale, cond, uncond)
    _check_cond_batch(cond, shape[0], "cond")
    _check_cond_batch(uncond, shape[0], "uncond")
    if isinstance(sample_offset, bool) or not isinstance(sample_offset, int) or sample_offset < 0:
        raise ValueError(f"sample_offset must be an int >= 0, got {sample_offset!r}")
    device = _resolve_device(device, x_T, model)
    if cuda_graph and device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs a CUDA device, got device={str(device)!r}; "
                         "use cuda_graph=False on the CPU")
    options = _step_options(sampler, eta)
    if seed is None and generator is None:
        seed = N.draw_seed()  # DESIGN "Noise": from torch's default CPU generator, no device sync

    x = _initial_noise(shape, seed, generator, sample_offset, device, dtype) if x_T is None else x_T.to(device)
    sampler.set_timesteps(num_inference_steps, device=device)
    timesteps = sampler.timesteps  # on `device`: each step indexes a view, the loop never reads a value
    kwargs = _model_kwargs(cond, uncond, guidance_scale, device)
    noise_kwargs = {"generator": generator} if generator is not None else {"seed": seed,
                                                                           "sample_offset": sample_offset}
    step = (_GraphedStep(model, sampler, x, timesteps[0], kwargs, guidance_scale, noise_kwargs, options)
            if cuda_graph else None)

    trajectory = [x.clone()] if return_trajectory else []
    for i in tqdm(range(len(timesteps)), desc="sampling", disable=not progress, leave=False):
        t = timesteps[i]
        if step is not None:
            x = step(t)
        else:
            x = _denoise_step(model, sampler, x, t, kwargs, guidance_scale, noise_kwargs, options)
        if return_trajectory:
            trajectory.append(x.clone())
        if callback is not None:
            callback(i, t, x)
    return (x, trajectory) if return_trajectory else x


class _GraphedStep:
    """The model call + fused step captured once in a CUDA graph, replayed for every step.

    Why one step per replay rather than the whole loop in one graph: capture time and memory do
    not grow with the number of steps, one graph serves any step count, and the progress bar,
    callback and trajectory behave exactly as in the eager loop. A replay costs one launch (a few
    microseconds), small next to a denoiser call, and it removes the per-kernel launch overhead
    that dominates small-batch sampling.

    State lives in static device buffers the graph reads (gpt-fast style): `x` (the sample) and
    `t` (the timestep). Per step the host only queues `t.copy_(timesteps[i])` (a device-to-device
    copy) and a replay; the graph writes x_{t-1} back into `x`. The coefficient row is gathered on
    the device from `t` and the Philox counter is read from that row, so the noise changes per step
    even though the seed is baked into the graph.
    """

    def __init__(self, model, sampler, x_T, first_t, kwargs, guidance_scale, noise_kwargs, options):
        self.x = x_T.clone()
        self.t = first_t.clone()

        def run_step() -> None:
            self.x.copy_(_denoise_step(model, sampler, self.x, self.t, kwargs, guidance_scale, noise_kwargs, options))

        # Warm up on a side stream (first calls compile kernels, fill caches, pick cuBLAS algorithms;
        # none of that may happen during capture), then restore x_T: the warm-up stepped it.
        side = torch.cuda.Stream(device=self.x.device)
        side.wait_stream(torch.cuda.current_stream(self.x.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                run_step()
        torch.cuda.current_stream(self.x.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            run_step()
        self.x.copy_(x_T)

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        self.t.copy_(t)
        self.graph.replay()
        return self.x
