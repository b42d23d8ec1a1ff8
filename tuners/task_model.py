"""TaskModel: one task's tuner + neck/head + label names; what the trainer optimises and the server caches."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from models.backbones.base import FrozenBackbone
from models.heads import DetectionHead, HeadOutputs, build_head
from models.postprocess import PostprocessConfig
from models.types import Detections, Target
from tuners.base import TUNERS, Tuner


class TaskModel(nn.Module):
    """Tuner + head for one task. State dict keys start with ``tuner.`` or ``head.``; no backbone tensors."""

    def __init__(self, method: str, tuner: Tuner, head: DetectionHead, labels: list[str], head_config: dict) -> None:
        super().__init__()
        self.method, self.tuner, self.head = method, tuner, head
        self.labels, self.head_config = list(labels), dict(head_config)

    @property
    def kind(self) -> str:
        return self.tuner.kind

    def required_taps(self) -> list[str]:
        return self.tuner.required_taps()

    def forward(
        self, backbone: FrozenBackbone, images: Tensor, shared_taps: dict[str, Tensor] | None = None
    ) -> HeadOutputs:
        """Head outputs for a ``[B, 3, S, S]`` canvas batch.

        Side tuners read ``shared_taps`` when given (one backbone pass for many tasks), else run
        the frozen backbone under ``no_grad``. Inline tuners always run their own pass.
        """
        if self.kind == "side":
            if shared_taps is None:
                with torch.no_grad():
                    shared_taps = backbone(images, self.required_taps())
            taps = shared_taps
        else:
            taps = self.tuner.backbone_forward(backbone, images)
        return self.head(self.tuner(taps, images if self.tuner.needs_images else None))

    def loss(self, outputs: HeadOutputs, targets: list[Target]) -> dict[str, Tensor]:
        return self.head.loss(outputs, targets)

    def detect(self, outputs: HeadOutputs, canvas: tuple[int, int], config: PostprocessConfig) -> list[Detections]:
        return self.head.predict(outputs, canvas, config)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]


def build_task_model(
    method: str,
    config: dict[str, Any],
    backbone: FrozenBackbone,
    labels: list[str],
    head_config: dict[str, Any] | None = None,
) -> TaskModel:
    """Builds a registered method's tuner and its head, sized from the tuner's output maps."""
    tuner_cls = TUNERS.get(method)
    tuner = tuner_cls(tuner_cls.config_cls.from_dict(config), backbone)
    head_config = {"name": "light", **(head_config or {})}
    options = {k: v for k, v in head_config.items() if k != "name"}
    head = build_head(head_config["name"], len(labels), tuner.out_channels, tuner.out_strides, **options)
    return TaskModel(method, tuner, head, labels, head_config)
