"""The default head: depthwise-separable towers shared across levels, on a slim FPN (P3-P5).

In the style of NanoDet, PicoDet and SSDLite: every task in a fan-out request pays for its head
again, so it must cost a small fraction of a backbone pass (see ``bench/head_cost.py``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from models.heads.base import AnchorFreeHead, HeadOutputs, flatten_levels
from models.heads.neck import LightFPN
from models.registry import HEADS


def _gn(channels: int) -> nn.GroupNorm:
    """GroupNorm, not BatchNorm: the tower is shared by levels whose statistics differ."""
    groups = next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


def dw_separable_gn(channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False),
        nn.Conv2d(channels, channels, 1, bias=False),
        _gn(channels),
        nn.ReLU(inplace=True),
    )


@HEADS.register("light")
class LightHead(AnchorFreeHead):
    """Slim FPN + one shared depthwise tower + 1x1 predictors; FCOS targets and loss.

    Args:
        num_classes: foreground classes.
        in_channels: channels of the tuner's maps.
        in_strides: strides of the tuner's maps.
        width: channels of the FPN and tower (about 96).
        num_convs: depthwise-separable units in the tower.
        prior_prob: initial foreground probability of the classifier.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: list[int],
        in_strides: list[int],
        width: int = 96,
        num_convs: int = 2,
        prior_prob: float = 0.01,
    ) -> None:
        super().__init__(num_classes, in_channels, in_strides)
        self.neck = LightFPN(in_channels, in_strides, width, self.strides)
        self.tower = nn.Sequential(*(dw_separable_gn(width) for _ in range(num_convs)))
        # One 1x1 conv predicts class logits, l/t/r/b and centerness together: [C | 4 | 1] channels.
        self.predictor = nn.Conv2d(width, num_classes + 5, 1)
        self.scales = nn.Parameter(torch.ones(len(self.strides)))
        nn.init.normal_(self.predictor.weight, std=0.01)
        nn.init.zeros_(self.predictor.bias)
        nn.init.constant_(self.predictor.bias[:num_classes], -math.log((1 - prior_prob) / prior_prob))

    def forward(self, maps: list[Tensor]) -> HeadOutputs:
        cls, reg, ctr = [], [], []
        for i, level in enumerate(self.neck(maps)):
            logits, box, centerness = self.predictor(self.tower(level)).split([self.num_classes, 4, 1], dim=1)
            cls.append(logits)
            reg.append(torch.relu(box * self.scales[i]))
            ctr.append(centerness)
        shapes = [(int(c.shape[-2]), int(c.shape[-1])) for c in cls]
        tensors = {
            "cls_logits": flatten_levels(cls),
            "bbox_regression": flatten_levels(reg),
            "bbox_ctrness": flatten_levels(ctr),
        }
        return HeadOutputs(tensors, shapes)
