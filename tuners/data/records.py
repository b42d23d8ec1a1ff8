"""The one in-memory dataset type every reader produces and every writer consumes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor


class DatasetError(ValueError):
    """A dataset on disk is missing files or has invalid annotations."""


@dataclass
class ImageRecord:
    """One image and its boxes.

    Attributes:
        path: image file.
        width, height: image size in pixels.
        boxes: float64 ``[N, 4]`` x1, y1, x2, y2 in image pixels.
        labels: int64 ``[N]`` indices into :attr:`DetectionData.classes`.
        crowd: bool ``[N]``: boxes evaluation ignores and training leaves out (COCO ``iscrowd``,
            VOC ``difficult``), as pycocotools and the VOC protocol do.
    """

    path: Path
    width: int
    height: int
    boxes: Tensor = field(default_factory=lambda: torch.zeros(0, 4, dtype=torch.float64))
    labels: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))
    crowd: Tensor | None = None

    def __post_init__(self) -> None:
        if self.crowd is None:
            self.crowd = torch.zeros(self.labels.shape[0], dtype=torch.bool)

    def validate(self, num_classes: int) -> list[str]:
        problems = [] if self.path.is_file() else [f"{self.path}: the image file is missing"]
        b = self.boxes
        if b.ndim != 2 or b.shape[1] != 4 or not b.shape[0] == self.labels.shape[0] == self.crowd.shape[0]:
            return [f"{self.path.name}: boxes {tuple(b.shape)} and labels {tuple(self.labels.shape)} do not match"]
        bad = (b[:, 2] <= b[:, 0]) | (b[:, 3] <= b[:, 1]) | (b[:, 0] < 0) | (b[:, 1] < 0)
        bad |= (b[:, 2] > self.width) | (b[:, 3] > self.height)
        if bad.any():
            problems.append(f"{self.path.name}: {int(bad.sum())} boxes are empty or outside the image")
        if self.labels.numel() and (self.labels.min() < 0 or self.labels.max() >= num_classes):
            problems.append(f"{self.path.name}: labels outside [0, {num_classes})")
        return problems


@dataclass
class DetectionData:
    """Class names plus image records; what the trainer, the evaluator and the converters share."""

    classes: list[str]
    records: list[ImageRecord]
    description: str = ""

    def validate(self) -> None:
        problems = [p for r in self.records for p in r.validate(len(self.classes))]
        if not self.classes:
            problems.insert(0, "no classes")
        if problems:
            raise DatasetError(f"{len(problems)} problems: " + "; ".join(problems[:20]))

    def stats(self) -> dict[str, object]:
        """Images, boxes per class, and box size percentiles (sqrt of area, pixels)."""
        labels = torch.cat([r.labels for r in self.records]) if self.records else torch.zeros(0, dtype=torch.long)
        boxes = torch.cat([r.boxes for r in self.records]) if self.records else torch.zeros(0, 4, dtype=torch.float64)
        per_class = {c: int((labels == i).sum()) for i, c in enumerate(self.classes)}
        sides = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).sqrt()
        pct = {}
        if sides.numel():
            q = torch.quantile(sides, torch.tensor([0.0, 0.5, 0.95, 1.0], dtype=sides.dtype))
            pct = {"min": float(q[0]), "median": float(q[1]), "p95": float(q[2]), "max": float(q[3])}
        return {"images": len(self.records), "boxes": int(labels.numel()), "per_class": per_class, "box_side_px": pct}
