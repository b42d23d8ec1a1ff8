"""``server-data``: make, convert and inspect detection datasets.

Examples:
    server-data synth --task digits --out data/digits --images 400 --seed 0
    server-data convert --src data/digits/train --from coco --to yolo --out data/digits-yolo/train
    server-data stats --data data/digits/train --format coco
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tuners.data.formats import FORMATS, read_dataset, write_dataset
from tuners.data.records import DatasetError
from tuners.data.synth import TASKS, SynthConfig, generate


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="server-data", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    synth = sub.add_parser("synth", help="write a seeded composited dataset (COCO format, train + val)")
    synth.add_argument("--task", choices=sorted(TASKS), default="digits")
    synth.add_argument("--out", type=Path, required=True)
    synth.add_argument("--images", type=int, default=200)
    synth.add_argument("--size", type=int, default=320, help="image side in pixels")
    synth.add_argument("--objects", type=int, nargs=2, default=(1, 4), metavar=("MIN", "MAX"))
    synth.add_argument("--scale", type=int, nargs=2, default=(24, 72), metavar=("MIN", "MAX"), help="object side, px")
    synth.add_argument("--val-fraction", type=float, default=0.2)
    synth.add_argument("--seed", type=int, default=0)
    convert = sub.add_parser("convert", help="convert one split between coco, voc and yolo")
    convert.add_argument("--src", type=Path, required=True)
    convert.add_argument("--from", dest="src_format", choices=FORMATS, required=True)
    convert.add_argument("--to", dest="dst_format", choices=FORMATS, required=True)
    convert.add_argument("--out", type=Path, required=True)
    stats = sub.add_parser("stats", help="print class and box statistics as JSON")
    stats.add_argument("--data", type=Path, required=True)
    stats.add_argument("--format", choices=FORMATS, default="coco")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "synth":
            cfg = SynthConfig(
                task=args.task,
                images=args.images,
                size=args.size,
                min_objects=args.objects[0],
                max_objects=args.objects[1],
                min_scale=args.scale[0],
                max_scale=args.scale[1],
                seed=args.seed,
                val_fraction=args.val_fraction,
            )
            splits = generate(cfg, args.out)
            result = {split: data.stats() for split, data in splits.items()}
        elif args.command == "convert":
            data = read_dataset(args.src, args.src_format)
            write_dataset(data, args.out, args.dst_format)
            result = {"written": str(args.out), "format": args.dst_format, **data.stats()}
        else:
            result = read_dataset(args.data, args.format).stats()
    except (DatasetError, ValueError) as e:
        sys.stderr.write(f"server-data: error: {e}\n")
        return 2
    sys.stdout.write(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
