"""Every method on one task under one protocol: accuracy against cost, the table users choose by.

Each method is trained by ``server-train``'s own :class:`Trainer` on the same ``synth`` set, seed,
schedule and learning rate (not tuned per method), on the real offline mobilenet_v2. Side methods
train with ``--cache-features memory`` (the same losses, faster epochs after the first); inline
methods cannot. The table gathers each run's ``report.json``; ``hst_full`` needs a ViT and is
listed with no result.

Run: ``.venv/bin/python -m bench.methods --task faces --images 240 --epochs 6``
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from tuners import TUNERS, list_tuners
from tuners.data.synth import SynthConfig, generate
from tuners.errors import TunerError
from tuners.trainer.config import build_config
from tuners.trainer.loop import Trainer

COLUMNS = "| method | kind | AP50 | AP | trainable params | artifact | peak train memory | s / epoch | task cost |"


def row(method: str, report: dict) -> str:
    """One markdown row; task cost is the fraction of one backbone pass that adding the task costs."""
    return (
        f"| `{method}` | {report['kind']} | {report['AP50']:.3f} | {report['AP']:.3f} "
        f"| {report['trainable_params'] / 1e6:.2f}M | {report['artifact_bytes'] / 1e6:.1f} MB "
        f"| {report['peak_memory_bytes'] / 2**20:.0f} MiB | {report['seconds_per_epoch']:.1f} "
        f"| {report['task_cost_fraction_of_backbone']:.2f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--task", default="faces", help="server-data synth task")
    parser.add_argument("--images", type=int, default=240)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--lr", type=float, default=0.004)
    parser.add_argument("--image-size", type=int, default=320)
    parser.add_argument("--methods", nargs="+", default=list_tuners())
    parser.add_argument("--out", type=Path, default=Path(".cache/bench-methods"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    data = args.out / "data" / args.task
    if not (data / "train").is_dir():
        generate(SynthConfig(task=args.task, images=args.images, seed=0), data)
    rows = []
    for method in args.methods:
        values = {
            "method": method,
            "data": data,
            "epochs": args.epochs,
            "lr": args.lr,
            "image_size": args.image_size,
            "augmentation": "none",
            "cache_features": "memory" if TUNERS.get(method).kind == "side" else "none",
            "out": args.out / "runs" / method,
            "progress": False,
        }
        try:
            rows.append(row(method, Trainer(build_config(values)).fit()))
        except TunerError as e:  # a method that does not fit this backbone, or a diverged loss
            rows.append(f"| `{method}` | {TUNERS.get(method).kind} | no result: {e} " + "| - " * 6 + "|")
        print(rows[-1], flush=True)
    print(f"\n{args.task}, {args.images} images, {args.epochs} epochs, lr {args.lr}, {args.image_size} px")
    print(COLUMNS)
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
