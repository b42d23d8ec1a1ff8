"""COCO mAP through pycocotools: the one evaluator the trainer and the benchmarks use."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from models.types import Detections
from tuners.data.formats import to_coco
from tuners.data.records import DetectionData


def coco_map(data: DetectionData, predictions: Sequence[Detections]) -> dict[str, object]:
    """COCO box AP of ``predictions`` (original-image pixels, xyxy) against ``data``.

    Crowd boxes (COCO ``iscrowd``, VOC ``difficult``) are ignored, as pycocotools does: a detection
    on one is neither a true nor a false positive.

    Returns:
        ``{"AP", "AP50", "AP75", "per_class": {name: AP}, "pr": {"recall": [101], "precision": {name: [101]}}}``;
        classes with no ground truth are left out; ``pr`` is precision at IoU 0.5 per recall point (-1: none).
    """
    if len(predictions) != len(data.records):
        raise ValueError(f"{len(predictions)} predictions for {len(data.records)} images")
    doc = to_coco(data)
    rows = [
        [image_id, x1, y1, x2 - x1, y2 - y1, score, label + 1]
        for image_id, det in enumerate(predictions, start=1)
        for (x1, y1, x2, y2), score, label in zip(det.boxes.tolist(), det.scores.tolist(), det.labels.tolist())
    ]
    recall = np.linspace(0, 1, 101).tolist()
    empty = {"AP": 0.0, "AP50": 0.0, "AP75": 0.0, "per_class": {}, "pr": {"recall": recall, "precision": {}}}
    if not doc["annotations"]:
        return empty
    gt = COCO()
    gt.dataset = doc
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        if not rows:
            return {**empty, "per_class": {c: 0.0 for i, c in enumerate(data.classes) if gt.getAnnIds(catIds=[i + 1])}}
        dt = gt.loadRes(np.array(rows, dtype=np.float64))
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    precision = ev.eval["precision"]  # [IoU thresholds, recall points, classes, areas, max dets]
    per_class, curves = {}, {}
    for k, cat_id in enumerate(ev.params.catIds):
        p = precision[:, :, k, 0, -1]
        if gt.getAnnIds(catIds=[cat_id]):
            per_class[data.classes[cat_id - 1]] = float(p[p > -1].mean()) if (p > -1).any() else 0.0
            curves[data.classes[cat_id - 1]] = precision[0, :, k, 0, -1].tolist()
    return {
        "AP": float(ev.stats[0]),
        "AP50": float(ev.stats[1]),
        "AP75": float(ev.stats[2]),
        "per_class": per_class,
        "pr": {"recall": ev.params.recThrs.tolist(), "precision": curves},
    }
