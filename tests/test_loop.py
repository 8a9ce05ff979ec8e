"""fastdiff.loop.sample: equals a hand-written loop over sampler.step, CFG, trajectory, errors, CUDA graphs."""
import time

import pytest
import torch

import fastdiff
from fastdiff import noise as N
from fastdiff.loop import sample
from fastdiff.noise import STREAM_INITIAL_NOISE

SHAPE = (3, 2, 5, 6)
STEPS = 8


class TinyDenoiser(torch.nn.Module):
    """A conv net with a timestep and an optional class-label input: enough to make the loop non-trivial."""

    def __init__(self, channels: int = 2, num_labels: int = 4):
        super().__init__()
        torch.manual_seed(0)
        self.conv_in = torch.nn.Conv2d(channels, 8, 3, padding=1)
        self.conv_out = torch.nn.Conv2d(8, channels, 3, padding=1)
        self.label_embedding = torch.nn.Embedding(num_labels, 8)
        self.calls = []  # batch size of every call

    def forward(self, x, t, labels=None):
        self.calls.append(x.shape[0])
        h = self.conv_in(x) + torch.sin(t.float() / 100.0)[:, None, None, None]
        if labels is not None:
            h = h + self.label_embedding(labels)[:, :, None, None]
        return self.conv_out(torch.tanh(h))


def make_sampler(kind: str):
    cls = {"ddpm": fastdiff.DDPMSampler, "ddim": fastdiff.DDIMSampler}[kind]
    return cls(num_train_timesteps=100)


def manual_loop(model, sampler, x, steps, eta=None, **noise):
    """The loop a user writes by hand: the oracle for sample()."""
    sampler.set_timesteps(steps)
    options = {} if eta is None else {"eta": eta}
    for t in sampler.timesteps:
        out = model(x, t.expand(x.shape[0]))
        x = sampler.step(out, t, x, **options, **noise).prev_sample
    return x


@pytest.mark.parametrize("kind,eta", [("ddpm", None), ("ddim", 0.0), ("ddim", 0.7)])
def test_seeded_loop_equals_manual_loop(kind, eta):
    model = TinyDenoiser()
    x_T = N.randn(SHAPE, 11, stream=STREAM_INITIAL_NOISE)
    expected = manual_loop(model, make_sampler(kind), x_T, STEPS, eta=eta, seed=11)
    got = sample(model, make_sampler(kind), SHAPE, num_inference_steps=STEPS, seed=11, eta=eta or 0.0,
                 progress=False)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    assert got.abs().max() > 0.1  # a real sample, not zeros


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_generator_loop_equals_manual_loop_with_diffusers_draws(kind):
    model = TinyDenoiser()
    g = torch.Generator().manual_seed(5)
    x_T = torch.randn(SHAPE, generator=g)  # diffusers' randn_tensor with a CPU generator
    eta = 1.0 if kind == "ddim" else None
    expected = manual_loop(model, make_sampler(kind), x_T, STEPS, eta=eta, generator=g)
    got = sample(model, make_sampler(kind), SHAPE, num_inference_steps=STEPS, eta=eta or 0.0,
                 generator=torch.Generator().manual_seed(5), progress=False)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_generator_loop_matches_diffusers_scheduler_loop():
    from diffusers import DDPMScheduler
    model = TinyDenoiser()
    scheduler = DDPMScheduler(num_train_timesteps=100)
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.double()  # see test_diffusers_pipelines: exact in fp64
    scheduler.one = torch.tensor(1.0, dtype=torch.float64)
    scheduler.set_timesteps(STEPS)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(SHAPE, generator=g)
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t.expand(SHAPE[0])), t, x, generator=g).prev_sample
    got = sample(model, make_sampler("ddpm"), SHAPE, num_inference_steps=STEPS,
                 generator=torch.Generator().manual_seed(3), progress=False)
    torch.testing.assert_close(got, x.float(), atol=1e-5, rtol=1e-5)


def test_x_T_given_is_used_and_not_modified():
    model, x_T = TinyDenoiser(), torch.randn(SHAPE)
    keep = x_T.clone()
    got = sample(model, make_sampler("ddim"), x_T=x_T, num_inference_steps=STEPS, progress=False)
    torch.testing.assert_close(got, manual_loop(model, make_sampler("ddim"), x_T, STEPS), atol=0, rtol=0)
    assert torch.equal(x_T, keep)


