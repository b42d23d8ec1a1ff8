"""What a slimmer light head saves per task, and what it costs in accuracy.

Every side task in a fan-out request pays for its own head, so the head's width and tower depth set
the floor under "one more task" (``bench.head_cost``). This trains the two ``make serve`` demo
recipes (``server.demo.DEMO_TASKS``) with each head below, on the real offline mobilenet_v2 at 320 px:

- faces: ``linear_probe`` on synth ``faces-photo``, scored on the real-photo faces set at score >= 0.5
  (its boxes are MTCNN's, a pretrained detector's, not people's): AP50, AP, and boxes on the photos
  without a face; and its synth val AP;
- digits: ``cst`` on synth ``digits``: val AP50 and AP.

and times each head's compiled graphs as the server runs them: 8 distinct untrained tasks on 2 worker
threads, per graph, against the ONNX Runtime backbone pass at batch 1 (the two alternated).

Run: ``.venv/bin/python -m bench.head_accuracy [--seeds 0 1]`` (about 6 min per head and seed on 2 cores).
"""

from __future__ import annotations

import argparse
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from bench.common import paired_median_seconds, scratch
from bench.head_cost import graph_set
from models import FrozenBackbone, PostprocessConfig, build_backbone
from models.runtime import build_runtime
from server.demo import DEMO_TASKS, make_data
from tuners.data.real_faces import materialize
from tuners.data.records import DetectionData
from tuners.tools.common import load_task
from tuners.tools.val import score
from tuners.trainer.config import build_config
from tuners.trainer.loop import Trainer

HEADS = {
    "width 96, 2 units (default)": {},
    "width 64, 2 units": {"width": 64},
    "width 64, 1 unit": {"width": 64, "num_convs": 1},
}


def graph_cost(backbone: FrozenBackbone, head: dict, work: Path, repeats: int) -> dict[str, float]:
    """Per method: one of 8 compiled graphs on 2 worker threads, as a fraction of the ORT backbone pass."""
    taps, x = list(backbone.stage_taps), torch.randn(1, 3, 320, 320)
    runtime = build_runtime(backbone, "onnx", "cpu", taps=taps, cache_dir=work)
    costs = {}
    with ThreadPoolExecutor(2) as pool, torch.inference_mode():
        maps = runtime(x, taps)
        for method in ("linear_probe", "cst"):
            graphs = graph_set(backbone, method, work, head=head)
            eight, one_pass = paired_median_seconds(
                lambda g=graphs: list(pool.map(lambda graph: graph(maps), g)), lambda: runtime(x, taps), repeats
            )
            costs[method] = eight / 8 / one_pass
    return costs


def train(task: str, data: Path, head: dict, seed: int, work: Path, real: DetectionData) -> dict[str, Any]:
    """Trains demo recipe ``task`` on its ``data`` with ``head`` and training seed ``seed``; its val
    metrics, and for faces its metrics on the real photos ``real``."""
    recipe = DEMO_TASKS[task]
    out = work / "runs" / "-".join([task, f"seed{seed}", *(f"{k}{v}" for k, v in sorted(head.items()))])
    values = {"method": recipe.method, "data": data, "epochs": recipe.epochs, "lr": recipe.lr, "seed": seed,
              "augmentation": "none", "cache_features": "memory", "head": head, "progress": False,
              "out": out}  # fmt: skip
    report = Trainer(build_config(values)).fit()
    result = {"val_AP50": report["AP50"], "val_AP": report["AP"]}
    if task == "faces":
        metrics, _ = score(load_task(Path(report["artifact"])), real, PostprocessConfig(), confidence=0.5)
        result |= {"real_AP50": metrics["AP50"], "real_AP": metrics["AP"],
                   "real_fp": metrics["false_positives_on_images_without_boxes"]}  # fmt: skip
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(2)
    backbone = build_backbone("mobilenet_v2")
    print("| head | seed | linear_probe graph / pass | cst graph / pass | faces: real AP50 | real AP | "
          "boxes on faceless photos | synth val AP | digits (cst): val AP50 | val AP |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    with scratch("sidecar-head-accuracy-") as work:
        real = materialize(work / "real-faces")
        data = {task: make_data(task, DEMO_TASKS[task], work) for task in ("faces", "digits")}  # once, for every head
        for name, head in HEADS.items():
            cost = graph_cost(backbone, head, work / "onnx", args.repeats)
            for seed in args.seeds:
                faces, digits = [train(t, data[t], head, seed, work, real) for t in ("faces", "digits")]
                cells = [name, seed, f"{cost['linear_probe']:.3f}", f"{cost['cst']:.3f}", f"{faces['real_AP50']:.3f}",
                         f"{faces['real_AP']:.3f}", faces["real_fp"], f"{faces['val_AP']:.3f}",
                         f"{digits['val_AP50']:.3f}", f"{digits['val_AP']:.3f}"]  # fmt: skip
                print("| " + " | ".join(map(str, cells)) + " |", flush=True)


if __name__ == "__main__":
    main()
