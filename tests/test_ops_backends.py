"""The op layer: torch.library registration (opcheck) and backend selection."""
import pytest
import torch

import fastdiff
from fastdiff import backends, ops, schedules, tables

ABAR = schedules.alphas_cumprod_from_betas(schedules.make_betas(1000))
DDPM_ROW = tables.ddpm_table(ABAR, list(range(999, -1, -1)), "learned_range")[600]
DDIM_ROW = tables.ddim_table(ABAR, 20, 1.0)[601]


def op_cases():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 4, generator=g)
    m2 = torch.randn(4, 6, 5, 4, generator=g)  # CFG batch with learned-variance channels
    noise = torch.randn(2, 3, 5, 4, generator=g)
    s = torch.tensor([1.5, 2.0])
    return [
        (ops.ddpm_step, (m2, x, DDPM_ROW, None, 5, 0, "v_prediction", "learned_range", 1.0, None, 3.0, True)),
        (ops.ddpm_step, (m2[:2, :3], x, DDPM_ROW, noise, 0, 0, "epsilon", "fixed_small", None, s, None, False)),
        (ops.ddim_step, (m2[:, :3], x, DDIM_ROW, None, 5, 3, "sample", 0.5, True, 1.0, None, 2.0, True)),
        (ops.q_sample, (x, torch.tensor([3, 999]), ABAR, None, 9, 0, True, True)),
        (ops.q_sample, (x, torch.tensor([3, 999]), ABAR, noise, 0, 0, False, False)),
        (ops.cfg_combine, (m2[:2], m2[2:], 7.5)),
    ]


@pytest.mark.parametrize("case", range(6))
def test_opcheck_reference_backend(monkeypatch, case):
    monkeypatch.setenv("FASTDIFF_BACKEND", "reference")
    op, args = op_cases()[case]
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("case", range(6))
def test_opcheck_default_backend(case):
    op, args = op_cases()[case]
    torch.library.opcheck(op, args)


def test_unasked_outputs_are_empty():
    x = torch.randn(2, 3)
    prev, x0 = ops.ddpm_step(x, x, DDPM_ROW, x, 0, 0, "epsilon", "fixed_small", None, None, None, False)
    assert prev.shape == x.shape and x0.shape == (0,)


def test_forced_backend_that_cannot_run_lists_reasons(monkeypatch):
    monkeypatch.setenv("FASTDIFF_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="no backend can run fastdiff.cfg_combine on cpu tensors .*triton: CPU tensors need"):
        backends.select("cfg_combine", torch.zeros(1))


def test_bad_backend_name(monkeypatch):
    monkeypatch.setenv("FASTDIFF_BACKEND", "cuda")
    with pytest.raises(ValueError, match="FASTDIFF_BACKEND must be one of \\('triton', 'cpp', 'reference'\\) .* got 'cuda'"):
        backends.select("ddpm_step", torch.zeros(1))


def test_default_cpu_order_and_report(monkeypatch, capsys):
    monkeypatch.delenv("FASTDIFF_BACKEND", raising=False)
    chosen = backends.select("ddpm_step", torch.zeros(1)).__name__
    expected = "fastdiff._cpp" if backends.unavailable_reason("cpp", "cpu") is None else "fastdiff.eager"
    assert chosen == expected
    text = fastdiff.backends()
    assert "cpu   reference  available" in capsys.readouterr().out and "cuda" in text


def test_float64_skips_triton(monkeypatch):
    monkeypatch.setenv("FASTDIFF_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="triton: the Triton kernels store fp32/fp16/bf16 only"):
        backends.select("ddpm_step", torch.zeros(1, dtype=torch.float64))
    assert backends.unavailable_reason("triton", "cuda", torch.float64) is not None
