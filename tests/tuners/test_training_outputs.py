"""What a training run leaves to look at: results.csv and five pictures, each a valid, non-blank
image of the expected size; the confusion matrix counted by hand on a tiny case; the loggers."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.types import Detections
from tuners.data.records import DetectionData, ImageRecord
from tuners.data.synth import SynthConfig, generate
from tuners.errors import TunerError
from tuners.trainer.config import build_config
from tuners.trainer.loggers import build_logger
from tuners.trainer.loop import Trainer
from tuners.trainer.plots import confusion_matrix

PICTURES = {"curves.png": (1500, 400), "pr_curve.png": (700, 600), "confusion_matrix.png": None,
            "val_predictions.jpg": None}  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("data")
    generate(SynthConfig(task="digits", images=20, size=128, min_scale=24, max_scale=56, val_fraction=0.25), data)
    out = tmp_path_factory.mktemp("run")
    values = {"method": "linear_probe", "data": data, "epochs": 2, "image_size": 128, "batch_size": 8, "lr": 0.01,
              "augmentation": "none", "out": out, "progress": False, "warmup_iters": 0}  # fmt: skip
    config = build_config(values)
    Trainer(config).fit()
    return out


def test_results_csv_has_a_row_per_epoch(run: Path):
    rows = list(csv.DictReader((run / "results.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    for column in ("loss", "lr", "AP", "AP50", "AP75", "seconds", "peak_memory_bytes"):
        assert all(np.isfinite(float(r[column])) for r in rows), column
    assert float(rows[1]["lr"]) < float(rows[0]["lr"])  # the cosine schedule


@pytest.mark.parametrize("name", sorted(PICTURES))
def test_every_picture_is_a_valid_non_blank_image(run: Path, name: str):
    with Image.open(run / name) as image:
        image.verify()
    with Image.open(run / name) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
        if PICTURES[name]:
            assert image.size == PICTURES[name]
        else:
            assert min(image.size) >= 300
    assert pixels.std() > 10 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20  # drawn on, not blank


def test_the_confusion_matrix_counts_matches_misses_and_background():
    record = ImageRecord(Path("x.png"), 100, 100, torch.tensor([[0, 0, 10, 10], [50, 50, 60, 60], [80, 80, 90, 90.0]],
                         dtype=torch.float64), torch.tensor([0, 1, 1]))  # fmt: skip
    found = Detections(
        boxes=torch.tensor([[0, 0, 10, 10], [50, 50, 60, 61], [20, 20, 30, 30], [80, 80, 90, 90.0]]),
        scores=torch.tensor([0.9, 0.8, 0.7, 0.1]),  # the last is under the 0.25 score cut
        labels=torch.tensor([0, 0, 1, 1]),
    )
    matrix = confusion_matrix(DetectionData(["a", "b"], [record]), [found])
    # rows predicted (a, b, background), columns true (a, b, background)
    assert matrix.tolist() == [[1, 1, 0], [0, 0, 1], [0, 1, 0]]


def test_an_uninstalled_logger_is_a_clear_usage_error(tmp_path: Path):
    assert build_logger("none", tmp_path).log(1, {"loss": 1.0}) is None
    for name in ("tensorboard", "mlflow"):
        try:
            logger = build_logger(name, tmp_path)
        except TunerError as e:
            assert f"pip install 'sidecar[{name}]'" in str(e)
        else:  # installed here: it must take a row
            logger.log(1, {"loss": 1.0, "AP": 0.5})
            logger.close()
