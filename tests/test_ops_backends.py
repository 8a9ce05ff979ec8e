"""The op layer: torch.library registration (opcheck), the eager fast path (same bits as the op), and
backend selection."""
import pytest
import torch

import fastdiff
from fastdiff import backends, ops, tables

TABLE = tables.step_table(3, x0_x=1.0, x0_m=-0.5, x0_scale=1.25, out_x=0.9, out_m=0.1, out_x0=0.2, noise_std=0.3,
                          out_h1=0.05, out2_x0=1.0, hist_x0=1.0, read_slot1=0.0, hist_slot=1.0, out2_slot=2.0,
                          var_bias=-1.0, var_slope=0.25)
Q_TABLE = tables.q_sample_table(torch.tensor([0.9, 0.5]), torch.tensor([0.4, 0.8]), torch.tensor([0.0, -1.0]),
                                torch.tensor([1.0, 1.0]))


def step_args(**overrides):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 4, generator=g)
    args = dict(model_output=torch.randn(4, 6, 5, 4, generator=g), sample=x, table=TABLE,
                index=torch.tensor([1]), history=torch.randn(3, 2, 3, 5, 4, generator=g), noise=None, seed=5,
                sample_offset=3, guidance_scale=3.0, guidance_extra=None, extra_scale=0.0, variance=tables.VAR_EXP,
                clip_range=1.0, threshold=None, history_reads=1, write_history=True, write_out2=True, advance=True,
                write_x0=True)
    return args | overrides


def step_cases():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 5, 4, generator=g)
    return [
        step_args(),
        step_args(model_output=torch.randn(2, 3, 5, 4, generator=g), guidance_scale=None, variance=tables.VAR_FIXED,
                  noise=torch.randn(2, 3, 5, 4, generator=g), threshold=torch.tensor([1.5, 2.0]), clip_range=None,
                  history_reads=0, write_history=False, write_out2=False, advance=False, write_x0=False),
        step_args(guidance_extra=torch.randn(2, 6, 5, 4, generator=g), extra_scale=0.5, seed=None,
                  variance=tables.VAR_FIXED, history=x.new_empty(0), history_reads=0, write_history=False,
                  write_out2=False),
    ]


def q_cases():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 5, 4, generator=g)
    return [(x, Q_TABLE, torch.tensor([1, 0]), None, 9, 4, True, True),
            (x, Q_TABLE, torch.tensor([0, 1]), torch.randn(2, 3, 5, 4, generator=g), 0, 0, False, False)]


@pytest.fixture(params=["reference", "default"])
def backend(request, monkeypatch):
    if request.param == "reference":
        monkeypatch.setenv("FASTDIFF_BACKEND", "reference")
    return request.param


def op_args(args: dict) -> tuple:
    """The registered op's arguments: it never advances the index (run_step does) and takes the seed as
    the int64 [1] tensor the kernels read (run_step makes it from an int)."""
    args = dict(args)
    if args["seed"] is not None:
        args["seed"] = None if args["noise"] is not None else fastdiff.noise.seed_tensor(args["seed"], "cpu")
    return tuple(v for k, v in args.items() if k != "advance")


@pytest.mark.parametrize("case", range(3))
def test_opcheck_step(backend, case):
    torch.library.opcheck(ops.step, op_args(step_cases()[case]))


@pytest.mark.parametrize("case", range(2))
def test_opcheck_q_sample_and_cfg(backend, case):
    torch.library.opcheck(ops.q_sample, q_cases()[case])
    x = torch.randn(2, 3)
    torch.library.opcheck(ops.cfg_combine, (x, x * 2, 7.5))


@pytest.mark.parametrize("case", range(3))
def test_fast_path_equals_the_registered_op(backend, case):
    """run_step (straight to the backend) and torch.ops.fastdiff.step give the same bits and the same state."""
    results = []
    for traced in (False, True):
        args = step_cases()[case]
        if traced:
            prev, x0 = torch.ops.fastdiff.step(*op_args(args))
            args["index"] += int(args["advance"])
        else:
            prev, x0 = ops.run_step(*args.values())
        results.append((prev, x0, args["index"], args["history"]))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_fast_path_writes_into_out_in_place():
    args = step_cases()[0]
    want = ops.run_step(*step_cases()[0].values())[0]
    sample = args["sample"]
    prev, _ = ops.run_step(*args.values(), out=sample)
    assert prev is sample and torch.equal(sample, want)


def test_index_advances_and_history_is_written():
    args = step_cases()[0]
    before = args["history"].clone()
    ops.run_step(*args.values())
    assert args["index"].tolist() == [2]
    assert torch.equal(args["history"][0], before[0])  # slot 0 is only read
    assert not torch.equal(args["history"][1], before[1]) and not torch.equal(args["history"][2], before[2])


def test_unasked_outputs_are_empty():
    prev, x0 = ops.run_step(*step_args(write_x0=False).values())
    assert prev.shape == (2, 3, 5, 4) and x0.shape == (0,)


def test_forced_backend_that_cannot_run_lists_reasons(monkeypatch):
    monkeypatch.setenv("FASTDIFF_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    backends._select.cache_clear()
    with pytest.raises(RuntimeError, match="no backend can run fastdiff.cfg_combine on cpu tensors .*triton: CPU tensors need"):
        backends.select("cfg_combine", torch.zeros(1))
    backends._select.cache_clear()


def test_bad_backend_name(monkeypatch):
    monkeypatch.setenv("FASTDIFF_BACKEND", "cuda")
    with pytest.raises(ValueError, match="FASTDIFF_BACKEND must be one of \\('triton', 'cpp', 'reference'\\) .* got 'cuda'"):
        backends.select("step", torch.zeros(1))


def test_default_cpu_order_and_report(monkeypatch, capsys):
    monkeypatch.delenv("FASTDIFF_BACKEND", raising=False)
    chosen = backends.select("step", torch.zeros(1)).__name__
    expected = "fastdiff._cpp" if backends.unavailable_reason("cpp", "cpu") is None else "fastdiff.eager"
    assert chosen == expected
    text = fastdiff.backends()
    assert "cpu   reference  available" in capsys.readouterr().out and "cuda" in text


def test_selection_follows_the_environment(monkeypatch):
    """Cached per FASTDIFF_BACKEND value: forcing a backend takes effect at the next call."""
    with backends.forced("reference"):
        assert backends.select("step", torch.zeros(1)).__name__ == "fastdiff.eager"
    monkeypatch.setenv("FASTDIFF_BACKEND", "reference")
    assert backends.select("q_sample", torch.zeros(1)).__name__ == "fastdiff.eager"


def test_float64_skips_triton(monkeypatch):
    monkeypatch.setenv("FASTDIFF_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="triton: the Triton kernels store fp32/fp16/bf16 only"):
        backends.select("step", torch.zeros(1, dtype=torch.float64))
    assert backends.unavailable_reason("triton", "cuda", torch.float64) is not None


@pytest.mark.parametrize("op", ["step", "q_sample", "cfg_combine"])
@pytest.mark.parametrize("name", ["cpp", "triton"])
def test_every_backend_has_the_engine_signature(name, op):
    """fastdiff.ops calls every backend the same way: the reference backend's parameter names (the GPU
    benchmark refused Triton's cfg_combine while it took an extra `out=`)."""
    from benchmarks import cases
    reason = backends.unavailable_reason("cpp", torch.device("cpu")) if name == "cpp" else None
    if reason:
        pytest.skip(f"the C++ backend is unavailable: {reason}")
    assert cases.engine_signature_reason(name, op) is None  # triton imports (compiling nothing) without a GPU
