"""``server-val``: a task's COCO metrics on a dataset split, offline, with the training run's
pictures (PR curve, confusion matrix, predictions grid) in ``OUT/``.

    server-val runs/digits/best --data data/digits [--split val] [--format auto] --out runs/val
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from models import PostprocessConfig
from models.types import Detections
from tuners.commands import UsageError, run, unit_float
from tuners.data.layouts import DATASET_FORMATS, read_splits
from tuners.data.records import DetectionData
from tuners.tools.common import Task, add_task_arguments, detect_files, load_task
from tuners.trainer.evaluate import coco_map
from tuners.trainer.plots import (
    confusion_matrix,
    detections_on_empty,
    recall_and_false_positives,
    write_pictures,
)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="server-val", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add_task_arguments(p)
    p.add_argument("--data", type=Path, required=True, help="dataset folder, one split, data.yaml, COCO .json or .zip")
    p.add_argument("--format", choices=DATASET_FORMATS, default="auto", help="(default: auto, detected)")
    p.add_argument("--split", default="val", help="split to score, when the dataset has several (default: val)")
    p.add_argument("--out", type=Path, help="folder for metrics.json and the pictures")
    p.add_argument("--score-threshold", type=unit_float, default=0.05, help="as training evaluates (default: 0.05)")
    p.add_argument("--confidence", type=unit_float, default=0.25,
                   help="score from which a box counts for recall and false positives (default: 0.25)")  # fmt: skip
    return p


def score(
    task: Task, data: DetectionData, post: PostprocessConfig, confidence: float = 0.25, batch_size: int = 8
) -> tuple[dict[str, Any], list[Detections]]:
    """COCO metrics of ``task`` on ``data`` (``pr`` among them), recall and false positives at
    ``confidence`` (also on the images without boxes), and the detections in image pixels."""
    paths = [r.path for r in data.records]
    predictions = [det for _, _, det in detect_files(task, paths, post, batch_size)]
    metrics = coco_map(data, predictions)
    metrics.update(recall_and_false_positives(confusion_matrix(data, predictions, confidence=confidence)))
    metrics["false_positives_on_images_without_boxes"] = detections_on_empty(data, predictions, confidence)
    return metrics, predictions


def validate(args: argparse.Namespace) -> int:
    splits, fmt = read_splits(args.data, args.format)  # the data is checked before any weights load
    split = args.split if args.split in splits else ("train" if list(splits) == ["train"] else None)
    if split is None:
        raise UsageError(f"{args.data} has no {args.split!r} split; it has {sorted(splits)}")
    data = splits[split]
    task = load_task(args.artifact, args.weights, args.device)
    if data.classes != task.manifest["labels"]:
        raise UsageError(f"the dataset's classes {data.classes} are not the task's labels {task.manifest['labels']}")
    post = PostprocessConfig(score_thresh=args.score_threshold)
    metrics, predictions = score(task, data, post, args.confidence, args.batch_size)
    pr = metrics.pop("pr")
    result = {"data": str(args.data), "format": fmt, "split": split, "images": len(data.records), **metrics,
              "confidence": args.confidence}  # fmt: skip
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        write_pictures(args.out, data, predictions, pr)
        (args.out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    sys.stdout.write(json.dumps(result, indent=2) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return run("server-val", lambda: validate(args), args.verbose)


if __name__ == "__main__":
    raise SystemExit(main())
