"""sample(): the whole denoising loop for any fastdiff sampler, with fused classifier-free guidance,
progress, callbacks, trajectories and optional CUDA-graph replay.

    import fastdiff
    from fastdiff.loop import sample

    sampler = fastdiff.DDIMSampler.from_config(pipe.scheduler.config)
    images = sample(unet, sampler, (16, 3, 64, 64), num_inference_steps=50, seed=0, device="cuda")

The loop never waits for the device: the timesteps live on the sample's device, each step finds
its coefficient row there (the sampler's device step counter, or the timestep itself), and noise
comes from the in-kernel Philox stream (`seed=`), so a CUDA loop queues work as fast as Python can
issue it, and `cuda_graph=True` can replay it. Each step writes its result into the loop's sample
buffer in place and skips pred_original_sample.

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
            hint = (f" (for diffusers' {type(sampler).__name__} use the fastdiff sampler that replaces it, e.g. "
                    "fastdiff.EulerDiscreteSampler.from_config(scheduler.config))")
        raise TypeError(f"sampler must be a fastdiff sampler (fastdiff.*Sampler), got "
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


def _denoise_step(model, sampler, x, t, kwargs, guidance_scale, noise_kwargs, options) -> None:
    """Model call (one batched call on [x; x] for CFG) + one fused sampler step, written into x in place.

    No host sync: t is a device tensor, the sampler finds its row on the device.
    """
    model_input = sampler.scale_model_input(x, t)
    if guidance_scale is not None:
        model_input = torch.cat([model_input, model_input])
    # The model gets one timestep per batch element (a [B] view of the device timestep t).
    prediction = model_prediction(model(model_input, t.expand(model_input.shape[0]), **kwargs))
    sampler.step(prediction, t, x, guidance_scale=guidance_scale, out=x, **noise_kwargs, **options)


def _initial_noise(shape, seed, generator, sample_offset, device, dtype) -> torch.Tensor:
    if generator is not None:
        return randn_like_diffusers(shape, generator, device, dtype)  # what diffusers' pipelines draw
    return N.randn(shape, seed, counter=0, stream=N.STREAM_INITIAL_NOISE, sample_offset=sample_offset,
                   device=device, dtype=dtype)


CUDA_GRAPH_MODES = (False, True, "step", "loop")


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
    cuda_graph: bool | str = False,
    sample_offset: int = 0,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
    """Run the reverse process from x_T to x_0 and return x_0 (and the trajectory when asked).

    model: called as `model(x, t, **cond)` with t a [batch] tensor of the sampler's timesteps on the
        sample's device; returns the prediction (a tensor, diffusers' `.sample` output, or a tuple).
    sampler: a fastdiff sampler; `set_timesteps(num_inference_steps, device)` is called here (and
        `set_begin_index(0)`, as diffusers' pipelines do).
    shape / x_T: the batch to sample; x_T is drawn from the seed / generator when not given and
        scaled by `sampler.init_noise_sigma` (diffusers' pipelines do the same); a given x_T is used
        as it is.
    guidance_scale, cond, uncond: classifier-free guidance. One model call per step on [x; x] with
        each tensor of `uncond` and `cond` concatenated along the batch ([uncond; cond], as
        diffusers); the guidance u + w (c - u) is fused into the sampler step.
    seed: in-kernel Philox noise; sample i (global index `sample_offset + i`) gets the same x_T and
        step noise in any batch split. generator: torch.randn draws exactly as diffusers' pipelines
        (same images as diffusers for the same generator). Neither: a seed from torch's default
        generator (so torch.manual_seed makes runs repeatable).
    eta: DDIM's eta (0 = deterministic DDIM); must be 0 for samplers without one.
    callback(i, t, x): after step i, with its timestep (a device tensor) and the sample (a buffer the
        next step overwrites in place: clone it to keep it).
    return_trajectory: also return [x_T, x after step 1, ..., x_0] (clones, on the device).
    cuda_graph: True / "step": capture model call + fused step once in a CUDA graph and replay it
        every step; "loop": capture the whole loop as one graph (no progress bar, callback or
        trajectory). Graphs are cached on the sampler per (model, shape, dtype, device, schedule,
        guidance, cond shapes, sample_offset, eta): a second call with the same setup, any seed
        and any cond values, replays without capturing again.
    """
    _check_sampler(sampler)
    _check_noise_source(seed, generator, cuda_graph)
    shape = _check_shape(shape, x_T)
    _check_guidance(guidance_scale, cond, uncond)
    _check_cond_batch(cond, shape[0], "cond")
    _check_cond_batch(uncond, shape[0], "uncond")
    if isinstance(sample_offset, bool) or not isinstance(sample_offset, int) or sample_offset < 0:
        raise ValueError(f"sample_offset must be an int >= 0, got {sample_offset!r}")
    if cuda_graph not in CUDA_GRAPH_MODES:
        raise ValueError(f"cuda_graph must be one of {CUDA_GRAPH_MODES}, got {cuda_graph!r}")
    device = _resolve_device(device, x_T, model)
    if cuda_graph and device.type != "cuda":
        raise ValueError(f"cuda_graph={cuda_graph!r} needs a CUDA device, got device={str(device)!r}; "
                         "use cuda_graph=False on the CPU")
    if cuda_graph == "loop" and (callback is not None or return_trajectory):
        raise ValueError("cuda_graph='loop' replays the whole loop at once: callback and return_trajectory need "
                         "cuda_graph=True (one graph per step)")
    options = _step_options(sampler, eta)
    if seed is None and generator is None:
        seed = N.draw_seed()  # DESIGN "Noise": from torch's default CPU generator, no device sync

    kwargs = _model_kwargs(cond, uncond, guidance_scale, device)
    noise_kwargs = {"generator": generator} if generator is not None else {"seed": seed,
                                                                           "sample_offset": sample_offset}
    graph = None
    if cuda_graph:
        key = _graph_key(model, sampler, num_inference_steps, shape, dtype, device, kwargs, guidance_scale,
                         noise_kwargs, options, cuda_graph)
        graph = _graphs_of(sampler).get(key)
        if graph is not None and not graph.holds_sampler_state():
            graph = None  # set_timesteps ran since the capture: the graph reads tensors the sampler dropped
    if graph is None:
        sampler.set_timesteps(num_inference_steps, device=device)
        sampler.set_begin_index(0)
    if x_T is None:
        x = _initial_noise(shape, seed, generator, sample_offset, device, dtype) * sampler.init_noise_sigma
    else:
        x = x_T.to(device).clone()  # the loop steps x in place
    if cuda_graph:
        if graph is None:
            graph = _graphs_of(sampler)[key] = _SamplingGraph(model, sampler, x, kwargs, guidance_scale,
                                                             noise_kwargs, options, whole_loop=cuda_graph == "loop")
        return graph.run(x, kwargs, seed, callback, return_trajectory, progress)

    timesteps = sampler.timesteps  # on `device`: each step indexes a view, the loop never reads a value
    trajectory = [x.clone()] if return_trajectory else []
    for i in tqdm(range(len(timesteps)), desc="sampling", disable=not progress, leave=False):
        t = timesteps[i]  # a 0-d view: no sync
        _denoise_step(model, sampler, x, t, kwargs, guidance_scale, noise_kwargs, options)
        if return_trajectory:
            trajectory.append(x.clone())
        if callback is not None:
            callback(i, t, x)
    return (x, trajectory) if return_trajectory else x


# ---- CUDA graphs --------------------------------------------------------------------------------
def _graphs_of(sampler: BaseSampler) -> dict:
    graphs = getattr(sampler, "_cuda_graphs", None)
    if graphs is None:
        graphs = sampler._cuda_graphs = {}
    return graphs


def _tensor_key(value):
    return (tuple(value.shape), value.dtype, value.device) if isinstance(value, torch.Tensor) else value


def _graph_key(model, sampler, steps, shape, dtype, device, kwargs, guidance_scale, noise_kwargs, options,
               mode) -> tuple:
    """What a captured graph bakes in: everything but the values of x_T, the cond tensors and the seed
    (a device buffer the kernels read at replay)."""
    noise = tuple(sorted((k, "device buffer" if k == "seed" else v) for k, v in noise_kwargs.items()))
    return (id(model), mode, steps, tuple(shape), dtype, device, id(sampler.config), guidance_scale,
            tuple(sorted(options.items())), noise, tuple((k, _tensor_key(v)) for k, v in sorted(kwargs.items())))


class _SamplingGraph:
    """The model call + fused step captured in a CUDA graph: one step replayed per step, or the whole loop.

    Why one step per replay by default: capture time and memory do not grow with the number of
    steps, and the progress bar, callback and trajectory behave exactly as in the eager loop. A
    replay costs one launch (a few microseconds) and removes the per-kernel launch overhead that
    dominates small-batch sampling. `whole_loop` captures every step into one graph instead.

    State lives in static device buffers the graph reads (gpt-fast style): `x` (the sample, stepped
    in place by the fused op), the loop's step counter `i` (the graph gathers t = timesteps[i] and
    advances i itself), the cond tensors, and the sampler's own counter and history. Nothing is
    copied per step: the host only calls replay(). A later call with the same setup copies its x_T
    and cond values into the buffers, rewinds the counters and replays the same graph.
    """

    def __init__(self, model, sampler, x_T, kwargs, guidance_scale, noise_kwargs, options, whole_loop: bool):
        with torch.cuda.device(x_T.device):  # capture streams and pools on the sample's GPU, not the current one
            self._capture(model, sampler, x_T, kwargs, guidance_scale, noise_kwargs, options, whole_loop)

    def _capture(self, model, sampler, x_T, kwargs, guidance_scale, noise_kwargs, options, whole_loop: bool):
        self.sampler, self.steps = sampler, len(sampler.timesteps)
        self.x = x_T.clone()
        self.kwargs = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        self.i = torch.zeros(1, dtype=torch.int64, device=x_T.device)
        # The Philox key as a device buffer the kernels read at replay: one graph serves every seed.
        self.seed = N.seed_tensor(noise_kwargs["seed"], x_T.device).clone() if "seed" in noise_kwargs else None
        if self.seed is not None:
            noise_kwargs = {**noise_kwargs, "seed": self.seed}
        timesteps = sampler.timesteps

        def one_step() -> None:
            t = timesteps.index_select(0, self.i).reshape(())
            _denoise_step(model, sampler, self.x, t, self.kwargs, guidance_scale, noise_kwargs, options)
            self.i.add_(1)

        # Warm up on a side stream (first calls compile kernels, fill caches, allocate the sampler's
        # history, pick cuBLAS algorithms; none of that may happen during capture), then capture.
        device = self.x.device
        side = torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):
                one_step()
        torch.cuda.current_stream(device).wait_stream(side)
        self._rewind(x_T)
        self.sampler_state = sampler._engine_state()  # the tensors the graph reads (kept alive here)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            for _ in range(self.steps if whole_loop else 1):
                one_step()
        self.whole_loop = whole_loop

    def holds_sampler_state(self) -> bool:
        """True while the sampler still steps with the tensors this graph captured."""
        return all(a is b for a, b in zip(self.sampler_state, self.sampler._engine_state()))

    def _rewind(self, x_T: torch.Tensor) -> None:
        self.x.copy_(x_T)
        self.i.zero_()
        self.sampler._restart()

    def run(self, x_T, kwargs, seed, callback, return_trajectory, progress) -> torch.Tensor:
        with torch.cuda.device(self.x.device):
            return self._replay(x_T, kwargs, seed, callback, return_trajectory, progress)

    def _replay(self, x_T, kwargs, seed, callback, return_trajectory, progress) -> torch.Tensor:
        self._rewind(x_T)
        if self.seed is not None:
            self.seed.fill_(seed)
        for key, value in kwargs.items():
            if isinstance(value, torch.Tensor):
                self.kwargs[key].copy_(value)
        if self.whole_loop:
            self.graph.replay()
            return self.x.clone()
        trajectory = [self.x.clone()] if return_trajectory else []
        timesteps = self.sampler.timesteps
        for i in tqdm(range(self.steps), desc="sampling (CUDA graph)", disable=not progress, leave=False):
            self.graph.replay()
            if return_trajectory:
                trajectory.append(self.x.clone())
            if callback is not None:
                callback(i, timesteps[i], self.x)
        x = self.x.clone()  # the buffer belongs to the cached graph
        return (x, trajectory) if return_trajectory else x
