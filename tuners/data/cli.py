"""``server-data``: make, convert and inspect detection datasets.

Examples:
    server-data synth --task digits --out data/digits --images 400 --seed 0
    server-data convert --data data/digits --to ultralytics --out data/digits-ultralytics
    server-data convert --data data/digits/train --from coco --to yolo --out data/digits-yolo/train
    server-data stats --data data/digits
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tuners.commands import UsageError, add_common, run
from tuners.data.formats import FORMATS, write_dataset
from tuners.data.layouts import DATASET_FORMATS, is_split, read_splits, write_splits
from tuners.data.real_faces import materialize
from tuners.data.synth import TASKS, SynthConfig, generate


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="server-data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    shown = argparse.ArgumentDefaultsHelpFormatter
    synth = sub.add_parser(
        "synth", help="write a seeded composited dataset (COCO, train + val, optionally test)", formatter_class=shown
    )
    synth.add_argument("--task", choices=sorted(TASKS), default="digits")
    synth.add_argument("--out", type=Path, required=True)
    synth.add_argument("--images", type=int, default=200)
    synth.add_argument("--image-size", "--size", dest="size", type=int, default=320, help="image side in pixels")
    synth.add_argument("--objects", type=int, nargs=2, default=(1, 4), metavar=("MIN", "MAX"))
    synth.add_argument("--scale", type=int, nargs=2, default=(24, 72), metavar=("MIN", "MAX"), help="object side, px")
    synth.add_argument("--val-fraction", type=float, default=0.2)
    synth.add_argument("--test-images", type=int, default=0, help="also write a test split of this many images")
    synth.add_argument("--seed", type=int, default=0)
    convert = sub.add_parser("convert", help="convert a dataset (or one split) to another format or layout",
                             formatter_class=shown)  # fmt: skip
    convert.add_argument("--data", "--src", dest="data", type=Path, required=True, help="dataset or split folder")
    convert.add_argument("--from", dest="src_format", choices=DATASET_FORMATS, default="auto")
    convert.add_argument("--to", dest="dst_format", choices=DATASET_FORMATS[1:], required=True)
    convert.add_argument("--out", type=Path, required=True)
    real = sub.add_parser("real-faces", help="write the real-photo faces set (MTCNN's boxes) as a COCO split",
                          formatter_class=shown)  # fmt: skip
    real.add_argument("--out", type=Path, required=True)
    stats = sub.add_parser("stats", help="print class and box statistics as JSON", formatter_class=shown)
    stats.add_argument("--data", type=Path, required=True)
    stats.add_argument("--format", choices=DATASET_FORMATS, default="auto")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return run("server-data", lambda: _run(args), args.verbose)


def _run(args: argparse.Namespace) -> int:
    if args.command == "synth":
        splits = generate(_synth_config(args), args.out)
        result = {split: data.stats() for split, data in splits.items()}
    elif args.command == "real-faces":
        data = materialize(args.out)
        result = {"written": str(args.out), "description": data.description, **data.stats()}
    elif args.command == "convert":
        splits, found = read_splits(args.data, args.src_format)
        if is_split(args.data, found) and args.dst_format in FORMATS:  # one split in, one split out
            write_dataset(splits["train"], args.out, args.dst_format)
        else:
            write_splits(splits, args.out, args.dst_format)
        result = {"written": str(args.out), "from": found, "to": args.dst_format,
                  **{split: data.stats() for split, data in splits.items()}}  # fmt: skip
    else:
        splits, found = read_splits(args.data, args.format)
        if is_split(args.data, found):
            result = {"format": found, **splits["train"].stats()}
        else:
            result = {"format": found, **{split: data.stats() for split, data in splits.items()}}
    sys.stdout.write(json.dumps(result, indent=2) + "\n")
    return 0


def _synth_config(args: argparse.Namespace) -> SynthConfig:
    try:
        return SynthConfig(
            task=args.task,
            images=args.images,
            size=args.size,
            min_objects=args.objects[0],
            max_objects=args.objects[1],
            min_scale=args.scale[0],
            max_scale=args.scale[1],
            seed=args.seed,
            val_fraction=args.val_fraction,
            test_images=args.test_images,
        )
    except ValueError as e:
        flags = "--objects MIN MAX, --scale MIN MAX, --image-size, --images, --val-fraction, --test-images"
        raise UsageError(f"{e} (set by {flags})") from e


if __name__ == "__main__":
    raise SystemExit(main())
