"""Small typed values passed between layers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass
class Target:
    """Ground truth for one image on the canvas.

    Attributes:
        boxes: float ``[N, 4]`` x1, y1, x2, y2 in canvas pixels.
        labels: int64 ``[N]`` class indices in ``[0, num_classes)``.
    """

    boxes: Tensor
    labels: Tensor

    def to(self, device: torch.device | str) -> Target:
        return Target(self.boxes.to(device), self.labels.to(device))


@dataclass
class Detections:
    """Detections for one image.

    Attributes:
        boxes: float ``[N, 4]`` x1, y1, x2, y2 (canvas or original pixels, as the producer says).
        scores: float ``[N]`` in ``[0, 1]``.
        labels: int64 ``[N]`` class indices.
        depth: backbone blocks actually run for this image, when a method can stop early (dyn_adapter).
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    depth: int | None = None

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def to(self, device: torch.device | str) -> Detections:
        return Detections(self.boxes.to(device), self.scores.to(device), self.labels.to(device), self.depth)

    def rows(self, labels: Sequence[str]) -> list[dict[str, Any]]:
        """``{"box", "label", "class_id", "score"}`` per detection, as the server answers and
        ``server-predict`` writes: the box rounded to 0.01 px and the score to 1e-4, in float64 and as
        whole tensors (not ``round`` per number), so a float32 value keeps no trailing digits."""
        boxes = torch.round(self.boxes.detach().cpu().double(), decimals=2).tolist()
        scores = torch.round(self.scores.detach().cpu().double(), decimals=4).tolist()
        return [
            {"box": box, "label": labels[c], "class_id": c, "score": score}
            for box, score, c in zip(boxes, scores, self.labels.tolist())
        ]
