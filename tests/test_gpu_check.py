"""`make gpu-check` (benchmarks/gpu_check.py) and its timing code, exercised on the CPU.

No GPU here: the refusal is tested for real; the CUDA-event timing, the L2 rotation, the bandwidth
math and the backend-order rule run against stubs with known answers; the whole pipeline (ops,
end-to-end loops, profile, results files, doc block, summary) runs as a CPU dry run on tiny sizes.
"""
import json
import os
import pathlib
import subprocess
import sys
import time

import pytest
import torch

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks import gpu_check as G  # noqa: E402
from benchmarks import timing as TM  # noqa: E402

ENV = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONUNBUFFERED="1")


# ---- the refusal ---------------------------------------------------------------------------------
needs_no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: gpu-check would run")


@needs_no_gpu
def test_refuses_without_a_gpu_in_one_line_at_once():
    start = time.monotonic()
    result = subprocess.run([sys.executable, "benchmarks/gpu_check.py"], cwd=REPO, env=ENV, capture_output=True,
                            text=True, timeout=120)
    elapsed = time.monotonic() - start
    assert result.returncode == G.NO_GPU_EXIT, result
    lines = result.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu-check: no NVIDIA GPU here:"), result.stdout
    assert result.stderr == ""
    assert elapsed < 30, f"took {elapsed:.1f} s"


