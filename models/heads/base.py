"""Detection head interface and the FCOS-style anchor-free target assignment, loss and decoding.

Reference: Tian et al., "FCOS: Fully Convolutional One-Stage Object Detection", ICCV 2019.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from models.postprocess import Candidates, PostprocessConfig, finish, select_candidates
from models.types import Detections, Target

STRIDES = (8, 16, 32)


@dataclass
class HeadOutputs:
    """Raw head outputs, locations concatenated over levels (level-major, then row-major).

    Attributes:
        tensors: e.g. ``cls_logits [B, N, C]``, ``bbox_regression [B, N, 4]``, ``bbox_ctrness [B, N, 1]``.
        level_shapes: ``(H_l, W_l)`` of each level, so that ``N = sum(H_l * W_l * anchors)``.
    """

    tensors: dict[str, Tensor]
    level_shapes: list[tuple[int, int]]


class DetectionHead(nn.Module):
    """Neck + dense head for one task. Subclasses provide ``forward``, ``loss`` and ``predict``.

    Args:
        num_classes: number of foreground classes.
        in_channels: channels of each input map.
        in_strides: stride of each input map.
    """

    strides: tuple[int, ...] = STRIDES

    def __init__(self, num_classes: int, in_channels: list[int], in_strides: list[int]) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if len(in_channels) != len(in_strides) or not in_channels:
            raise ValueError(f"need one stride per input map, got {in_channels} and {in_strides}")
        self.num_classes = num_classes

    def forward(self, maps: list[Tensor]) -> HeadOutputs:
        raise NotImplementedError

    def loss(self, outputs: HeadOutputs, targets: list[Target]) -> dict[str, Tensor]:
        raise NotImplementedError

    def candidates(self, outputs: HeadOutputs, configs: list[PostprocessConfig]) -> list[Candidates]:
        """Scored boxes per image before NMS, in canvas pixels; ``configs`` has one entry per image."""
        raise NotImplementedError

    def dense(self, outputs: HeadOutputs) -> tuple[Tensor, Tensor]:
        """Every location's decoded box and class scores, before any threshold: boxes ``[B, N, 4]``
        xyxy canvas pixels, scores ``[B, N, C]`` in ``[0, 1]``. What ``server-export`` graphs end with."""
        raise NotImplementedError

    def predict(self, outputs: HeadOutputs, canvas: tuple[int, int], config: PostprocessConfig) -> list[Detections]:
        """Detections per image, in canvas pixels (``canvas`` is ``(H, W)``)."""
        configs = [config] * int(next(iter(outputs.tensors.values())).shape[0])
        return finish(self.candidates(outputs, configs), canvas, configs)


def level_points(
    shapes: list[tuple[int, int]], strides: tuple[int, ...], device: torch.device
) -> tuple[Tensor, Tensor]:
    """Location centres ``[N, 2]`` (x, y in canvas pixels) and their strides ``[N]``."""
    points, point_strides = [], []
    for (h, w), s in zip(shapes, strides):
        ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
        points.append(torch.stack([xs.flatten(), ys.flatten()], 1).float().add(0.5).mul(s))
        point_strides.append(torch.full((h * w,), float(s), device=device))
    return torch.cat(points), torch.cat(point_strides)


@functools.lru_cache(maxsize=64)
def _inference_points(
    shapes: tuple[tuple[int, int], ...], strides: tuple[int, ...], device: torch.device
) -> tuple[Tensor, Tensor]:
    with torch.inference_mode():
        return level_points(list(shapes), strides, device)


def serving_points(
    shapes: list[tuple[int, int]], strides: tuple[int, ...], device: torch.device
) -> tuple[Tensor, Tensor]:
    """:func:`level_points`, made once per (shapes, strides, device) when no gradient is recorded.

    A served batch decodes every task's outputs at the same few canvas shapes, so the grids are
    built once instead of once per task and batch. The cached tensors are inference tensors, read
    only; with gradients on (training) they are built fresh, since autograd cannot save them.
    """
    if torch.is_grad_enabled():
        return level_points(shapes, strides, device)
    return _inference_points(tuple(tuple(s) for s in shapes), tuple(strides), device)


def _size_ranges(point_strides: Tensor, strides: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """FCOS regression ranges: level i takes boxes whose largest l/t/r/b is in ``(4 s_i, 4 s_{i+1}]``.

    For strides 8/16/32 that is (0, 64], (64, 128], (128, inf), as in the paper.
    """
    lo = torch.zeros_like(point_strides)
    hi = torch.full_like(point_strides, math.inf)
    for i, s in enumerate(strides):
        at = point_strides == s
        if i > 0:
            lo[at] = 4.0 * s
        if i + 1 < len(strides):
            hi[at] = 4.0 * strides[i + 1]
    return lo, hi


def assign_fcos(
    points: Tensor, point_strides: Tensor, strides: tuple[int, ...], target: Target, radius: float = 1.5
) -> tuple[Tensor, Tensor]:
    """Matches each location to the smallest box that contains it (centre sampling, size ranges).

    Returns:
        (labels ``[N]`` with -1 for background, matched boxes ``[N, 4]`` xyxy canvas pixels).
    """
    n = points.shape[0]
    if target.boxes.numel() == 0:
        return torch.full((n,), -1, dtype=torch.long, device=points.device), points.new_zeros(n, 4)
    boxes = target.boxes
    x, y = points[:, 0:1], points[:, 1:2]
    ltrb = torch.stack([x - boxes[:, 0], y - boxes[:, 1], boxes[:, 2] - x, boxes[:, 3] - y], dim=2)  # [N, G, 4]
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    reach = point_strides[:, None] * radius
    near_centre = ((x - centres[:, 0]).abs() < reach) & ((y - centres[:, 1]).abs() < reach)
    lo, hi = _size_ranges(point_strides, strides)
    largest = ltrb.max(dim=2).values
    ok = (ltrb.min(dim=2).values > 0) & near_centre & (largest > lo[:, None]) & (largest <= hi[:, None])
    area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))[None].expand(n, -1).clone()
    area[~ok] = math.inf
    best_area, best = area.min(dim=1)
    labels = torch.where(torch.isfinite(best_area), target.labels[best], torch.full_like(best, -1))
    return labels, boxes[best]


def decode_ltrb(points: Tensor, point_strides: Tensor, ltrb: Tensor) -> Tensor:
    """``[..., N, 4]`` distances in stride units -> ``[..., N, 4]`` xyxy canvas boxes."""
    d = ltrb * point_strides[:, None]
    return torch.cat([points - d[..., :2], points + d[..., 2:]], dim=-1)


class AnchorFreeHead(DetectionHead):
    """FCOS loss (focal + GIoU + centerness) and decoding over ``cls_logits``, ``bbox_regression``
    (l, t, r, b in stride units) and ``bbox_ctrness``."""

    def loss(self, outputs: HeadOutputs, targets: list[Target]) -> dict[str, Tensor]:
        cls_logits = outputs.tensors["cls_logits"]
        reg, ctr = outputs.tensors["bbox_regression"], outputs.tensors["bbox_ctrness"].squeeze(-1)
        points, point_strides = level_points(outputs.level_shapes, self.strides, cls_logits.device)
        assigned = [assign_fcos(points, point_strides, self.strides, t) for t in targets]
        labels = torch.stack([a[0] for a in assigned])  # [B, N]
        gt_boxes = torch.stack([a[1] for a in assigned])  # [B, N, 4]
        pos = labels >= 0
        num_pos = max(1.0, float(pos.sum()))
        cls_target = torch.zeros_like(cls_logits)
        cls_target[pos, labels[pos]] = 1.0
        loss_cls = sigmoid_focal_loss(cls_logits, cls_target, reduction="sum") / num_pos
        pred_boxes = decode_ltrb(points, point_strides, reg)
        if not pos.any():
            zero = reg.sum() * 0.0 + ctr.sum() * 0.0
            return {"classification": loss_cls, "bbox_regression": zero, "bbox_ctrness": zero}
        gt = gt_boxes[pos]
        p = points[None].expand_as(pred_boxes[..., :2])[pos]
        lr = torch.stack([p[:, 0] - gt[:, 0], gt[:, 2] - p[:, 0]], 1)
        tb = torch.stack([p[:, 1] - gt[:, 1], gt[:, 3] - p[:, 1]], 1)
        ctr_target = torch.sqrt((lr.min(1).values / lr.max(1).values) * (tb.min(1).values / tb.max(1).values))
        loss_box = generalized_box_iou_loss(pred_boxes[pos], gt, reduction="sum") / num_pos
        loss_ctr = F.binary_cross_entropy_with_logits(ctr[pos], ctr_target, reduction="sum") / num_pos
        return {"classification": loss_cls, "bbox_regression": loss_box, "bbox_ctrness": loss_ctr}

    def dense(self, outputs: HeadOutputs) -> tuple[Tensor, Tensor]:
        cls_logits = outputs.tensors["cls_logits"]
        points, point_strides = level_points(outputs.level_shapes, self.strides, cls_logits.device)
        boxes = decode_ltrb(points, point_strides, outputs.tensors["bbox_regression"])
        return boxes, torch.sqrt(cls_logits.sigmoid() * outputs.tensors["bbox_ctrness"].sigmoid())

    def candidates(self, outputs: HeadOutputs, configs: list[PostprocessConfig]) -> list[Candidates]:
        cls_logits = outputs.tensors["cls_logits"]
        points, point_strides = serving_points(outputs.level_shapes, self.strides, cls_logits.device)
        scores_all = torch.sqrt(cls_logits.sigmoid() * outputs.tensors["bbox_ctrness"].sigmoid())
        results = []
        for scores, reg, config in zip(scores_all, outputs.tensors["bbox_regression"], configs):
            s, idx, labels = select_candidates(scores, config.score_thresh, config.topk_candidates)
            results.append(Candidates(decode_ltrb(points[idx], point_strides[idx], reg[idx]), s, labels))
        return results


def flatten_levels(per_level: list[Tensor]) -> Tensor:
    """``[B, K, H_l, W_l]`` per level -> ``[B, sum(H_l * W_l), K]``."""
    return torch.cat([x.flatten(2).transpose(1, 2) for x in per_level], dim=1)
