from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from models.types import Detections
from tuners.data.records import DetectionData, ImageRecord
from tuners.trainer.evaluate import coco_map

GT = torch.tensor([[148.0, 50.0, 550.0, 642.0], [600.0, 100.0, 700.0, 300.0]], dtype=torch.float64)


def _data() -> DetectionData:
    return DetectionData(["animal"], [ImageRecord(Path("quokka.jpg"), 960, 643, GT.clone(), torch.tensor([0, 0]))])


def _pycocotools(pred: Detections) -> list[float]:
    gt = COCO()
    gt.dataset = {
        "images": [{"id": 1, "width": 960, "height": 643}],
        "categories": [{"id": 1, "name": "animal"}],
        "annotations": [
            {
                "id": i + 1,
                "image_id": 1,
                "category_id": 1,
                "iscrowd": 0,
                "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                "area": (b[2] - b[0]) * (b[3] - b[1]),
            }
            for i, b in enumerate(GT.tolist())
        ],
    }
    rows = [[1, b[0], b[1], b[2] - b[0], b[3] - b[1], s, 1] for b, s in zip(pred.boxes.tolist(), pred.scores.tolist())]
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(np.array(rows)), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [float(ev.stats[0]), float(ev.stats[1]), float(ev.stats[2])]


def test_perfect_predictions_give_ap_one() -> None:
    result = coco_map(_data(), [Detections(GT.float(), torch.tensor([0.9, 0.8]), torch.tensor([0, 0]))])
    assert result["AP"] == pytest.approx(1.0) and result["AP50"] == pytest.approx(1.0)
    assert result["per_class"] == {"animal": pytest.approx(1.0)}


def test_known_imperfect_case_matches_pycocotools() -> None:
    """Box 1 exact; box 2 shifted right by half its width (IoU 1/3); a higher-scored false positive."""
    shifted = GT[1] + torch.tensor([50.0, 0.0, 50.0, 0.0])
    boxes = torch.stack([torch.tensor([10.0, 10.0, 60.0, 60.0]), GT[0].float(), shifted.float()])
    pred = Detections(boxes, torch.tensor([0.95, 0.9, 0.8]), torch.tensor([0, 0, 0]))
    result = coco_map(_data(), [pred])
    expected = _pycocotools(pred)
    assert [result["AP"], result["AP50"], result["AP75"]] == pytest.approx(expected)
    # By hand: ranks FP, TP, FP -> precision 0.5 up to recall 0.5 at every IoU threshold: 51 of 101 points.
    assert result["AP"] == pytest.approx(0.5 * 51 / 101, abs=1e-6)


def test_no_predictions_gives_zero() -> None:
    empty = Detections(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long))
    assert coco_map(_data(), [empty])["AP"] == 0.0
