"""The markdown of ``bench.methods``: the methods at their best learning rate on test, the sweep
behind each choice, and the data-efficiency curve."""

from __future__ import annotations

import argparse
import statistics
from typing import Any

from tuners import TUNERS

HEADER = (
    "| method | kind | lr (best val) | test AP50 | test AP | trainable params | of full_finetune "
    "| artifact | peak train memory | of full_finetune | s / epoch | task cost |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def spread(values: list[float]) -> str:
    """``mean (a, b)`` for two or more seeds, else the one value."""
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ({', '.join(f'{v:.3f}' for v in values)})"


def _row(method: str, r: dict[str, Any], seeds: list[dict[str, Any]], base: dict[str, Any] | None) -> str:
    params, memory = r["trainable_params"], r["peak_memory_bytes"]
    of = (lambda a, b: f"{a / b:.2f}") if base else (lambda a, b: "-")
    return (
        f"| `{method}` | {r['kind']} | {r['lr']:g} | {spread([s['test_AP50'] for s in seeds])} "
        f"| {spread([s['test_AP'] for s in seeds])} | {params / 1e6:.2f}M "
        f"| {of(params, base['trainable_params']) if base else '-'} | {r['artifact_bytes'] / 1e6:.1f} MB "
        f"| {memory / 2**20:.0f} MiB | {of(memory, base['peak_memory_bytes']) if base else '-'} "
        f"| {r['seconds_per_epoch']:.1f} | {r['task_cost_fraction_of_backbone']:.2f} |"
    )


def markdown(
    sweep: list[dict[str, Any]],
    best: dict[str, dict[str, Any]],
    later: list[dict[str, Any]],
    args: argparse.Namespace,
) -> str:
    """The three tables, with the protocol and the runs' training time in one line above them."""
    base = best.get("full_finetune")
    runs = sweep + later
    minutes = sum(r.get("wall_seconds", 0.0) for r in runs) / 60
    lines = [
        f"digits-clutter: {args.images} train + val images (val 20%), {args.test_images} test images on held-out "
        f"backgrounds; {args.epochs} epochs; seed 0, second seed for the top {args.top} and full_finetune; "
        f"{len(runs)} runs, {minutes:.0f} min of training in all, {args.workers} runs side by side, one thread each.",
        "",
        HEADER,
    ]
    ranked = sorted(best, key=lambda m: -best[m]["test_AP50"])
    for method in ranked:
        r = best[method]
        seeds = [r] + [x for x in later if x["method"] == method and x["seed"] == 1 and "error" not in x]
        lines.append(_row(method, r, seeds, base))
    for method in dict.fromkeys(r["method"] for r in sweep if r["method"] not in best):
        error = next(r.get("error", "") for r in sweep if r["method"] == method)
        lines.append(f"| `{method}` | {TUNERS.get(method).kind} | - | no result: {error} |" + " - |" * 8)
    lines.append("| `hst_full` | inline | - | not run: needs a ViT |" + " - |" * 8)
    lines += ["", "| method | val AP50 at each lr (seed 0) |", "|---|---|"]
    for method in dict.fromkeys(r["method"] for r in sweep):
        cells = [f"{r['lr']:g}: {r['val_AP50']:.3f}" if "error" not in r else f"{r['lr']:g}: failed"
                 for r in sweep if r["method"] == method]  # fmt: skip
        lines.append(f"| `{method}` | {' · '.join(cells)} |")
    curve = [x for x in later if x["fraction"] < 1 and "error" not in x]
    fractions = sorted({x["fraction"] for x in curve}) + [1.0]
    lines += ["", "| method | " + " | ".join(f"test AP50, {f:.0%} of train" for f in fractions) + " |",
              "|---|" + "---|" * len(fractions)]  # fmt: skip
    for method in dict.fromkeys(x["method"] for x in curve):
        found = {x["fraction"]: x["test_AP50"] for x in curve if x["method"] == method}
        found[1.0] = best[method]["test_AP50"]
        cells = [f"{found[f]:.3f}" if f in found else "-" for f in fractions]
        lines.append(f"| `{method}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)
