"""torchvision's RetinaNet head (anchors, focal loss) over torchvision's FPN.

Reference: Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops import box_iou

from models.heads.base import DetectionHead, HeadOutputs
from models.heads.neck import TorchvisionFPN
from models.postprocess import Candidates, PostprocessConfig, select_candidates
from models.registry import HEADS
from models.types import Target

_RATIOS = (0.5, 1.0, 2.0)
_SCALES = (1.0, 2 ** (1 / 3), 2 ** (2 / 3))


def make_anchors(shapes: list[tuple[int, int]], strides: tuple[int, ...], size: float, device: torch.device) -> Tensor:
    """``[N, 4]`` xyxy anchors: location-major, 9 anchors (3 ratios x 3 scales) per location."""
    out = []
    for (h, w), s in zip(shapes, strides):
        base = []
        for ratio in _RATIOS:
            for scale in _SCALES:
                area = (size * s * scale) ** 2
                aw, ah = (area / ratio) ** 0.5, (area * ratio) ** 0.5
                base.append([-aw / 2, -ah / 2, aw / 2, ah / 2])
        ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
        centres = torch.stack([xs, ys, xs, ys], -1).reshape(-1, 1, 4).float().add(0.5).mul(s)
        out.append((centres + torch.tensor(base, device=device)[None]).reshape(-1, 4))
    return torch.cat(out)


@HEADS.register("retinanet")
class RetinaNetTorchvisionHead(DetectionHead):
    """``torchvision.models.detection.retinanet.RetinaNetHead`` with its own loss (focal + L1) and decoding.

    Args:
        anchor_size: anchor side at scale 1, in strides (4 gives 32/64/128 px at P3-P5).
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: list[int],
        in_strides: list[int],
        width: int = 128,
        anchor_size: float = 4.0,
    ) -> None:
        super().__init__(num_classes, in_channels, in_strides)
        self.neck = TorchvisionFPN(in_channels, in_strides, width, self.strides)
        self.head = RetinaNetHead(width, len(_RATIOS) * len(_SCALES), num_classes)
        self.anchor_size = anchor_size
        self.matcher = det_utils.Matcher(0.5, 0.4, allow_low_quality_matches=True)

    def forward(self, maps: list[Tensor]) -> HeadOutputs:
        levels = self.neck(maps)
        shapes = [(int(x.shape[-2]), int(x.shape[-1])) for x in levels]
        return HeadOutputs(dict(self.head(levels)), shapes)

    def _anchors(self, outputs: HeadOutputs) -> Tensor:
        device = outputs.tensors["cls_logits"].device
        return make_anchors(outputs.level_shapes, self.strides, self.anchor_size, device)

    def loss(self, outputs: HeadOutputs, targets: list[Target]) -> dict[str, Tensor]:
        anchors = self._anchors(outputs)
        matched = []
        for t in targets:
            if t.boxes.numel() == 0:
                matched.append(torch.full((anchors.shape[0],), -1, dtype=torch.long, device=anchors.device))
            else:
                matched.append(self.matcher(box_iou(t.boxes, anchors)))
        tv_targets = [{"boxes": t.boxes, "labels": t.labels} for t in targets]
        return self.head.compute_loss(tv_targets, outputs.tensors, [anchors] * len(targets), matched)

    def dense(self, outputs: HeadOutputs) -> tuple[Tensor, Tensor]:
        anchors = self._anchors(outputs)
        coder = self.head.regression_head.box_coder
        boxes = torch.stack([coder.decode_single(reg, anchors) for reg in outputs.tensors["bbox_regression"]])
        return boxes, outputs.tensors["cls_logits"].sigmoid()

    def candidates(self, outputs: HeadOutputs, configs: list[PostprocessConfig]) -> list[Candidates]:
        anchors = self._anchors(outputs)
        coder = self.head.regression_head.box_coder
        results = []
        for logits, reg, config in zip(outputs.tensors["cls_logits"], outputs.tensors["bbox_regression"], configs):
            s, idx, labels = select_candidates(logits.sigmoid(), config.score_thresh, config.topk_candidates)
            results.append(Candidates(coder.decode_single(reg[idx], anchors[idx]), s, labels))
        return results
