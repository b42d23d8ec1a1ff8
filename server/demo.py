"""``make serve``: make sure the demo tasks exist, trained by our own trainer, then serve.

On first start each demo task is made the way a user would make it (the equivalent commands are
logged): ``server-data synth`` writes a composited dataset, ``server-train`` trains a side tuner
on the real offline mobilenet_v2 with a visible progress bar, and the best artifact is published
into the store through the same validation as an upload. Later starts find the tasks in the store.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

from models import PreprocessSpec, build_backbone
from server.store import TaskStore
from tuners.artifact import MANIFEST, WEIGHTS, load_artifact
from tuners.data.synth import SynthConfig, generate
from tuners.trainer.config import build_config
from tuners.trainer.loop import Trainer

log = logging.getLogger("sidecar.demo")


@dataclass(frozen=True)
class Recipe:
    """How a demo task is made: its synth data, then ``server-train`` with these values."""

    synth: SynthConfig
    epochs: int
    lr: float
    method: str = "cst"


# digits is the README's learning run (tests/tuners/test_learning.py). faces is trained on
# faces-photo, the composited faces made to transfer to real photos, with linear_probe, which beat
# cst there; 1,000 images for 8 epochs beat 500 for 12 on the real-photo faces set (README, Data).
DEMO_TASKS = {
    "digits": Recipe(SynthConfig(task="digits", images=400, seed=0), 20, 0.006),
    "faces": Recipe(
        SynthConfig(task="faces-photo", images=1000, seed=0, min_scale=12, max_scale=120, max_objects=5),
        8,
        0.006,
        "linear_probe",
    ),
}


def make_data(task: str, recipe: Recipe, work: Path) -> Path:
    """Writes the recipe's synth data under ``work/data/TASK`` (byte-deterministic for its seed)."""
    data, synth = work / "data" / task, recipe.synth
    log.info("demo task %s: server-data synth --task %s --images %d --seed %d --scale %d %d --objects %d %d "
             "--out %s", task, synth.task, synth.images, synth.seed, synth.min_scale, synth.max_scale,
             synth.min_objects, synth.max_objects, data)  # fmt: skip
    generate(synth, data)
    return data


def train_recipe(task: str, recipe: Recipe, work: Path, image_size: int = 320) -> dict:
    """Writes the recipe's data (:func:`make_data`) and trains it; returns ``report.json``."""
    data = make_data(task, recipe, work)
    run = work / "runs" / task
    log.info("demo task %s: server-train --method %s --data %s --epochs %d --lr %s --augmentation none "
             "--cache-features memory --out %s", task, recipe.method, data, recipe.epochs, recipe.lr, run)  # fmt: skip
    values = {"method": recipe.method, "data": data, "epochs": recipe.epochs, "lr": recipe.lr, "augmentation": "none",
              "cache_features": "memory", "out": run, "image_size": image_size}  # fmt: skip
    return Trainer(build_config(values)).fit()


def ensure_demo_tasks(store_dir: Path, work: Path, image_size: int = 320) -> list[str]:
    """Trains and publishes every missing demo task, one after another; returns the ids made now.

    One after another: compositing the faces data in a second process while digits trained cost
    digits about 100 s for the 40 s it saved (torch's threads share the two cores badly).
    """
    store = TaskStore(store_dir)
    made = []
    backbone = build_backbone("mobilenet_v2", allow_download=False, preprocess=PreprocessSpec(size=image_size))
    for task, recipe in DEMO_TASKS.items():
        if store.is_task(task):  # present in any state, even quarantined: never trained over
            continue
        report = train_recipe(task, recipe, work, image_size)
        artifact = Path(report["artifact"])
        store.publish(
            task,
            (artifact / WEIGHTS).read_bytes(),
            (artifact / MANIFEST).read_bytes(),
            lambda folder: load_artifact(folder, backbone) and None,
        )
        log.info("demo task %s published: AP50 %.3f on its synth val split", task, report["AP50"])
        made.append(task)
    return made


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.demo", description=__doc__)
    parser.add_argument("--store-dir", type=Path, default=Path("store"))
    parser.add_argument("--work", type=Path, default=Path(".cache/demo"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    ensure_demo_tasks(args.store_dir, args.work)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
