"""`python -m fastdiff.demo --smoke`: runs, writes every file, reuses its checkpoint, reports timing."""
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
PIL = pytest.importorskip("PIL.Image")

from fastdiff.demo import timing  # noqa: E402
from fastdiff.demo.cli import main, parse_args  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
FILES = ("samples.png", "reverse_process.gif", "forward_process.png", "loss_curve.png", "timing.md", "model.pt")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """One smoke run as users start it (a subprocess of `python -m fastdiff.demo`)."""
    out = tmp_path_factory.mktemp("demo")
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-m", "fastdiff.demo", "--smoke", "--no-progress", "--out", str(out)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result.stdout


def test_smoke_run_writes_every_file(smoke_run):
    out, stdout = smoke_run
    for name in FILES:
        assert (out / name).stat().st_size > 0, name
        assert name in stdout  # the run says where its files are
    with PIL.open(out / "samples.png") as grid:
        assert grid.size[0] > 100 and grid.size[1] > 20
    with PIL.open(out / "reverse_process.gif") as gif:
        assert gif.n_frames == 5  # x_T and one frame per sampling step (--smoke: 4 steps)
    assert "training 20 steps" in stdout


def expected_rows(device: torch.device, with_diffusers: bool) -> list[str]:
    """The timing table's rows (method prefixes) on `device`: a GPU adds the CUDA-graph row."""
    rows = ["diffusers "] if with_diffusers else []
    rows += ["fastdiff, eager reference backend", "fastdiff, default backend"]
    if device.type == "cuda":
        rows.append("fastdiff, ")  # "fastdiff, <backend> + CUDA graph"
    return rows


def table_rows(table: str) -> list[list[str]]:
    """The body rows of a markdown table, as lists of stripped cells."""
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in table.splitlines()
            if line.startswith("| diffusers") or line.startswith("| fastdiff")]


def check_rows(rows: list[list[str]], device: torch.device, with_diffusers: bool) -> None:
    wanted = expected_rows(device, with_diffusers)
    assert len(rows) == len(wanted), (device, [r[0] for r in rows])
    for row, prefix in zip(rows, wanted):
        assert row[0].startswith(prefix), (row[0], prefix)
    if device.type == "cuda":
        assert rows[-1][0].endswith("+ CUDA graph"), rows[-1][0]
    for row in rows:  # rows that compare two runs: same numbers up to fp32 rounding
        if row[3]:
            assert float(row[4]) < 1e-4, row


def test_timing_table_compares_backends_and_diffusers(smoke_run):
    out, stdout = smoke_run
    table = (out / "timing.md").read_text()
    assert "| sampling loop | total (s) |" in table and table.split("\n\n", 1)[1] in stdout
    device = torch.device(re.search(r" on (\S+) \(", table.splitlines()[0]).group(1))  # the device the demo used
    check_rows(table_rows(table), device, importlib.util.find_spec("diffusers") is not None)


@pytest.mark.parametrize("device", ["cpu", "cuda"], ids=["on-cpu", "on-gpu"])  # no `cuda` keyword: runs here
def test_expected_rows_follow_the_device(device, monkeypatch):
    """On a GPU the demo adds a CUDA-graph row (4 rows, not 3): the row check is derived from the device.
    Runs everywhere: the sampling runs are stubbed, only the table's shape is under test."""
    calls = []

    def fake_run_fastdiff(job, backend=None, cuda_graph=False, generator_seed=None):
        calls.append((backend, cuda_graph, generator_seed))
        return torch.zeros(2), 0.5

    monkeypatch.setattr(timing, "run_fastdiff", fake_run_fastdiff)
    monkeypatch.setattr(timing, "run_diffusers", lambda job, generator_seed: (torch.zeros(2), 1.0))
    monkeypatch.setattr(timing, "default_backend", lambda device: "triton" if device.type == "cuda" else "cpp")
    job = timing.SamplingJob(model=None, sampler=type("S", (), {"diffusers_class_name": "DDPMScheduler"})(),
                             shape=(2,), steps=4, seed=0, device=torch.device(device))
    rows, _ = timing.timing_rows(job, include_diffusers=True)
    table = table_rows(timing.markdown_table(rows))
    check_rows(table, torch.device(device), with_diffusers=True)
    assert len(table) == (4 if device == "cuda" else 3)
    assert any(cuda_graph for _, cuda_graph, _ in calls) == (device == "cuda")


def test_second_run_reuses_the_checkpoint(smoke_run, capsys):
    out, _ = smoke_run
    threads = torch.get_num_threads()
    try:
        assert main(["--smoke", "--no-progress", "--no-diffusers", "--out", str(out)]) == 0
        assert "reused checkpoint" in capsys.readouterr().out
        assert main(["--smoke", "--no-progress", "--no-diffusers", "--steps", "3", "--out", str(out)]) == 0
        assert "trained with other settings (train differ)" in capsys.readouterr().out
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("argv,match", [(["--steps", "0"], "--steps must be >= 1"),
                                        (["--guidance-scale", "-1"], "--guidance-scale must be >= 0"),
                                        (["--sampler", "euler"], "invalid choice")])
def test_bad_options_are_refused(argv, match, capsys):
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert match in capsys.readouterr().err
