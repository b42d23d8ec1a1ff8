"""Cost of each head per task, as a fraction of one mobilenet_v2 pass (same run, same input).

Usage: .venv/bin/python -m bench.head_cost [--size 320] [--threads 2]
"""

from __future__ import annotations

import argparse

import torch

from bench.common import median_seconds
from models import build_backbone, build_head


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    backbone = build_backbone("mobilenet_v2")
    taps = list(backbone.pyramid_taps)
    x = torch.randn(1, 3, args.size, args.size)
    with torch.inference_mode():
        maps = [backbone(x, taps)[t] for t in taps]
    channels = [backbone.feature_spec[t].channels for t in taps]
    strides = [backbone.feature_spec[t].stride for t in taps]
    base = median_seconds(lambda: backbone(x, taps), args.repeats)
    print(f"mobilenet_v2 pass at {args.size}px, {args.threads} threads: {base * 1e3:.2f} ms")
    print("| head | options | params | ms | fraction of a backbone pass |")
    print("|---|---|---|---|---|")
    for name, options in [
        ("light", {}),
        ("fcos", {"width": 128, "num_convs": 2}),
        ("fcos", {"width": 256, "num_convs": 4}),
        ("retinanet", {"width": 128}),
    ]:
        head = build_head(name, 10, channels, strides, **options).eval()
        params = sum(p.numel() for p in head.parameters())
        t = median_seconds(lambda head=head: head(maps), args.repeats)
        print(f"| {name} | {options or 'default'} | {params / 1e6:.2f}M | {t * 1e3:.2f} | {t / base:.3f} |")


if __name__ == "__main__":
    main()
