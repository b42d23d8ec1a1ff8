"""Fan-out: K side tasks on one image in one request, against K separate detectors.

Both sides run through the server's engine on the real offline mobilenet_v2 at 320 px, batch 1:

- fan-out: one work item asking for K tasks (one backbone pass, then K tuners + heads);
- separate: K work items run one after another, each a full detector (its own backbone pass +
  the same tuner + head), which is what K independently deployed detectors cost.

The two are timed alternately, run by run, so K = 1 (the same work on both sides) checks the method:
its ratio should be 1.0 within the noise.

Run: ``.venv/bin/python -m bench.fan_out --repeats 20``. Prints a markdown table of medians and ratios.
"""

from __future__ import annotations

import argparse

import torch

from bench.common import paired_median_seconds
from models import PreprocessSpec, build_backbone
from models.postprocess import PostprocessConfig
from models.runtime import build_runtime
from server.executor import Executor, WorkItem
from server.imaging import decode_image
from server.metrics import Metrics
from tuners import build_task_model
from tuners.data.synth import photo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--methods", nargs="+", default=["linear_probe", "cst"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    backbone = build_backbone("mobilenet_v2", allow_download=False, preprocess=PreprocessSpec(size=320))
    engine = Executor(backbone, build_runtime(backbone, "torch", "cpu"), Metrics())
    image = decode_image(photo("astronaut.png").read_bytes(), 1 << 26, 1 << 26)
    post = PostprocessConfig()
    print("| method | K | fan-out ms | K separate detectors ms | fan-out / separate |")
    print("|---|---|---|---|---|")
    for method in args.methods:
        tasks = {f"{method}{i}": build_task_model(method, {}, backbone, ["a", "b"]).eval() for i in range(8)}
        for k in (1, 2, 4, 8):
            chosen = dict(list(tasks.items())[:k])
            fan, separate = paired_median_seconds(
                lambda c=chosen: engine.run([WorkItem(image, "x", c, post)]),
                lambda c=chosen: [engine.run([WorkItem(image, "x", {t: m}, post)]) for t, m in c.items()],
                args.repeats,
            )
            print(f"| {method} | {k} | {fan * 1e3:.1f} | {separate * 1e3:.1f} | {fan / separate:.2f} |")


if __name__ == "__main__":
    main()
