"""``server-predict``: a task's detections on images, offline. JSON on stdout (and in
``OUT/predictions.json``), and with ``--save-images`` the images with their boxes in ``OUT/``.

    server-predict runs/digits/best photo.jpg photos/ --out runs/predict --save-images
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from models import PostprocessConfig
from models.imaging import read_image
from tuners.commands import UsageError, positive_int, run, unit_float
from tuners.tools.common import add_task_arguments, detect_files, image_paths, load_task
from tuners.trainer.plots import draw_detections, write_image


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="server-predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add_task_arguments(p)
    p.add_argument("images", nargs="+", type=Path, help="image files or folders of images")
    p.add_argument("--out", type=Path, help="folder for predictions.json (and the pictures)")
    p.add_argument("--save-images", action="store_true", help="with --out: each image with its boxes")
    p.add_argument("--score-threshold", type=unit_float, default=PostprocessConfig.score_thresh,
                   help="the server's default (default: %(default)s)")  # fmt: skip
    p.add_argument("--max-detections", type=positive_int, default=PostprocessConfig.max_detections,
                   help="per image (default: %(default)s)")  # fmt: skip
    return p


def predict(args: argparse.Namespace) -> int:
    if args.save_images and args.out is None:
        raise UsageError("--save-images writes into --out DIR; give one")
    task = load_task(args.artifact, args.weights, args.device)
    post = PostprocessConfig(score_thresh=args.score_threshold, max_detections=args.max_detections)
    labels = task.manifest["labels"]
    answers = []
    for path, meta, det in detect_files(task, image_paths(args.images), post, args.batch_size):
        height, width = meta.original_size
        answers.append({"image": str(path), "width": width, "height": height,
                        "detections": det.rows(labels)})  # fmt: skip
        if args.save_images:  # drawn on the full image
            write_image(args.out / f"{path.stem}.jpg", draw_detections(read_image(path), det, labels))
    result = {"task": str(args.artifact), "method": task.manifest["method"], "results": answers}
    text = json.dumps(result, indent=2)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "predictions.json").write_text(text + "\n")
    sys.stdout.write(text + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return run("server-predict", lambda: predict(args), args.verbose)


if __name__ == "__main__":
    raise SystemExit(main())
