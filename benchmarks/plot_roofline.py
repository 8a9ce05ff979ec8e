"""Achieved bandwidth per op, size and provider against the measured copy bandwidth.

    python benchmarks/plot_roofline.py                 # latest full results JSON in benchmarks/results/
    python benchmarks/plot_roofline.py --json PATH     # a given results file

Writes <results stem>-roofline.png next to the JSON. The dashed line is the copy bandwidth of the
same run (the memory-bound ceiling of a step that moves the counted bytes once); points above it
are sizes that fit in cache.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, NullFormatter  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import cases  # noqa: E402
from benchmarks.save_results import OP_ORDER, _short_commit, latest  # noqa: E402

STYLE = {"eager": ("tab:gray", "o"), "diffusers": ("tab:orange", "s"), "compile": ("tab:purple", "^"),
         "reference": ("tab:brown", "x"),
         "triton": ("tab:green", "D"), "cpp_cuda": ("tab:blue", "v"), "cpp_cpu": ("tab:red", "P")}
DASH = {"fp32": "-", "fp16": "--", "bf16": ":"}


def plot_op(ax, rows: list[dict], op: str, copy_gbps: float) -> None:
    for provider in cases.PROVIDERS:
        for dtype in DASH:
            line = sorted((r for r in rows if r["provider"] == provider and r["dtype"] == dtype and r.get("gbps")),
                          key=lambda r: r["bytes_moved"])
            if not line:
                continue
            color, marker = STYLE[provider]
            label = cases.PROVIDER_LABELS[provider] + ("" if dtype == "fp32" else f" {dtype}")
            ax.plot([r["bytes_moved"] / 2**20 for r in line], [r["gbps"] for r in line], DASH[dtype],
                    color=color, marker=marker, label=label)
    ax.axhline(copy_gbps, color="black", linestyle="--", linewidth=1, label=f"copy BW {copy_gbps:.1f} GB/s")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_title(op)
    ax.set_xlabel("bytes moved per call (MiB)")
    ax.set_ylabel("effective GB/s")
    ax.grid(True, which="both", alpha=0.3)
    plain = FuncFormatter(lambda value, _: f"{value:g}")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(plain)
        axis.set_minor_formatter(NullFormatter())


def plot(data: dict, out: pathlib.Path) -> pathlib.Path:
    meta, results = data["meta"], data["results"]
    ops = [op for op in OP_ORDER if any(r.get("op") == op for r in results)]
    if not ops:
        raise SystemExit("no op results to plot (only e2e?)")
    cols = min(3, len(ops))
    rows_n = (len(ops) + cols - 1) // cols
    fig, axes = plt.subplots(rows_n, cols, figsize=(5.2 * cols, 4.2 * rows_n), squeeze=False)
    for ax, op in zip(axes.flat, ops):
        plot_op(ax, [r for r in results if r.get("op") == op], op, meta["copy_gbps"])
    for ax in list(axes.flat)[len(ops):]:
        ax.axis("off")
    seen = {}  # one legend for all panels (providers can differ per op)
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    fig.legend(seen.values(), seen.keys(), loc="lower right", fontsize=8, ncol=2,
               bbox_to_anchor=(0.98, 0.04) if len(ops) % cols else (0.98, -0.08))
    fig.suptitle(f"fastdiff ops: achieved vs copy bandwidth — {meta['device_name']}\n"
                 f"{meta['date'][:10]}, commit {_short_commit(meta['git_commit'])}, torch {meta['torch']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=pathlib.Path, help="results file (default: the latest full run)")
    parser.add_argument("--out", type=pathlib.Path, help="PNG path (default: <json stem>-roofline.png)")
    args = parser.parse_args()
    path = args.json or latest()
    out = args.out or path.with_name(path.stem + "-roofline.png")
    print(plot(json.loads(path.read_text()), out))


if __name__ == "__main__":
    main()