def test_cfg_is_one_batched_call_and_equals_manual_guidance():
    model, w = TinyDenoiser(), 3.5
    labels, null = torch.tensor([0, 1, 2]), torch.full((3,), 3)
    got = sample(model, make_sampler("ddpm"), SHAPE, num_inference_steps=STEPS, seed=2, guidance_scale=w,
                 cond={"labels": labels}, uncond={"labels": null}, progress=False)
    assert model.calls == [2 * SHAPE[0]] * STEPS  # one call on [x; x] per step

    sampler = make_sampler("ddpm")
    sampler.set_timesteps(STEPS)
    x = N.randn(SHAPE, 2, stream=STREAM_INITIAL_NOISE)
    for t in sampler.timesteps:
        tt = t.expand(SHAPE[0])
        u, c = model(x, tt, labels=null), model(x, tt, labels=labels)
        x = sampler.step(u + w * (c - u), t, x, seed=2).prev_sample  # CFG, Ho & Salimans eq. 6
    torch.testing.assert_close(got, x, atol=1e-6, rtol=1e-5)


def test_cond_without_guidance_is_passed_to_the_model():
    model, labels = TinyDenoiser(), torch.tensor([1, 1, 2])
    got = sample(model, make_sampler("ddim"), SHAPE, num_inference_steps=STEPS, seed=4, cond={"labels": labels},
                 progress=False)
    unconditional = sample(model, make_sampler("ddim"), SHAPE, num_inference_steps=STEPS, seed=4, progress=False)
    assert model.calls == [SHAPE[0]] * (2 * STEPS)
    assert not torch.allclose(got, unconditional)


def test_trajectory_and_callback():
    model, seen = TinyDenoiser(), []
    sampler = make_sampler("ddpm")
    x, trajectory = sample(model, sampler, SHAPE, num_inference_steps=STEPS, seed=1, return_trajectory=True,
                           callback=lambda i, t, x: seen.append((i, int(t), x.clone())), progress=False)
    assert len(trajectory) == STEPS + 1
    torch.testing.assert_close(trajectory[0], N.randn(SHAPE, 1, stream=STREAM_INITIAL_NOISE), atol=0, rtol=0)
    assert torch.equal(trajectory[-1], x)
    assert [i for i, _, _ in seen] == list(range(STEPS))
    assert [t for _, t, _ in seen] == sampler.timesteps.tolist()
    for i, _, xi in seen:
        assert torch.equal(xi, trajectory[i + 1])


def test_progress_bar_can_be_turned_off(capfd):
    model = TinyDenoiser()
    sample(model, make_sampler("ddim"), SHAPE, num_inference_steps=STEPS, seed=0, progress=True)
    assert "sampling" in capfd.readouterr().err
    sample(model, make_sampler("ddim"), SHAPE, num_inference_steps=STEPS, seed=0, progress=False)
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""


def test_seeded_samples_do_not_depend_on_the_batch_split():
    model = TinyDenoiser()
    whole = sample(model, make_sampler("ddpm"), (4, 2, 5, 6), num_inference_steps=STEPS, seed=9, progress=False)
    tail = sample(model, make_sampler("ddpm"), (2, 2, 5, 6), num_inference_steps=STEPS, seed=9, sample_offset=2,
                  progress=False)
    torch.testing.assert_close(whole[2:], tail, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(whole[:2], tail)


def test_default_noise_follows_torch_manual_seed():
    model = TinyDenoiser()
    torch.manual_seed(123)
    a = sample(model, make_sampler("ddpm"), SHAPE, num_inference_steps=STEPS, progress=False)
    torch.manual_seed(123)
    b = sample(model, make_sampler("ddpm"), SHAPE, num_inference_steps=STEPS, progress=False)
    c = sample(model, make_sampler("ddpm"), SHAPE, num_inference_steps=STEPS, progress=False)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_model_output_objects_and_tuples_are_accepted():
    model = TinyDenoiser()

    class Output:
        def __init__(self, sample):
            self.sample = sample

    expected = sample(model, make_sampler("ddim"), SHAPE, num_inference_steps=4, seed=0, progress=False)
    for wrap in (lambda y: Output(y), lambda y: (y,)):
        got = sample(lambda x, t: wrap(model(x, t)), make_sampler("ddim"), SHAPE, num_inference_steps=4, seed=0,
                     progress=False)
        assert torch.equal(got, expected)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(seed=1, generator=torch.Generator()), ValueError, "at most one of seed"),
    (dict(shape=None), ValueError, "pass shape"),
    (dict(shape=(3,)), ValueError, "at least 2 positive ints"),
    (dict(shape=(0, 2, 5, 6)), ValueError, "positive ints"),
    (dict(x_T=torch.zeros(2, 2, 5, 6)), ValueError, "does not match x_T"),
    (dict(x_T=torch.zeros(SHAPE, dtype=torch.int64), shape=None), TypeError, "floating-point"),
    (dict(cuda_graph=True), ValueError, "cuda_graph=True needs a CUDA device"),
    (dict(cuda_graph=True, generator=torch.Generator(), device="cuda"), ValueError, "needs seed="),
    (dict(guidance_scale=2.0, cond={"labels": torch.zeros(3, dtype=torch.long)}), ValueError, "needs both cond"),
    (dict(uncond={"labels": torch.zeros(3, dtype=torch.long)}), ValueError, "only used with guidance_scale"),
    (dict(cond={"labels": torch.zeros(2, dtype=torch.long)}), ValueError, r"cond\['labels'\] must have batch 3"),
    (dict(eta=0.5), ValueError, "eta=0.5 is only used"),
    (dict(seed=-1), ValueError, "seed must be"),
    (dict(sample_offset=-2), ValueError, "sample_offset must be"),
    (dict(num_inference_steps=0), ValueError, "num_inference_steps"),
])
def test_errors_name_the_argument(kwargs, error, match):
    args = dict(shape=SHAPE, num_inference_steps=STEPS, progress=False) | kwargs
    shape = args.pop("shape")
    with pytest.raises(error, match=match):
        sample(TinyDenoiser(), make_sampler("ddpm"), shape, **args)


