"""Write benchmark results as benchmarks/results/<device>-<date>.json plus a markdown table.

The conftest calls `save()` at the end of every benchmark session. From the command line:

    python benchmarks/save_results.py                          # print the table of the latest results
    python benchmarks/save_results.py --json PATH              # ... of a given results file
    python benchmarks/save_results.py --update-doc BENCHMARKS.md   # replace the CPU/GPU table block there
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import common  # noqa: E402

OP_ORDER = ("q_sample", "ddpm_step", "ddim_step", "cfg", "cfg+step")
BYTES_NOTE = {  # what each op group must move (see common.py): shown under each table
    "q_sample": "read x0, write x_t and noise: 3 x numel",
    "ddpm_step": "read eps and x_t, write x_{t-1}: 3 x numel",
    "ddim_step": "read eps and x_t, write x_{t-1}: 3 x numel",
    "cfg": "read uncond and cond, write guided: 3 x numel",
    "cfg+step": "read [uncond; cond] (2 x numel) and x_t, write x_{t-1}: 4 x numel",
}


# ---- metadata ---------------------------------------------------------------------------------
def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None


def metadata(results: list[dict], quick: bool) -> dict:
    import torch

    device = results[0]["device"]
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    return {
        "device": device,
        "device_name": common.device_name(device),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git("rev-parse", "HEAD") + ("-dirty" if dirty else ""),
        "torch": torch.__version__, "triton": _version("triton"), "diffusers": _version("diffusers"),
        "python": platform.python_version(), "torch_threads": torch.get_num_threads(),
        "copy_gbps": common.copy_bandwidth(device) / 1e9,
        "quick": quick,
        "load_average_1min": os.getloadavg()[0],  # other work on the machine skews CPU timings
        "skipped_providers": dict(common.SKIPPED),
        "backends": common.backends.report(),
    }


def _slug(text: str) -> str:
    text = re.sub(r"\(.*?\)", "", text).lower()
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")


def save(results: list[dict], quick: bool, out_dir: pathlib.Path = RESULTS_DIR) -> tuple[pathlib.Path, pathlib.Path]:
    meta = metadata(results, quick)
    stem = f"{meta['device']}-{_slug(meta['device_name'])}-{meta['date'][:10]}" + ("-quick" if quick else "")
    out_dir.mkdir(parents=True, exist_ok=True)
    data = {"meta": meta, "results": results}
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    json_path.write_text(json.dumps(data, indent=1))
    md_path.write_text(markdown(data))
    return json_path, md_path


def latest(out_dir: pathlib.Path = RESULTS_DIR, include_quick: bool = False) -> pathlib.Path:
    paths = [p for p in out_dir.glob("*.json") if include_quick or not p.stem.endswith("-quick")]
    if not paths:
        raise FileNotFoundError(f"no results JSON in {out_dir}; run `pytest benchmarks/ --benchmark-only` first")
    return max(paths, key=lambda p: p.stat().st_mtime)


# ---- markdown ---------------------------------------------------------------------------------
def _time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def _op_table(rows: list[dict], op: str) -> list[str]:
    providers = [p for p in common.PROVIDERS if any(r["provider"] == p for r in rows)]
    keys = sorted({(r["numel"], r["size"], r["dtype"]) for r in rows})
    by = {(r["size"], r["dtype"], r["provider"]): r for r in rows}
    lines = [f"#### {op}  ({BYTES_NOTE.get(op, '')} x element size)", "",
             "| size | dtype | " + " | ".join(common.PROVIDER_LABELS[p] for p in providers) + " |",
             "|---|---|" + "---|" * len(providers)]
    for _, size, dtype in keys:
        eager = by.get((size, dtype, "eager"))
        cells = []
        for p in providers:
            r = by.get((size, dtype, p))
            if r is None:
                cells.append("-")
                continue
            ratio = f" · **{eager['median_s'] / r['median_s']:.2f}x**" if eager else ""
            cells.append(f"{_time(r['median_s'])} · {r['gbps']:.1f} GB/s ({r['pct_copy_bw']:.0f}%){ratio}")
        shape = "x".join(map(str, by[(size, dtype, providers[0])]["shape"])) if (size, dtype, providers[0]) in by \
            else size
        lines.append(f"| {size} ({shape}) | {dtype} | " + " | ".join(cells) + " |")
    return lines + [""]


def _e2e_table(rows: list[dict]) -> list[str]:
    lines = ["#### end-to-end sampling loops", "",
             "| loop | model | steps | loop | time | vs diffusers | model only | sampler share |",
             "|---|---|---|---|---|---|---|---|"]
    base = {(r["model"], r["sampler"]): r["median_s"] for r in rows if r["provider"] == "diffusers"}
    for r in rows:
        ref = base.get((r["model"], r["sampler"]))
        ratio = f"{ref / r['median_s']:.2f}x" if ref else "-"
        lines.append(f"| {r['sampler']} | {r['model']} | {r['steps']} | {r['provider']} | {_time(r['median_s'])} | "
                     f"{ratio} | {_time(r['model_only_s'])} | {100 * r['sampler_share']:.0f}% |")
    return lines + [""]


def markdown(data: dict) -> str:
    meta, results = data["meta"], data["results"]
    lines = [f"Device: **{meta['device_name']}** · copy bandwidth {meta['copy_gbps']:.1f} GB/s (copy_, read + write) · "
             f"{meta['date']} · commit `{meta['git_commit'][:12] or 'unknown'}` · torch {meta['torch']} · "
             f"triton {meta['triton']} · diffusers {meta['diffusers']}" + (" · **--quick**" if meta["quick"] else ""),
             "", "Cells: median time · effective GB/s (% of copy bandwidth) · **speed-up vs the eager reference "
             "in the same run**.", ""]
    for op in OP_ORDER:
        rows = [r for r in results if r["op"] == op]
        if rows:
            lines += _op_table(rows, op)
    e2e = [r for r in results if r["op"] == "e2e"]
    if e2e:
        lines += _e2e_table(e2e)
    if meta.get("skipped_providers"):
        lines += ["Not measured in this run:", ""]
        lines += [f"- {common.PROVIDER_LABELS.get(p, p)}: {why}" for p, why in sorted(meta["skipped_providers"].items())]
        lines.append("")
    return "\n".join(lines)


def update_doc(doc: pathlib.Path, data: dict) -> None:
    """Replace the block between <!-- results:<device>:start --> and <!-- results:<device>:end --> in doc."""
    device = data["meta"]["device"]
    start, end = f"<!-- results:{device}:start -->", f"<!-- results:{device}:end -->"
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
    args = parser.parse_args()
    data = json.loads((args.json or latest()).read_text())
    if args.update_doc:
        update_doc(args.update_doc, data)
    else:
        print(markdown(data))


if __name__ == "__main__":
    main()