@needs_no_gpu
def test_make_gpu_check_fails_without_a_gpu():
    result = subprocess.run(["make", "-s", "gpu-check"], cwd=REPO, env=ENV, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode != 0
    assert "gpu-check: no NVIDIA GPU here:" in result.stdout


def test_no_device_node_answers_before_importing_torch(monkeypatch):
    monkeypatch.setattr(G.shutil, "which", lambda name: None)
    reason = G.no_gpu_reason(nodes=("/nonexistent/nvidiactl",))
    assert "no NVIDIA device node" in reason


@needs_no_gpu
def test_no_gpu_reason_names_the_torch_build(monkeypatch):
    reason = G.no_gpu_reason(nodes=(str(REPO),))  # a node that exists: the torch check decides
    assert "torch.cuda.is_available() is False" in reason


# ---- timing on stub clocks ------------------------------------------------------------------------
class FakeDevice:
    """A device clock advanced by the calls; events read it; syncs are counted with the clock time."""

    def __init__(self):
        self.now, self.syncs, self.order = 0.0, [], []

    def call(self, tag, seconds):
        def run():
            self.order.append(tag)
            self.now += seconds
        return run

    def event(self):
        device = self

        class Event:
            def record(self):
                self.t = device.now

            def synchronize(self):
                device.syncs.append(("event", device.now))

            def elapsed_time(self, end):
                return (end.t - self.t) * 1e3  # ms, as torch.cuda.Event
        return Event()

    def synchronize(self):
        self.syncs.append(("device", self.now))


def test_back_to_back_events_rotate_sets_and_never_sync_inside_a_window():
    dev = FakeDevice()
    calls = [dev.call("a", 1e-6), dev.call("b", 3e-6)]
    timing = TM.time_back_to_back(calls, launches=10, repeats=4, warmup=2, new_event=dev.event,
                                  synchronize=dev.synchronize)
    assert timing.calls_per_window == 10 and len(timing.per_call_s) == 4
    assert timing.median_s == pytest.approx(2e-6)  # the average over the rotation
    assert dev.order == ["a", "b"] * 21  # warm-up then every window keeps rotating
    assert [kind for kind, _ in dev.syncs] == ["device"] + ["event"] * 4  # one wait per window, after it closes
    assert dev.syncs[1][1] == pytest.approx(2e-6 * 2 + 10 * 2e-6)  # the first wait comes at the window's end


def test_graph_time_is_per_call_in_the_graph():
    dev = FakeDevice()
    replay = dev.call("graph", 40e-6)  # a graph of 20 calls of 2 us
    timing = TM.time_graph(lambda: replay, 20, repeats=3, new_event=dev.event, synchronize=dev.synchronize)
    assert timing.median_s == pytest.approx(2e-6) and timing.calls_per_window == 20


def test_host_time_syncs_only_between_windows():
    ticks = iter(range(1000))
    events = []

    def clock():
        t = next(ticks) * 1e-3
        events.append(("clock", t))
        return t

    timing = TM.host_time_per_call(lambda: events.append(("call", None)), calls=5, repeats=3, warmup=1, clock=clock,
                                   synchronize=lambda: events.append(("sync", None)))
    kinds = [k for k, _ in events]
    windows = [i for i, k in enumerate(kinds) if k == "clock"]
    for start, end in zip(windows[::2], windows[1::2]):
        assert "sync" not in kinds[start:end] and kinds[start + 1:end].count("call") == 5
    assert timing.median_s == pytest.approx(1e-3 / 5)


def test_interleaved_host_times_alternate_providers():
    seen = []
    clock_value = [0.0]

    def make(name, cost):
        def call():
            seen.append(name)
            clock_value[0] += cost
        return call

    timings = TM.interleaved_host_times({"a": make("a", 1.0), "b": make("b", 3.0)}, calls_per_window=2, rounds=3,
                                        warmup=1, clock=lambda: clock_value[0])
    assert seen == ["a", "b"] + ["a", "a", "b", "b"] * 3
    assert timings["a"].median_s == 1.0 and timings["b"].median_s == 3.0


def test_low_precision_check_allows_one_rounding_of_an_exactly_copied_output():
    """q_sample's bf16 noise target: the reference copies the noise exactly (its own bf16 error is 0), the
    GPU kernel's float32 normal is a few float32 ulp off and may round to the neighbouring bf16 value."""
    from benchmarks import cases as C
    noise32 = torch.tensor([1.0, -1.5, 3.0, 0.25])
    noise = noise32.to(torch.bfloat16)
    one_ulp = torch.tensor([2**-7, 2**-7, 2**-6, 2**-9])  # bf16 spacing at each value
    C.assert_matches(noise + one_ulp.to(torch.bfloat16), noise.float(), noise, "target")
    with pytest.raises(AssertionError, match="exceeds"):
        C.assert_matches(noise + (3 * one_ulp).to(torch.bfloat16), noise.float(), noise, "target")


# ---- bandwidth math with known numbers -----------------------------------------------------------
def test_bandwidth_math():
    assert TM.gbps(3e9, 1.0) == pytest.approx(3.0)
    assert TM.gbps(3e6, 1e-3) == pytest.approx(3.0)
    assert TM.pct_of(1500.0, 3000.0) == pytest.approx(50.0)
    assert TM.copy_gbps_from_time(2**30, 1e-3) == pytest.approx(2 * 2**30 / 1e-3 / 1e9)  # read + write
    assert TM.floor_seconds(3e9, 3000.0) == pytest.approx(1e-3)
    with pytest.raises(ValueError):
        TM.gbps(1.0, 0.0)
    with pytest.raises(ValueError):
        TM.pct_of(1.0, 0.0)


@pytest.mark.parametrize("bytes_per_set,l2", [(3 * 2**16, 50 * 2**20), (4 * 2**20 * 3, 60 * 2**20),
                                              (400 * 2**20, 50 * 2**20), (2**20, 0)])
def test_rotation_covers_twice_the_l2(bytes_per_set, l2):
    sets = TM.rotation_sets(bytes_per_set, l2)
    assert sets >= 2 and TM.rotation_covers_l2(sets, bytes_per_set, l2)
    if sets > 2:  # the smallest such count
        assert not TM.rotation_covers_l2(sets - 1, bytes_per_set, l2)


def test_rotation_cap_is_reported_not_hidden():
    sets = TM.rotation_sets(16, 50 * 2**20, max_sets=100)
    assert sets == 100 and not TM.rotation_covers_l2(sets, 16, 50 * 2**20)


def test_copy_bandwidth_from_stub_events():
    class OneMs:
        def record(self):
            pass

        def synchronize(self):
            pass

        def elapsed_time(self, end):
            return 1.0
    gbps = TM.measure_copy_gbps("cpu", nbytes=4 * 2**20, new_event=OneMs, synchronize=lambda: None)
    assert gbps == pytest.approx(2 * 4 * 2**20 / 1e-3 / 1e9)


def test_measure_on_cpu_reports_every_time_with_its_bandwidth():
    from benchmarks import cases as C
    from benchmarks import measure as M
    info = M.DeviceInfo("cpu", "test cpu", 1 << 20, 10.0, TM.HostEvent, lambda: None)
    case = C.OpCase("step/ddim", "sd-latent", "fp32", "cpu", shape=(1, 4, 8, 8))
    record = M.measure(case, "eager", info, quick=True)
    assert record["bytes_moved"] == 3 * 256 * 4
    assert record["kernel_s"] is None and "need a GPU" in record["kernel_note"]
    assert record["median_s"] == record["stream_s"] > 0 and record["host_s"] > 0
    assert record["pct_copy_bw"] == pytest.approx(100 * record["gbps"] / 10.0)
    assert record["stream_pct_copy"] == pytest.approx(record["pct_copy_bw"])


def test_measure_gpu_branch_rotates_past_l2_and_times_the_graph():
    """The GPU branch of measure() on CPU tensors, with host-clock events and a stub graph capture."""
    from benchmarks import cases as C
    from benchmarks import measure as M
    captured = []

    def fake_capture(calls, count, device):
        captured.append((len(calls), count, device))

        def replay():
            for i in range(count):
                calls[i % len(calls)]()
        return replay

    l2 = 64 * 2**10  # a 64 KiB "L2": the 3 KiB sets must rotate through more than 128 KiB
    info = M.DeviceInfo("cuda", "stub GPU", l2, 100.0, TM.HostEvent, lambda: None, capture=fake_capture)
    case = C.OpCase("step/multistep", "sd-latent", "fp32", "cpu", shape=(1, 4, 8, 8))
    record = M.measure(case, "eager", info, quick=True)
    sets = record["rotation_sets"]
    assert record["rotation_covers_l2"] and sets * case.bytes_per_set > 2 * l2
    assert captured == [(sets, sets, "cuda")]  # every set in the graph once
    assert record["kernel_s"] > 0 and record["median_s"] == record["kernel_s"] and record["kernel_note"] == ""
    assert record["kernel_pct_copy"] == pytest.approx(100 * record["kernel_gbps"] / 100.0)
    assert record["stream_s"] > 0 and record["host_s"] > 0


def test_measure_reports_a_failed_capture():
    from benchmarks import cases as C
    from benchmarks import measure as M

    def broken_capture(calls, count, device):
        raise RuntimeError("operation not permitted when stream is capturing")

    info = M.DeviceInfo("cuda", "stub GPU", 1 << 20, 100.0, TM.HostEvent, lambda: None, capture=broken_capture)
    record = M.measure(C.OpCase("cfg", "sd-latent", "fp32", "cpu", shape=(1, 4, 8, 8)), "eager", info, quick=True)
    assert record["kernel_s"] is None and "graph capture failed: RuntimeError" in record["kernel_note"]
    assert record["median_s"] == record["stream_s"]


# ---- budgets, junit, backend order ---------------------------------------------------------------
def test_budgets_fit_nine_minutes():
    assert sum(G.BUDGETS.values()) <= G.TOTAL_BUDGET_S < 9 * 60
    assert set(G.BUDGETS) == set(G.PARTS) == {"build", "tests", "ops", "e2e", "profile"}


def test_op_plan_measures_the_backend_order_first():
    plan = G.op_plan(["step/ddpm", "cfg"], ["sd-latent", "video"], ["fp32", "bf16"],
                     ["compile", "diffusers", "eager", "triton", "cpp_cuda"], "cuda")
    providers = [p for p, *_ in plan]
    first_rest = providers.index("compile")
    assert set(providers[:first_rest]) == {"triton", "cpp_cuda", "eager"}  # all of them before any compile
    assert len(plan) == 5 * 2 * 2 * 2 and providers[-1] == "diffusers"
    compiles = [(op, dtype, size) for p, op, dtype, size in plan if p == "compile"]
    assert compiles[:2] == [("step/ddpm", "fp32", "sd-latent"), ("step/ddpm", "fp32", "video")]  # one op at a time


def test_clock_gives_unused_time_to_the_next_part_only():
    now = [0.0]
    clock = G.Clock(100.0, {"a": 30.0, "b": 50.0, "c": 20.0}, now=lambda: now[0])
    assert clock.allowed("a") == 30.0
    now[0] = 10.0  # a finished early: b may use its own 50 s and a's 20 s left, never c's 20 s
    assert clock.allowed("b") == 70.0
    now[0] = 95.0  # b overran: c gets what is left
    assert clock.allowed("c") == 5.0


def test_a_part_past_its_budget_is_killed_and_says_so(tmp_path):
    log = tmp_path / "part.log"
    start = time.monotonic()
    code, seconds, timed_out = G.run_logged([sys.executable, "-c", "import time; print('started', flush=True); "
                                             "time.sleep(30)"], dict(os.environ), start + 1.0, log)
    assert timed_out and code == -9 and seconds < 10
    assert "started" in log.read_text() and "killed at its budget" in log.read_text()
    code, _, timed_out = G.run_logged([sys.executable, "-c", "print('ok')"], dict(os.environ), time.monotonic() + 60,
                                      tmp_path / "ok.log")
    assert code == 0 and not timed_out and "ok" in (tmp_path / "ok.log").read_text()


def test_pytest_command_runs_the_cuda_tests_with_a_report(tmp_path):
    cmd = G.pytest_command(tmp_path / "junit.xml")
    assert cmd[1:5] == ["-m", "pytest", "tests/", "-m"] and cmd[5] == "cuda"
    assert f"--junitxml={tmp_path / 'junit.xml'}" in cmd


def test_progress_counts_of_a_killed_run():
    text = "header line\n..s.F [ 40%]\nsssE.x\nFAILED tests/test_a.py::x - boom\n.. [100%]\n"
    assert G.progress_counts(text) == {"passed": 6, "failed": 1, "errors": 1, "skipped": 4, "xfailed": 1}


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="1" failures="1"
skipped="2" tests="6"><testcase classname="tests.test_a" name="test_ok"/><testcase classname="tests.test_a"
name="test_bad"><failure message="AssertionError: 1 != 2&#10;more">trace</failure></testcase><testcase
classname="tests.test_b" name="test_err"><error message="RuntimeError: boom">trace</error></testcase><testcase
classname="tests.test_b" name="test_skip1"><skipped message="needs 2 GPUs" /></testcase><testcase
classname="tests.test_b" name="test_skip2"><skipped message="needs 2 GPUs" /></testcase><testcase
classname="tests.test_c" name="test_ok2"/></testsuite></testsuites>"""


def test_parse_junit(tmp_path):
    path = tmp_path / "junit.xml"
    path.write_text(JUNIT)
    result = G.parse_junit(path)
    assert result["counts"] == {"tests": 6, "failures": 1, "errors": 1, "skipped": 2, "passed": 2}
    assert result["failed"] == ["tests.test_a::test_bad: AssertionError: 1 != 2", "tests.test_b::test_err: RuntimeError: boom"]
    assert result["skip_reasons"] == {"needs 2 GPUs": 2}


def _fake_gpu_results():
    from benchmarks import cases as C
    rows = []
    timings = {"sd-latent": (10e-6, 6e-6), "batch16-sdxl": (20e-6, 25e-6), "video": (200e-6, 205e-6)}
    for size, (triton, cpp) in timings.items():
        for op in ("step/ddpm", "cfg"):
            for dtype in ("fp32", "bf16"):
                for provider, t in (("triton", triton), ("cpp_cuda", cpp), ("eager", 4 * triton)):
                    numel = 1
                    for s in C.SIZES[size]:
                        numel *= s
                    rows.append({"op": op, "provider": provider, "size": size, "dtype": dtype, "device": "cuda",
                                 "device_name": "Fake GPU", "shape": list(C.SIZES[size]), "numel": numel,
                                 "stream_s": t, "kernel_s": t / 2, "host_s": 5e-6, "median_s": t / 2,
                                 "kernel_gbps": 1000.0, "kernel_pct_copy": 33.0, "stream_gbps": 500.0,
                                 "stream_pct_copy": 16.0, "gbps": 1000.0, "pct_copy_bw": 33.0, "copy_gbps": 3000.0})
    return rows


def test_backend_order_per_size_class_and_size_rule():
    from benchmarks import save_results as S
    order = S.backend_order(_fake_gpu_results())
    classes = order["classes"]
    assert classes["sd-latent"]["default"] == "cpp" and classes["sd-latent"]["cpp_over_triton_stream"] == pytest.approx(0.6)
    assert classes["batch16-sdxl"]["default"] == "triton"  # C++ 25 % slower
    assert classes["video"]["default"] == "cpp"  # C++ 2.5 % slower is inside the tie band: the incumbent stays
    rule = order["size_rule"]
    assert rule["below"] == "cpp" and rule["at_or_above"] == "triton" and not rule["monotonic"]
    assert 16384 < rule["threshold_numel"] < 1048576


def test_gpu_markdown_reports_kernel_stream_host_and_copy_fraction():
    from benchmarks import save_results as S
    results = _fake_gpu_results()
    meta = S.metadata(results, quick=False, skipped={"compile step/ddpm bf16": "out of time"}, device="cuda")
    text = S.markdown({"meta": meta, "results": results})
    assert "| size | dtype | provider | kernel (graph) | GB/s (% copy) | stream (eager) |" in text
    assert "1.00 TB/s (33%)" in text and "500.0 GB/s (16%)" in text
    assert "backend order on CUDA" in text and "Size-aware default from this run: `cpp` below" in text
    assert "- compile step/ddpm bf16: out of time" in text


# ---- the whole pipeline as a CPU dry run ---------------------------------------------------------
@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    pytest.importorskip("diffusers")
    tmp = tmp_path_factory.mktemp("gpu_check")
    doc = tmp / "BENCHMARKS.md"
    doc.write_text("head\n<!-- results:cpu-gpu-check:start -->\nold\n<!-- results:cpu-gpu-check:end -->\ntail\n")
    cmd = [sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--smoke", "--parts", "build,ops,e2e,profile",
           "--ops", "step/ddim,cfg", "--providers", "eager,diffusers,triton", "--sizes", "sd-latent", "--dtypes", "fp32",
           "--out", str(tmp / "out"), "--results-dir", str(tmp / "results"), "--doc", str(doc), "--wheels",
           str(tmp / "no-wheels")]
    result = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    return tmp, result


def test_dry_run_writes_results_doc_and_summary(dry_run):
    tmp, result = dry_run
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out_files = sorted(p.name for p in (tmp / "out").iterdir())
    assert len(out_files) <= 8  # what the device tool brings back
    json_name = next(n for n in out_files if n.endswith(".json"))
    assert (tmp / "results" / json_name).exists() and (tmp / "results" / json_name.replace(".json", ".md")).exists()
    assert {"BENCHMARKS.md", "gpu-check.log"} <= set(out_files)
    data = json.loads((tmp / "out" / json_name).read_text())
    parts = data["meta"]["parts"]
    assert parts["build"]["status"] == "skipped" and "need a GPU" in parts["build"]["note"]
    assert parts["tests"]["status"] == "skipped" and "--parts" in parts["tests"]["note"]
    assert parts["ops"]["status"] == "ok" and parts["e2e"]["status"] == "ok" and parts["profile"]["status"] == "ok"
    ops = [r for r in data["results"] if r["op"] in ("step/ddim", "cfg")]
    assert {r["provider"] for r in ops} == {"eager", "diffusers"}
    assert all(r["pct_copy_bw"] > 0 and r["host_s"] > 0 for r in ops)
    skipped = data["meta"]["skipped"]
    assert any(k.startswith("triton") and "interpreter" in v for k, v in skipped.items())  # never silent
    assert any("fastdiff-graph" in k and "need a GPU" in v for k, v in skipped.items())
    doc = (tmp / "BENCHMARKS.md").read_text()
    assert doc.startswith("head\n") and doc.endswith("tail\n") and "old" not in doc and "#### step/ddim" in doc
    tail = result.stdout.rstrip().splitlines()
    start = max(i for i, line in enumerate(tail) if line.startswith("== gpu-check summary"))
    summary = tail[start:]
    assert summary[1].split() == ["part", "status", "time", "note"]
    assert any(line.startswith("ops ") and "ok" in line for line in summary)
    assert any(line.startswith("e2e mlp2d ddpm3") for line in summary)


def test_import_copies_results_and_refreshes_the_gpu_block(dry_run, tmp_path):
    tmp, result = dry_run
    assert result.returncode == 0
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text("a\n<!-- results:cuda:start -->\nnothing yet\n<!-- results:cuda:end -->\nb\n")
    code = G.main(["--import", str(tmp / "out"), "--doc", str(doc), "--results-dir", str(tmp_path / "results")])
    assert code == 0
    assert len(list((tmp_path / "results").glob("*.json"))) == 1 and len(list((tmp_path / "results").glob("*.md"))) == 1
    text = doc.read_text()
    assert "nothing yet" not in text and "Device: **" in text and text.endswith("b\n")


def test_results_name_the_commit_given_for_a_copied_tree(monkeypatch):
    from benchmarks import save_results as S
    monkeypatch.delenv(S.COMMIT_ENV, raising=False)
    assert S.git_commit() != "abc1234"
    monkeypatch.setenv(S.COMMIT_ENV, "abc1234")
    assert S.git_commit() == "abc1234"