def test_a_diffusers_scheduler_is_refused_with_a_hint():
    from diffusers import DDPMScheduler
    with pytest.raises(TypeError, match="from_config"):
        sample(TinyDenoiser(), DDPMScheduler(), SHAPE, progress=False)


# ---- CUDA ------------------------------------------------------------------------------------
class TimedDenoiser(torch.nn.Module):
    """A small conv denoiser (a few 3x3 convs at 32x32): launch overhead is most of its time."""

    def __init__(self, channels=3, width=64):
        super().__init__()
        torch.manual_seed(0)
        self.time = torch.nn.Linear(1, width)
        self.inp = torch.nn.Conv2d(channels, width, 3, padding=1)
        self.mid = torch.nn.ModuleList(torch.nn.Conv2d(width, width, 3, padding=1) for _ in range(3))
        self.out = torch.nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, x, t):
        h = self.inp(x) + self.time(t.float()[:, None] / 1000)[:, :, None, None]
        for conv in self.mid:
            h = h + torch.nn.functional.silu(conv(h))
        return self.out(h)


@pytest.mark.cuda
@pytest.mark.parametrize("kind,eta,cfg", [("ddpm", 0.0, False), ("ddim", 0.0, False), ("ddim", 1.0, True)])
def test_cuda_graph_loop_equals_eager_loop(kind, eta, cfg):
    model = TinyDenoiser().cuda()
    shape = (4, 2, 16, 16)
    guidance = dict(guidance_scale=2.0, cond={"labels": torch.tensor([0, 1, 2, 0])},
                    uncond={"labels": torch.full((4,), 3)}) if cfg else {}
    args = dict(num_inference_steps=20, seed=7, eta=eta, device="cuda", progress=False, **guidance)
    eager, eager_path = sample(model, make_sampler(kind), shape, return_trajectory=True, **args)
    graph, graph_path = sample(model, make_sampler(kind), shape, return_trajectory=True, cuda_graph=True, **args)
    torch.testing.assert_close(graph, eager, atol=0, rtol=0)
    for a, b in zip(graph_path, eager_path):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.cuda
@pytest.mark.parametrize("batch", [1, 64])
def test_cuda_graph_timing(batch):
    model = TimedDenoiser().cuda()
    shape, steps = (batch, 3, 32, 32), 50

    def timed(cuda_graph):
        sample(model, fastdiff.DDIMSampler(), shape, num_inference_steps=steps, seed=0, device="cuda",
               cuda_graph=cuda_graph, progress=False)  # warm-up (kernels, allocator)
        torch.cuda.synchronize()
        start = time.perf_counter()
        x = sample(model, fastdiff.DDIMSampler(), shape, num_inference_steps=steps, seed=0, device="cuda",
                   cuda_graph=cuda_graph, progress=False)
        torch.cuda.synchronize()
        return time.perf_counter() - start, x

    eager_s, eager_x = timed(False)
    graph_s, graph_x = timed(True)
    torch.testing.assert_close(graph_x, eager_x, atol=0, rtol=0)
    print(f"\nDDIM {steps} steps, batch {batch}, {torch.cuda.get_device_name()}: eager {eager_s * 1e3:.1f} ms, "
          f"CUDA graph {graph_s * 1e3:.1f} ms (incl. capture), speed-up {eager_s / graph_s:.2f}x")


