"""Learning with the real offline mobilenet_v2 (slow: `make test-slow`, a few minutes on 2 cores).

The same run as the README's methods table and the `make serve` digits demo:
    server-data synth --task digits --out data/digits --images 400 --seed 0
    server-train --method cst --data data/digits --epochs 20 --lr 0.006 --augmentation none \
                 --cache-features memory --out runs/cst-digits
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tuners.data.synth import SynthConfig, generate
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
            "cache_features": "memory",  # the same losses and predictions as without, in less time
            "out": tmp_path / "run",
            "progress": False,
        }
    )
    report = Trainer(config).fit()
    assert report["AP50"] >= 0.5, report["history"]
    assert report["feature_cache"]["not_cached_over_budget"] == 0
