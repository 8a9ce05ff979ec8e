"""Write benchmark results as benchmarks/results/<device>-<date>.json plus a markdown table.

The benchmark conftest and `make gpu-check` call `save()`. From the command line:

    python benchmarks/save_results.py                          # print the table of the latest results
    python benchmarks/save_results.py --json PATH              # ... of a given results file
    python benchmarks/save_results.py --json PATH --update-doc BENCHMARKS.md   # replace its results block
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import pathlib
import platform
import re
import subprocess
import sys
from typing import Optional

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import cases  # noqa: E402

OP_ORDER = cases.OP_ORDER
BYTES_NOTE = {name: spec.bytes_note for name, spec in cases.SPECS.items()}
FUSED_GPU = ("triton", "cpp_cuda")


# ---- metadata ---------------------------------------------------------------------------------
def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _version(module: str) -> Optional[str]:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None


COMMIT_ENV = "FASTDIFF_GIT_COMMIT"


def git_commit() -> str:
    """HEAD (+ "-dirty"), or $FASTDIFF_GIT_COMMIT when set: a copied tree whose .git is stale (the device
    tool's copy named the session's first commit on 2026-12-04) says which commit it is."""
    if os.environ.get(COMMIT_ENV):
        return os.environ[COMMIT_ENV]
    commit = _git("rev-parse", "HEAD")
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    return (commit + ("-dirty" if dirty else "")) if commit else "unknown (no git)"


def metadata(results: list[dict], quick: bool, skipped: Optional[dict] = None, **extra) -> dict:
    import torch

    from fastdiff import backends
    device = results[0]["device"] if results else extra.get("device", "cpu")
    copy = next((r["copy_gbps"] for r in results if r.get("copy_gbps")), None)
    meta = {
        "device": device.split(":")[0],
        "device_name": next((r["device_name"] for r in results if r.get("device_name")), device),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "torch": torch.__version__, "cuda": torch.version.cuda, "triton": _version("triton"),
        "diffusers": _version("diffusers"), "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "copy_gbps": copy, "quick": quick,
        "load_average_1min": os.getloadavg()[0],  # other work on the machine skews CPU timings
        "skipped": dict(skipped or {}),
        "backends": _safe(backends.report),
    }
    meta.update(extra)
    return meta


def _safe(fn) -> str:
    try:
        return fn()
    except Exception as error:  # noqa: BLE001 - a broken backend must not lose the results
        return f"(backends.report() failed: {type(error).__name__}: {error})"


def slug(text: str) -> str:
    text = re.sub(r"\(.*?\)", "", text).lower()
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")


def stem_for(meta: dict) -> str:
    tag = f"-{slug(meta['tag'])}" if meta.get("tag") else ""
    return f"{meta['device']}-{slug(meta['device_name'])}-{meta['date'][:10]}{tag}" + ("-quick" if meta["quick"] else "")


def save(results: list[dict], quick: bool, skipped: Optional[dict] = None, out_dirs=(RESULTS_DIR,),
         **extra) -> tuple[pathlib.Path, pathlib.Path]:
    """Write <stem>.json and <stem>.md into every folder of `out_dirs`; returns the first pair."""
    data = {"meta": metadata(results, quick, skipped, **extra), "results": results}
    return write(data, out_dirs)


def write(data: dict, out_dirs=(RESULTS_DIR,)) -> tuple[pathlib.Path, pathlib.Path]:
    stem, paths = stem_for(data["meta"]), []
    for out_dir in out_dirs:
        out_dir = pathlib.Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
        json_path.write_text(json.dumps(data, indent=1, default=str))
        md_path.write_text(markdown(data))
        paths.append((json_path, md_path))
    return paths[0]


def latest(out_dir: pathlib.Path = RESULTS_DIR, include_quick: bool = False) -> pathlib.Path:
    paths = [p for p in out_dir.glob("*.json") if include_quick or not p.stem.endswith("-quick")]
    if not paths:
        raise FileNotFoundError(f"no results JSON in {out_dir}; run `pytest benchmarks/ --benchmark-only` first")
    return max(paths, key=lambda p: p.stat().st_mtime)


# ---- formatting -------------------------------------------------------------------------------
def fmt_time(seconds: Optional[float]) -> str:
    if seconds is None or (isinstance(seconds, float) and math.isnan(seconds)):
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def fmt_bw(gbps: Optional[float], pct: Optional[float]) -> str:
    if gbps is None:
        return "-"
    if gbps >= 1000:
        return f"{gbps / 1000:.2f} TB/s ({pct:.0f}%)"
    return (f"{gbps:.1f} GB/s" if gbps >= 1 else f"{gbps * 1000:.0f} MB/s") + f" ({pct:.0f}%)"


def _shape(r: dict) -> str:
    return "x".join(map(str, r["shape"]))


def _op_table_cpu(rows: list[dict], op: str) -> list[str]:
    providers = [p for p in cases.PROVIDERS if any(r["provider"] == p for r in rows)]
    keys = sorted({(r["numel"], r["size"], r["dtype"]) for r in rows})
    by = {(r["size"], r["dtype"], r["provider"]): r for r in rows}
    lines = [f"#### {op}  ({BYTES_NOTE.get(op, '')} x element size)", "",
             "| size | dtype | " + " | ".join(cases.PROVIDER_LABELS[p] for p in providers) + " |",
             "|---|---|" + "---|" * len(providers)]
    for _, size, dtype in keys:
        eager = by.get((size, dtype, "eager"))
        cells, shape = [], size
        for p in providers:
            r = by.get((size, dtype, p))
            if r is None:
                cells.append("-")
                continue
            shape = _shape(r)
            ratio = f" · **{eager['median_s'] / r['median_s']:.2f}x**" if eager else ""
            cells.append(f"{fmt_time(r['median_s'])} · {fmt_bw(r['gbps'], r['pct_copy_bw'])}{ratio}")
        lines.append(f"| {size} ({shape}) | {dtype} | " + " | ".join(cells) + " |")
    return lines + [""]


def _op_table_gpu(rows: list[dict], op: str) -> list[str]:
    lines = [f"#### {op}  ({BYTES_NOTE.get(op, '')} x element size)", "",
             "| size | dtype | provider | kernel (graph) | GB/s (% copy) | stream (eager) | GB/s (% copy) "
             "| host / call | vs eager (kernel) |",
             "|---|---|---|---|---|---|---|---|---|"]
    order = {p: i for i, p in enumerate(cases.PROVIDERS)}
    rows = sorted(rows, key=lambda r: (r["numel"], r["dtype"], order.get(r["provider"], 99)))
    by = {(r["size"], r["dtype"], r["provider"]): r for r in rows}
    for r in rows:
        label = cases.PROVIDER_LABELS.get(r["provider"], r["provider"])
        if r.get("error"):
            lines.append(f"| {r['size']} ({_shape(r)}) | {r['dtype']} | {label} | failed: {r['error'][:120]} "
                         "| | | | | |")
            continue
        eager = by.get((r["size"], r["dtype"], "eager"))
        ratio = "-"
        if eager and not eager.get("error") and eager.get("median_s") and r.get("median_s"):
            ratio = f"**{eager['median_s'] / r['median_s']:.2f}x**"
        kernel = fmt_time(r.get("kernel_s")) if r.get("kernel_s") else f"- ({r.get('kernel_note', '')})"
        lines.append(f"| {r['size']} ({_shape(r)}) | {r['dtype']} | {label} | {kernel} | "
                     f"{fmt_bw(r.get('kernel_gbps'), r.get('kernel_pct_copy'))} | {fmt_time(r.get('stream_s'))} | "
                     f"{fmt_bw(r.get('stream_gbps'), r.get('stream_pct_copy'))} | {fmt_time(r.get('host_s'))} | "
                     f"{ratio} |")
    return lines + [""]


def _host_step_table(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    r0 = rows[0]
    lines = [f"#### host time per step ({_shape(r0)}, {r0['device']}, {r0['threads']} thread; ratio to "
             f"{r0['baseline']} in the same run; target <= 0.2x for fastdiff DDPM / DDIM)", "",
             "| call | median / call | ratio | target | note |", "|---|---|---|---|---|"]
    for r in rows:
        target = "-" if r.get("target_ratio") is None else (
            f"{r['target_ratio']}x: {'met' if r['ratio_to_baseline'] <= r['target_ratio'] else 'not met'}")
        lines.append(f"| {r['provider']} | {fmt_time(r['median_s'])} | {r['ratio_to_baseline']:.2f}x | {target} | "
                     f"{r.get('note', '')} |")
    return lines + [""]


def _e2e_table(rows: list[dict]) -> list[str]:
    from benchmarks.test_e2e import TARGETS
    lines = ["#### end-to-end sampling loops", "",
             "| sampler | model | loop | time | vs diffusers | target | model only | sampler share | host / step "
             "| checked |", "|---|---|---|---|---|---|---|---|---|---|"]
    base = {(r["model"], r["sampler"]): r["median_s"] for r in rows if r["provider"] == "diffusers"}
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['sampler']} | {r['model']} | {r['provider']} | failed: {r['error'][:120]} | | | | | | |")
            continue
        ref = base.get((r["model"], r["sampler"]))
        ratio = f"{ref / r['median_s']:.2f}x" if ref else "-"
        target = TARGETS.get((r["model"], r["sampler"])) if r["provider"] == "fastdiff-loop" else None
        target_cell = "-" if target is None or not ref else \
            f">= {target}x: {'met' if ref / r['median_s'] >= target else 'not met'}"
        lines.append(f"| {r['sampler']} | {r['model']} | {r['provider']} | {fmt_time(r['median_s'])} | {ratio} | "
                     f"{target_cell} | {fmt_time(r['model_only_s'])} | {100 * r['sampler_share']:.0f}% | "
                     f"{fmt_time(r.get('host_per_step_s'))} | {r.get('checked', '-')} |")
    if rows and rows[0].get("threads"):
        lines += ["", f"torch threads: {rows[0]['threads']}; times are medians of alternating rounds (every loop "
                      "of a setup, and its model-only loop, once per round)."]
    return lines + [""]


# ---- backend order on CUDA (issue 9, item 4) ---------------------------------------------------
def _geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


TIE = 0.05  # the other backend must be at least 5% faster to displace today's first choice: noise never flips it


def _decide(cpp_over_triton: float) -> str:
    """The faster of C++ CUDA and Triton; inside the TIE band, the one fastdiff.backends tries first today."""
    from fastdiff import backends
    incumbent = next(b for b in backends.DEFAULT_ORDER["cuda"] if b in ("cpp", "triton"))
    if incumbent == "cpp":
        return "triton" if cpp_over_triton > 1 / (1 - TIE) else "cpp"
    return "cpp" if cpp_over_triton < 1 - TIE else "triton"


def backend_order(results: list[dict]) -> dict:
    """Triton vs C++ CUDA per size class from one run's op results.

    Per class, over every (op, dtype) both measured: geometric means of the C++ / Triton ratios of
    stream time (an eager loop's cost per call: launch overhead included), kernel time (a graphed
    loop's) and host time. The default for a class is the backend with the lower stream time; the
    other displaces the current first choice (backends.DEFAULT_ORDER) only when it is more than TIE faster.
    """
    ok = [r for r in results if r.get("op") in cases.SPECS and not r.get("error") and r.get("stream_s")]
    by = {(r["op"], r["size"], r["dtype"], r["provider"]): r for r in ok}
    classes: dict[str, dict] = {}
    for size in cases.SIZES:
        ratios = {"stream": [], "kernel": [], "host": []}
        for op in cases.OP_ORDER:
            for dtype in cases.DTYPES:
                t, c = by.get((op, size, dtype, "triton")), by.get((op, size, dtype, "cpp_cuda"))
                if not t or not c:
                    continue
                for key in ratios:
                    if t.get(f"{key}_s") and c.get(f"{key}_s"):
                        ratios[key].append(c[f"{key}_s"] / t[f"{key}_s"])
        if not ratios["stream"]:
            continue
        summary = {f"cpp_over_triton_{k}": _geomean(v) for k, v in ratios.items() if v}
        summary["cases"] = len(ratios["stream"])
        summary["numel"] = math.prod(cases.SIZES[size])
        summary["default"] = _decide(summary["cpp_over_triton_stream"])
        summary["graph_default"] = _decide(summary.get("cpp_over_triton_kernel", 1.0))
        classes[size] = summary
    winners = sorted((s["numel"], s["default"]) for s in classes.values())
    rule, single = None, None
    if winners and len({w for _, w in winners}) == 1:
        single = winners[0][1]
    elif winners:
        i = next(k for k in range(1, len(winners)) if winners[k][1] != winners[0][1])
        threshold = int(math.sqrt(winners[i - 1][0] * winners[i][0]))  # geometric midpoint of the two sizes
        changes = sum(winners[k][1] != winners[k - 1][1] for k in range(1, len(winners)))
        rule = {"below": winners[0][1], "at_or_above": winners[i][1], "threshold_numel": threshold,
                "monotonic": changes == 1}
    return {"classes": classes, "size_rule": rule, "single_default": single}


def _backend_order_lines(order: dict) -> list[str]:
    if not order["classes"]:
        return ["#### backend order on CUDA", "", "Not decided by this run: Triton and C++ CUDA were not both "
                "measured on the same cases (see 'Not measured').", ""]
    lines = ["#### backend order on CUDA (Triton vs C++ CUDA, geometric mean over op cases and dtypes)", "",
             "| size class | cases | C++/Triton stream time | C++/Triton kernel time | C++/Triton host time "
             "| eager default | graph default |", "|---|---|---|---|---|---|---|"]
    for size, s in order["classes"].items():
        lines.append(f"| {cases.SIZE_CLASS.get(size, size)} | {s['cases']} | {s['cpp_over_triton_stream']:.2f} | "
                     f"{s.get('cpp_over_triton_kernel', float('nan')):.2f} | "
                     f"{s.get('cpp_over_triton_host', float('nan')):.2f} | {s['default']} | {s['graph_default']} |")
    rule = order["size_rule"]
    if rule:
        lines += ["", f"Size-aware default from this run: `{rule['below']}` below {rule['threshold_numel']:,} elements, "
                      f"`{rule['at_or_above']}` at or above" + ("" if rule["monotonic"] else
                                                                 " (not monotonic in size: see the table)") + "."]
    elif order["single_default"]:
        lines += ["", f"One default for every size class from this run: `{order['single_default']}` first on CUDA."]
    return lines + [""]


# ---- the whole document ------------------------------------------------------------------------
def _short_commit(commit: Optional[str]) -> str:
    """A hash shortened to 12 (with -dirty kept); anything else (a placeholder) as it is."""
    commit = commit or "unknown"
    head, _, dirty = commit.partition("-")
    if re.fullmatch(r"[0-9a-f]{13,40}", head):
        return head[:12] + ("-" + dirty if dirty else "")
    return commit


def markdown(data: dict) -> str:
    meta, results = data["meta"], data["results"]
    copy = f"{meta['copy_gbps']:.1f} GB/s" if meta.get("copy_gbps") else "not measured"
    lines = [f"Device: **{meta['device_name']}** · copy bandwidth {copy} (copy_, read + write) · {meta['date']} · "
             f"commit `{_short_commit(meta.get('git_commit'))}` · torch {meta['torch']} (CUDA {meta.get('cuda')}) · "
             f"triton {meta['triton']} · diffusers {meta['diffusers']} · Python {meta.get('python')} · "
             f"1-min load {meta.get('load_average_1min', 0):.1f} on {meta.get('cpu_count')} CPUs"
             + (" · **--quick**" if meta["quick"] else ""), ""]
    gpu = meta["device"] == "cuda"
    if any(r.get("op") in cases.SPECS for r in results):
        lines += ["Cells: " + ("kernel = CUDA-graph replays of back-to-back calls (device time per call); stream = "
                               "eager back-to-back launches between CUDA events (max of device and host issue time); "
                               "host = perf_counter per call, no sync inside; inputs rotated past 2x L2."
                               if gpu else "median time · effective GB/s (% of copy bandwidth) · **speed-up vs the "
                                           "eager reference in the same run**."), ""]
    for op in OP_ORDER:
        rows = [r for r in results if r.get("op") == op]
        if rows:
            lines += (_op_table_gpu if gpu else _op_table_cpu)(rows, op)
    if gpu:
        lines += _backend_order_lines(backend_order(results))
    lines += _host_step_table([r for r in results if r.get("op") == "host_step"])
    e2e = [r for r in results if r.get("op") == "e2e"]
    if e2e:
        lines += _e2e_table(e2e)
    for extra_key, title in (("profile", "Profile"), ("tests", "CUDA tests"), ("parts", "Parts")):
        if meta.get(extra_key + "_md"):
            lines += [f"#### {title}", "", meta[extra_key + "_md"], ""]
    if meta.get("skipped"):
        lines += ["Not measured in this run:", ""]
        lines += [f"- {k}: {why}" for k, why in sorted(meta["skipped"].items())]
        lines.append("")
    return "\n".join(lines)


def update_doc(doc: pathlib.Path, data: dict, block: Optional[str] = None) -> None:
    """Replace the block between <!-- results:<block>:start --> and <!-- results:<block>:end --> in doc."""
    block = block or data["meta"]["device"]
    start, end = f"<!-- results:{block}:start -->", f"<!-- results:{block}:end -->"
    text = doc.read_text()
    if start not in text or end not in text:
        raise SystemExit(f"{doc} has no {start} ... {end} block")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    doc.write_text(head + start + "\n" + markdown(data) + "\n" + end + tail)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=pathlib.Path, help="results file (default: the latest full run)")
    parser.add_argument("--update-doc", type=pathlib.Path, help="markdown file with a results block to replace")
    parser.add_argument("--block", help="results block name (default: the results' device, cpu or cuda)")
    args = parser.parse_args()
    data = json.loads((args.json or latest()).read_text())
    if args.update_doc:
        update_doc(args.update_doc, data, args.block)
    else:
        print(markdown(data))


if __name__ == "__main__":
    main()
