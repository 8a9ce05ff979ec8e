"""`python -m fastdiff.demo --smoke`: runs, writes every file, reuses its checkpoint, reports timing."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
PIL = pytest.importorskip("PIL.Image")

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


def test_timing_table_compares_backends_and_diffusers(smoke_run):
    out, stdout = smoke_run
    table = (out / "timing.md").read_text()
    assert "| sampling loop | total (s) |" in table and table.split("\n\n", 1)[1] in stdout
    rows = [line for line in table.splitlines() if line.startswith("| diffusers") or line.startswith("| fastdiff")]
    assert len(rows) == 3, table
    for row in rows[:1] + rows[2:]:  # rows that compare two runs: same numbers up to fp32 rounding
        assert float(row.rstrip(" |").rsplit("|", 1)[1]) < 1e-4, row


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
