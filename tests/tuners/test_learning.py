"""Learning with the real offline mobilenet_v2 (slow: `make test-slow`, a few minutes on 2 cores).

The digits test is the README's learning run and the `make serve` digits demo:
    server-data synth --task digits --out data/digits --images 400 --seed 0
    server-train --method cst --data data/digits --epochs 20 --lr 0.006 --augmentation none \
                 --cache-features memory --out runs/cst-digits
Seen over runs (README), the feature cache filled by ONNX Runtime as on every CPU since
2026-11-27: AP50 0.613 (seed 0, 2 threads, in every run since), 0.593 (seed 0, 1 thread), 0.516
(seed 1) and 0.614 (seed 2). This test's seed 0 clears the bar of 0.5 by 0.09 or more; seed 1
would clear it by only 0.016. (With eager torch taps: 0.575, 0.593, 0.543, 0.620.)

The faces test trains the `make serve` faces demo by its own recipe (``server.demo.DEMO_TASKS``:
linear_probe on 1,000 faces-photo images, 8 epochs, lr 0.006, seed 0) and scores it on the
real-photo faces set (18 photos, 13 faces), whose boxes are MTCNN's (a pretrained model's output,
not human ground truth). It asserts issue 14's target: AP50 >= 0.6 and no false positive at score
>= 0.5 on the photos without a face. Seen over runs (README, Data), scored as the server reads
images (large JPEGs at a DCT scale), with the feature cache filled by ONNX Runtime (the CPU
default since 2026-11-27): seed 0 on two threads, as this test and `make serve` train it, scored
0.637 with no such false positive in every run of train_recipe (the same to the last digit;
README, Data), a margin of 0.037. The recipe is not steady beyond that: seed 0 on one thread
scored 0.593, and seeds 1 and 2 on two threads 0.589 and 0.629 (none with such a false positive),
so a machine whose torch runs on another number of threads may land below 0.6. With eager torch
taps: 0.635, 0.617 (one thread), and 0.523 (one false positive) and 0.641 for seeds 1 and 2 (one
thread each).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from models import PostprocessConfig
from server.demo import DEMO_TASKS, train_recipe
from tuners.data.real_faces import materialize
from tuners.data.synth import SynthConfig, generate
from tuners.tools.common import load_task
from tuners.tools.val import score
from tuners.trainer.config import build_config
from tuners.trainer.loop import Trainer


@pytest.mark.slow
def test_cst_learns_synth_digits(tmp_path: Path):
    generate(SynthConfig(task="digits", images=400, seed=0), tmp_path / "digits")
    config = build_config(
        {
            "method": "cst",
            "data": tmp_path / "digits",
            "epochs": 20,
            "lr": 0.006,
            "augmentation": "none",
            "cache_features": "memory",  # taps computed once, in ONNX Runtime, as `make serve` trains digits
            "out": tmp_path / "run",
            "progress": False,
        }
    )
    report = Trainer(config).fit()
    assert report["AP50"] >= 0.5, report["history"]
    assert report["feature_cache"]["not_cached_over_budget"] == 0


@pytest.mark.slow
def test_the_faces_demo_task_transfers_to_real_photos(tmp_path: Path):
    report = train_recipe("faces", DEMO_TASKS["faces"], tmp_path)
    real = materialize(tmp_path / "real-faces")
    metrics, _ = score(load_task(Path(report["artifact"])), real, PostprocessConfig(), confidence=0.5)
    assert metrics["AP50"] >= 0.6, metrics
    assert metrics["false_positives_on_images_without_boxes"] == 0, metrics  # boxes at score >= 0.5 there
