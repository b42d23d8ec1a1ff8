"""torchvision's FCOS head (GroupNorm conv towers) over torchvision's FPN: the accurate, costly option.

Reference: Tian et al., "FCOS: Fully Convolutional One-Stage Object Detection", ICCV 2019.
"""

from __future__ import annotations

from torch import Tensor
from torchvision.models.detection.fcos import FCOSHead

from models.heads.base import AnchorFreeHead, HeadOutputs
from models.heads.neck import TorchvisionFPN
from models.registry import HEADS


@HEADS.register("fcos")
class FCOSTorchvisionHead(AnchorFreeHead):
    """``torchvision.models.detection.fcos.FCOSHead`` with our FCOS assignment, loss and decoding.

    torchvision regresses l, t, r, b normalised by an anchor of one stride, so its outputs are
    in stride units, as :class:`AnchorFreeHead` expects.
    """

    def __init__(
        self, num_classes: int, in_channels: list[int], in_strides: list[int], width: int = 128, num_convs: int = 2
    ) -> None:
        super().__init__(num_classes, in_channels, in_strides)
        self.neck = TorchvisionFPN(in_channels, in_strides, width, self.strides)
        self.head = FCOSHead(width, num_anchors=1, num_classes=num_classes, num_convs=num_convs)

    def forward(self, maps: list[Tensor]) -> HeadOutputs:
        levels = self.neck(maps)
        shapes = [(int(x.shape[-2]), int(x.shape[-1])) for x in levels]
        return HeadOutputs(dict(self.head(levels)), shapes)
