"""Every method, tuned fairly, on a task hard enough to tell them apart: the table users choose by.

The task is ``synth digits-clutter``: ten digit classes at 10 to 24 px, 4 to 10 objects per
image of which half are distractors (LFW faces and non-faces, squares cut from real photos), and
a background shift: train and val are composited on one set of photos and textures, test on
photos never seen in training (``tuners/data/synth.py``). Protocol, as a careful paper's:

1. every method trains at each learning rate of its grid (side methods and inline methods have
   their own grids; inline grids go lower, since they update backbone weights), seed 0;
   the trainer keeps its best epoch by val AP. A method whose best val rate is the top of its
   grid trains again at twice that rate, up to ``--extend`` times, so that no method is judged
   at a rate its grid cut short;
2. each method is reported at the learning rate with the best val AP50, on test, which no choice
   ever looked at;
3. the ``--top`` methods by test AP50, and ``full_finetune`` (the baseline every ratio is taken
   against), run again at that rate with seed 1, and the table gives the mean and both values;
4. a data-efficiency curve: ``--curve-methods`` at ``--fractions`` of the training images
   (the first images of the split; synth images are i.i.d.), at their best rate, seed 0.

Every run is ``server-train``'s own :class:`Trainer` on the real offline mobilenet_v2, one CPU
thread per run and ``--workers`` runs side by side, so seconds per epoch are one-thread figures
measured next to another run. Side methods train with ``--cache-features memory`` (the same
losses, cheaper epochs after the first). Each run's result is kept in ``OUT/runs/NAME/result.json``,
so a rerun resumes. ``hst_full`` needs a ViT and is listed with no result.

Run: ``make bench-methods`` (``.venv/bin/python -m bench.methods``).
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

from bench.methods_table import markdown
from tuners import TUNERS, list_tuners
from tuners.data.formats import read_coco, write_coco
from tuners.data.records import DetectionData
from tuners.data.synth import SynthConfig, generate

log = logging.getLogger("bench.methods")
SIDE_LRS = (0.002, 0.004, 0.008, 0.016)
INLINE_LRS = (0.0005, 0.001, 0.002, 0.004)
CURVE_METHODS = ("cst", "e3va", "lora", "full_finetune")
BASELINE = "full_finetune"


@dataclass(frozen=True)
class Run:
    method: str
    lr: float
    seed: int = 0
    fraction: float = 1.0

    @property
    def name(self) -> str:
        return f"{self.method}-lr{self.lr:g}-seed{self.seed}-data{self.fraction:g}"


def data_for(root: Path, fraction: float) -> Path:
    """The dataset folder with the first ``fraction`` of its training images (val and test whole)."""
    if fraction == 1.0:
        return root
    folder = root.parent / f"{root.name}-{fraction:g}"
    if not (folder / "val" / "annotations.json").is_file():
        train = read_coco(root / "train")
        keep = train.records[: max(1, round(len(train.records) * fraction))]
        write_coco(DetectionData(train.classes, keep, f"{train.description}; first {len(keep)}"), folder / "train")
        write_coco(read_coco(root / "val"), folder / "val")
    return folder


def train_and_test(run: Run, data: Path, out: Path, epochs: int) -> dict[str, Any]:
    """Trains ``run`` (one thread), scores its best epoch on ``data/test``; cached in ``result.json``."""
    import torch

    from models import PostprocessConfig
    from tuners.errors import TunerError
    from tuners.tools.common import load_task
    from tuners.tools.val import score
    from tuners.trainer.config import build_config
    from tuners.trainer.loop import Trainer, write_json

    folder = out / "runs" / run.name
    kept = folder / "result.json"
    if kept.is_file():
        return json.loads(kept.read_text())
    torch.set_num_threads(1)
    values = {
        "method": run.method,
        "data": data_for(data, run.fraction),
        "epochs": epochs,
        "lr": run.lr,
        "seed": run.seed,
        "augmentation": "none",
        "cache_features": "memory" if TUNERS.get(run.method).kind == "side" else "none",
        "feature_runtime": "torch",  # one thread per run, as the kept runs and the README table were measured
        "out": folder,
        "progress": False,
    }
    start = time.perf_counter()
    try:
        report = Trainer(build_config(values)).fit()
    except TunerError as e:  # a method that does not fit this backbone, or a diverged loss
        result = {**asdict(run), "error": str(e)}
    else:
        metrics, _ = score(load_task(Path(report["artifact"])), read_coco(data / "test"), PostprocessConfig())
        test = {f"test_{k}": metrics[k] for k in ("AP", "AP50", "AP75")}
        result = {**asdict(run), **report, "val_AP": report["AP"], "val_AP50": report["AP50"], **test}
    result["wall_seconds"] = round(time.perf_counter() - start, 1)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(kept, result)
    log.info("%s: %s", run.name, {k: result.get(k) for k in ("val_AP50", "test_AP50", "test_AP", "error")})
    return result


def run_all(
    runs: list[Run], data: Path, out: Path, epochs: int, workers: int, report_only: bool = False
) -> list[dict[str, Any]]:
    """Runs side by side, the slowest kind first so the pool drains evenly. ``report_only``: runs
    nothing, and returns the results already kept for ``runs``."""
    if report_only:
        kept = [out / "runs" / r.name / "result.json" for r in runs]
        return [json.loads(path.read_text()) for path in kept if path.is_file()]
    order = sorted(runs, key=lambda r: (TUNERS.get(r.method).kind != "inline", -r.fraction))
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        done = dict(zip(order, pool.map(partial(train_and_test, data=data, out=out, epochs=epochs), order)))
    return [done[r] for r in runs]


def best_by_val(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per method, the result with the best val AP50 (ties: the lower learning rate)."""
    best: dict[str, dict[str, Any]] = {}
    for r in sorted(results, key=lambda r: r["lr"]):
        if "error" not in r and r["val_AP50"] > best.get(r["method"], {}).get("val_AP50", -1.0):
            best[r["method"]] = r
    return best


