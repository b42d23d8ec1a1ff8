"""Turn per-location candidates into final detections: threshold, top-k, batched NMS, clip.

:func:`finish` postprocesses many (task, image) pairs in one ``batched_nms`` call: each pair's
labels are offset so that no two pairs share an NMS group. Boxes go through NMS in float64,
where adding the group offset to a float32 coordinate is exact, so a pair's result is bit-for-bit
the same whether it is finished alone or with others (invariant 3).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.ops import batched_nms, clip_boxes_to_image

from models.types import Detections


@dataclass(frozen=True)
class PostprocessConfig:
    """Attributes: score threshold, candidates kept per level before NMS, NMS IoU, detections kept per image."""

    score_thresh: float = 0.05
    topk_candidates: int = 1000
    nms_thresh: float = 0.6
    max_detections: int = 100


@dataclass
class Candidates:
    """One image's scored boxes before NMS.

    Attributes:
        boxes: float ``[K, 4]`` x1, y1, x2, y2 in canvas pixels.
        scores: float ``[K]`` in ``[0, 1]``.
        labels: int64 ``[K]`` class indices.
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor


def select_candidates(scores: Tensor, score_thresh: float, topk: int) -> tuple[Tensor, Tensor, Tensor]:
    """Keeps the ``topk`` best (location, class) pairs above ``score_thresh``.

    Args:
        scores: ``[N, C]`` per-location class probabilities.

    Returns:
        (scores ``[K]``, location indices ``[K]``, class labels ``[K]``).
    """
    flat = scores.flatten()
    keep = torch.nonzero(flat > score_thresh).squeeze(1)
    flat = flat[keep]
    if flat.numel() > topk:
        flat, order = flat.topk(topk)
        keep = keep[order]
    num_classes = scores.shape[1]
    return flat, torch.div(keep, num_classes, rounding_mode="floor"), keep % num_classes


def finish(
    candidates: list[Candidates], canvas: tuple[int, int], configs: list[PostprocessConfig]
) -> list[Detections]:
    """Clip to ``canvas`` (H, W), class-wise NMS, best ``max_detections``: one result per candidate set.

    All sets that share an NMS threshold go through a single ``batched_nms`` call.
    """
    results: list[Detections | None] = [None] * len(candidates)
    by_thresh: dict[float, list[int]] = defaultdict(list)
    for i, config in enumerate(configs):
        by_thresh[config.nms_thresh].append(i)
    for thresh, members in by_thresh.items():
        sets = [candidates[i] for i in members]
        boxes = torch.cat([clip_boxes_to_image(c.boxes, canvas) for c in sets])
        scores, labels = torch.cat([c.scores for c in sets]), torch.cat([c.labels for c in sets])
        owner = torch.cat([torch.full_like(c.labels, j, dtype=torch.long) for j, c in enumerate(sets)])  # their device
        span = int(labels.max()) + 1 if labels.numel() else 1
        keep = batched_nms(boxes.double(), scores.double(), labels + owner * span, thresh)
        kept_owner = owner[keep]
        for j, i in enumerate(members):
            mine = keep[kept_owner == j][: configs[i].max_detections]
            results[i] = Detections(boxes=boxes[mine], scores=scores[mine], labels=labels[mine])
    return results  # type: ignore[return-value]


def nms_and_clip(
    boxes: Tensor, scores: Tensor, labels: Tensor, canvas: tuple[int, int], config: PostprocessConfig
) -> Detections:
    """Class-wise NMS on ``[K, 4]`` xyxy canvas boxes, clipped to ``canvas`` (H, W); best ``max_detections``."""
    return finish([Candidates(boxes, scores, labels)], canvas, [config])[0]


def from_dense(
    boxes: Tensor, scores: Tensor, canvas: tuple[int, int], configs: list[PostprocessConfig]
) -> list[Detections]:
    """Detections from every location's boxes ``[B, N, 4]`` and scores ``[B, N, C]`` (a head's
    ``dense()``, or an exported graph's outputs): the heads' own candidate selection, then :func:`finish`."""
    candidates = []
    for image_boxes, image_scores, config in zip(boxes, scores, configs):
        kept, index, labels = select_candidates(image_scores, config.score_thresh, config.topk_candidates)
        candidates.append(Candidates(image_boxes[index], kept, labels))
    return finish(candidates, canvas, configs)
