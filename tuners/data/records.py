"""The one in-memory dataset type every reader produces and every writer consumes."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from models.imaging import upright_size
from tuners.errors import counted

log = logging.getLogger(__name__)


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
        """What makes the record unusable as it is: a missing or unreadable image, a size that is not
        the image's, boxes that are not finite or whose corners are swapped, labels outside the classes.
        Sets the size from the image where the annotations give none, or give the stored size of an
        image that EXIF orientation turns (boxes are in the upright image's pixels)."""
        problems = self._settle_size()
        b = self.boxes
        if b.ndim != 2 or b.shape[1] != 4 or not b.shape[0] == self.labels.shape[0] == self.crowd.shape[0]:
            return [f"{self.path.name}: boxes {tuple(b.shape)} and labels {tuple(self.labels.shape)} do not match"]
        if not torch.isfinite(b).all():
            problems.append(f"{self.path.name}: box coordinates that are not finite numbers")
        swapped = (b[:, 2] < b[:, 0]) | (b[:, 3] < b[:, 1])
        if swapped.any():
            first = [round(v, 2) for v in b[swapped][0].tolist()]  # x1, y1, x2, y2
            problems.append(f"{self.path.name}: {int(swapped.sum())} boxes end before they start, as {first}")
        if self.labels.numel() and (self.labels.min() < 0 or self.labels.max() >= num_classes):
            problems.append(f"{self.path.name}: labels outside [0, {num_classes})")
        return problems

    def _settle_size(self) -> list[str]:
        if not self.path.is_file():
            return [f"{self.path}: the image file is missing"]
        try:
            width, height = upright_size(self.path)
        except (OSError, SyntaxError, ValueError) as e:
            return [f"{self.path}: the image cannot be read ({e})"]
        if (self.width, self.height) not in ((width, height), (height, width)) and 0 not in (self.width, self.height):
            return [f"{self.path.name}: the annotations give {self.width}x{self.height} pixels, the image is "
                    f"{width}x{height}; its boxes would not match it"]  # fmt: skip
        self.width, self.height = width, height
        return []

    def clip(self) -> tuple[int, int]:
        """Clips the boxes to the image and drops those left with no area (outside it, or with no width or
        height), as Ultralytics, Detectron2 and MMDetection do. Returns (boxes clipped, boxes dropped)."""
        inside = self.boxes.clone()
        inside[:, 0::2] = inside[:, 0::2].clamp(0, self.width)
        inside[:, 1::2] = inside[:, 1::2].clamp(0, self.height)
        keep = (inside[:, 2] > inside[:, 0]) & (inside[:, 3] > inside[:, 1])
        clipped = int(((inside != self.boxes).any(dim=1) & keep).sum())
        self.boxes, self.labels, self.crowd = inside[keep], self.labels[keep], self.crowd[keep]  # type: ignore[index]
        return clipped, int((~keep).sum())


@dataclass
class DetectionData:
    """Class names plus image records; what the trainer, the evaluator and the converters share."""

    classes: list[str]
    records: list[ImageRecord]
    description: str = ""

    def validate(self) -> None:
        """Refuses the dataset when a class has no name or a record is unusable (:meth:`ImageRecord.validate`,
        the first 20 problems named), then clips every box to its image and drops the empty ones, with a warning."""
        problems = [p for r in self.records for p in r.validate(len(self.classes))]
        if not self.classes:
            problems.insert(0, "no classes")
        if any(not name.strip() for name in self.classes):
            problems.insert(0, f"a class with no name (classes {self.classes}): an object or category left unnamed")
        if problems:
            raise DatasetError(f"{counted(len(problems), 'problem')}: " + "; ".join(problems[:20]))
        counts = {r.path.name: r.clip() for r in self.records}
        changed = [name for name, (clipped, dropped) in counts.items() if clipped or dropped]
        if changed:
            log.warning(
                "%d boxes reach outside their image and were clipped to it; %d with no area inside it were "
                "dropped (in %d images: %s)", sum(c for c, _ in counts.values()), sum(d for _, d in counts.values()),
                len(changed), ", ".join(changed[:5]) + (", ..." if len(changed) > 5 else ""),
            )  # fmt: skip

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