@pytest.mark.cuda
@pytest.mark.parametrize("kind,eta,cfg", [("ddpm", 0.0, False), ("ddim", 1.0, True)])
def test_whole_loop_graph_equals_eager_loop(kind, eta, cfg):
    """cuda_graph="loop" (every step in one captured graph) gives the eager loop's sample bit for bit."""
    model = TinyDenoiser().cuda()
    shape = (4, 2, 16, 16)
    guidance = dict(guidance_scale=2.0, cond={"labels": torch.tensor([0, 1, 2, 0])},
                    uncond={"labels": torch.full((4,), 3)}) if cfg else {}
    args = dict(num_inference_steps=20, seed=7, eta=eta, device="cuda", progress=False, **guidance)
    eager = sample(model, make_sampler(kind), shape, **args)
    graph = sample(model, make_sampler(kind), shape, cuda_graph="loop", **args)
    torch.testing.assert_close(graph, eager, atol=0, rtol=0)


class CaptureCounter:
    """Patches torch.cuda.CUDAGraph with a subclass that counts capture_begin calls."""

    def __init__(self, monkeypatch):
        self.captures = 0
        counter = self

        class CountingGraph(torch.cuda.CUDAGraph):
            def capture_begin(self, *args, **kwargs):
                counter.captures += 1
                return super().capture_begin(*args, **kwargs)

        monkeypatch.setattr(torch.cuda, "CUDAGraph", CountingGraph)


@pytest.mark.cuda
@pytest.mark.parametrize("mode", [True, "loop"], ids=["graph-step", "graph-loop"])
def test_graph_is_captured_once_per_setup(monkeypatch, mode):
    """A second sample(cuda_graph=...) call with the same setup replays the cached graph (no new capture,
    same result); a new x_T value and a new seed are copied into the graph's device buffers (no new capture)."""
    counter = CaptureCounter(monkeypatch)
    model, sampler, shape = TinyDenoiser().cuda(), make_sampler("ddim"), (2, 2, 8, 8)
    args = dict(num_inference_steps=8, seed=5, eta=1.0, device="cuda", progress=False, cuda_graph=mode)
    first = sample(model, sampler, shape, **args)
    assert counter.captures == 1
    second = sample(model, sampler, shape, **args)
    assert counter.captures == 1, "the second call with the same setup captured again"
    assert torch.equal(first, second)
    x_T = torch.randn(shape, device="cuda")
    given = sample(model, sampler, x_T=x_T, **args)
    assert counter.captures == 1  # x_T's value is not part of the setup
    eager = sample(model, make_sampler("ddim"), x_T=x_T, **{**args, "cuda_graph": False})
    torch.testing.assert_close(given, eager, atol=0, rtol=0)
    reseeded = sample(model, sampler, shape, **{**args, "seed": 6})
    assert counter.captures == 1  # the seed is a device buffer the kernels read at replay
    assert not torch.equal(reseeded, first)
    eager = sample(model, make_sampler("ddim"), shape, **{**args, "seed": 6, "cuda_graph": False})
    torch.testing.assert_close(reseeded, eager, atol=0, rtol=0)


@pytest.mark.cuda
@pytest.mark.parametrize("mode", [True, "loop"], ids=["graph-step", "graph-loop"])
def test_graph_on_a_device_that_is_not_current(mode):
    """The graph must be captured on the sample's device, not the current one: sample on cuda:1 while
    cuda:0 is current equals the eager loop on cuda:1, and the current device is left alone."""
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 GPUs to put the sample on a device that is not current; this machine has "
                    f"{torch.cuda.device_count()} (a graph captured on the current device would break on cuda:1)")
    model = TinyDenoiser().to("cuda:1")
    args = dict(num_inference_steps=8, seed=3, device="cuda:1", progress=False)
    with torch.cuda.device(0):
        eager = sample(model, make_sampler("ddpm"), (2, 2, 8, 8), **args)
        graph = sample(model, make_sampler("ddpm"), (2, 2, 8, 8), cuda_graph=mode, **args)
        assert torch.cuda.current_device() == 0
    assert graph.device == torch.device("cuda:1")
    torch.testing.assert_close(graph, eager, atol=0, rtol=0)
