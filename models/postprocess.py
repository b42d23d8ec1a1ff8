"""Turn per-location candidates into final detections: threshold, top-k, batched NMS, clip."""

from __future__ import annotations

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


def nms_and_clip(
    boxes: Tensor, scores: Tensor, labels: Tensor, canvas: tuple[int, int], config: PostprocessConfig
) -> Detections:
    """Class-wise NMS on ``[K, 4]`` xyxy canvas boxes, clipped to ``canvas`` (H, W); best ``max_detections``."""
    boxes = clip_boxes_to_image(boxes, canvas)
    keep = batched_nms(boxes, scores, labels, config.nms_thresh)[: config.max_detections]
    return Detections(boxes=boxes[keep], scores=scores[keep], labels=labels[keep])
