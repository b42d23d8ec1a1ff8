"""Fan-out: K side tasks on one image in one request, three ways of running the tasks, against K
separate detectors.

Everything runs through the server's executor on the real offline mobilenet_v2 at 320 px, batch 1,
with the default CPU backbone (ONNX Runtime):

- separate: K work items one after another, each a full detector (its own backbone pass + the
  task, compiled), which is what K independently deployed detectors cost;
- fan-out, eager: one work item for K tasks (one backbone pass), the tasks in torch, one by one;
- fan-out, stacked: the same, the K tasks as one ``stack_module_state`` + ``vmap`` computation;
- fan-out, compiled: the same, each task's compiled ONNX Runtime graph (the CPU default).

Each fan-out way is timed alternately with the separate side, run by run, so drift weighs on both.
At K = 1 the compiled fan-out and the separate side do the same work: that row checks the method.

Run: ``.venv/bin/python -m bench.fan_out --repeats 20``. Prints a markdown table of medians and ratios.
"""

from __future__ import annotations

import argparse

import torch

from bench.common import paired_median_seconds, scratch
from models import PreprocessSpec, build_backbone
from models.postprocess import PostprocessConfig
from models.runtime import build_runtime
from server.executor import Executor, WorkItem
from server.imaging import decode_image
from server.metrics import Metrics
from server.stacks import StackCache
from tuners import build_task_model
from tuners.compiled import CompiledTask
from tuners.data.synth import photo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--methods", nargs="+", default=["linear_probe", "cst"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    backbone = build_backbone("mobilenet_v2", allow_download=False, preprocess=PreprocessSpec(size=320))
    with scratch("sidecar-fan-out-") as work:
        runtime = build_runtime(backbone, "onnx", "cpu", taps=list(backbone.stage_taps), cache_dir=work)
        plain = Executor(backbone, runtime, Metrics())
        stacked = Executor(backbone, runtime, Metrics(), stacks=StackCache())
        image = decode_image(photo("astronaut.png").read_bytes(), 1 << 26, 1 << 26)
        post = PostprocessConfig(score_thresh=0.3)
        print("| method | K | separate ms | fan-out eager ms | stacked ms | compiled ms | best fan-out / separate |")
        print("|---|---|---|---|---|---|---|")
        for method in args.methods:
            tasks = {}
            for i in range(8):
                torch.manual_seed(i)
                tasks[f"{method}{i}"] = build_task_model(method, {}, backbone, [f"c{j}" for j in range(10)]).eval()
            graphs = {t: CompiledTask(m, backbone, work / f"{t}.onnx", "cpu", threads=1) for t, m in tasks.items()}
            for k in (1, 2, 4, 8):
                chosen = dict(list(tasks.items())[:k])
                compiled = {t: graphs[t] for t in chosen}

                def separate(c: dict = chosen, g: dict = compiled) -> None:
                    for t, m in c.items():
                        plain.run([WorkItem(image, "x", {t: m}, post, {t: g[t]})])

                ways = {
                    "eager": lambda c=chosen: plain.run([WorkItem(image, "x", c, post)]),
                    "stacked": lambda c=chosen: stacked.run([WorkItem(image, "x", c, post)]),
                    "compiled": lambda c=chosen, g=compiled: plain.run([WorkItem(image, "x", c, post, g)]),
                }
                timed = {name: paired_median_seconds(fn, separate, args.repeats) for name, fn in ways.items()}
                sep = sorted(t[1] for t in timed.values())[1]  # the median of the three separate timings
                best = min(t[0] for t in timed.values())
                cells = " | ".join(f"{timed[n][0] * 1e3:.1f}" for n in ways)
                print(f"| {method} | {k} | {sep * 1e3:.1f} | {cells} | {best / sep:.2f} |", flush=True)


if __name__ == "__main__":
    main()