def extensions(results: list[dict[str, Any]], grid: dict[str, list[float]]) -> list[Run]:
    """For each method whose best val rate is the top of its ``grid``: a run at twice that rate.
    ``grid`` is extended in place."""
    best = best_by_val(results)
    extra = [Run(m, 2 * max(rates)) for m, rates in grid.items() if m in best and best[m]["lr"] == max(rates)]
    for run in extra:
        grid[run.method].append(run.lr)
    return extra


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=240, help="train + val images (val: 20%%)")
    parser.add_argument("--test-images", type=int, default=120)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--methods", nargs="+", default=list_tuners())
    parser.add_argument("--side-lrs", type=float, nargs="+", default=SIDE_LRS)
    parser.add_argument("--inline-lrs", type=float, nargs="+", default=INLINE_LRS)
    parser.add_argument("--extend", type=int, default=3, help="times a grid grows past a best rate at its top")
    parser.add_argument("--top", type=int, default=3, help="methods that run a second seed")
    parser.add_argument("--curve-methods", nargs="*", default=CURVE_METHODS)
    parser.add_argument("--fractions", type=float, nargs="*", default=(0.25, 0.5))
    parser.add_argument("--report-only", action="store_true", help="train nothing: the table of the runs kept in OUT")
    parser.add_argument("--workers", type=int, default=2, help="runs side by side, one thread each")
    parser.add_argument("--out", type=Path, default=Path(".cache/bench-methods"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    start = time.perf_counter()
    data = args.out / "data" / "digits-clutter"
    if not (data / "test" / "annotations.json").is_file():
        cfg = SynthConfig(task="digits-clutter", images=args.images, test_images=args.test_images, min_objects=4,
                          max_objects=10, min_scale=10, max_scale=24, seed=0)  # fmt: skip
        generate(cfg, data)
    methods = [m for m in args.methods if m != "hst_full"]
    grid = {m: list(args.inline_lrs if TUNERS.get(m).kind == "inline" else args.side_lrs) for m in methods}
    sweep = run_all([Run(m, lr) for m in methods for lr in grid[m]], data, args.out, args.epochs, args.workers,
                    args.report_only)  # fmt: skip
    for _ in range(args.extend):
        extra = extensions(sweep, grid)
        if not extra:
            break
        sweep += run_all(extra, data, args.out, args.epochs, args.workers, args.report_only)
    best = best_by_val(sweep)
    top = sorted(best, key=lambda m: -best[m]["test_AP50"])[: args.top]
    seeded = [m for m in dict.fromkeys([*top, BASELINE]) if m in best]  # the baseline always gets its second seed
    extra = [Run(m, best[m]["lr"], seed=1) for m in seeded]
    extra += [Run(m, best[m]["lr"], fraction=f) for m in args.curve_methods if m in best for f in args.fractions]
    later = run_all(extra, data, args.out, args.epochs, args.workers, args.report_only)
    table = markdown(sweep, best, later, args)
    print(table)
    (args.out / "table.md").write_text(table + "\n")
    log.info("%.1f min", (time.perf_counter() - start) / 60)


if __name__ == "__main__":
    main()
