"""TaskModel: one task's tuner + neck/head + label names; what the trainer optimises and the server caches."""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import Tensor, nn

from models.backbones.base import FrozenBackbone
from models.heads import DetectionHead, HeadOutputs, build_head, resolve_head_config
from models.postprocess import PostprocessConfig
from models.transform import ImageMeta, ImageTransform
from models.types import Detections, Target
from tuners.base import TUNERS, Tuner


class TaskModel(nn.Module):
    """Tuner + head for one task. State dict keys start with ``tuner.`` or ``head.``; no backbone tensors."""

    def __init__(self, method: str, tuner: Tuner, head: DetectionHead, labels: list[str], head_config: dict) -> None:
        super().__init__()
        self.method, self.tuner, self.head = method, tuner, head
        self.labels, self.head_config = list(labels), dict(head_config)
        self.generation = 0  # bumped when other weights are loaded into this object (the server reuses models)

    @property
    def architecture(self) -> str:
        """Models with equal architectures have tensors of equal names and shapes, and the same forward."""
        return architecture_key(self.method, self.tuner.config.to_dict(), self.head_config, len(self.labels))

    @property
    def kind(self) -> str:
        return self.tuner.kind

    def required_taps(self) -> list[str]:
        return self.tuner.required_taps()

    def taps(
        self, backbone: FrozenBackbone, images: Tensor, shared_taps: dict[str, Tensor] | None = None
    ) -> dict[str, Tensor]:
        """The taps this task reads for a ``[B, 3, S, S]`` canvas batch.

        Side tuners read ``shared_taps`` when given (one backbone pass for many tasks), else run
        the frozen backbone under ``no_grad``. Inline tuners always run their own pass.
        """
        if self.kind == "side":
            if shared_taps is not None:
                return shared_taps
            with torch.no_grad():
                return backbone(images, self.required_taps())
        return self.tuner.backbone_forward(backbone, images)

    def forward(
        self, backbone: FrozenBackbone, images: Tensor, shared_taps: dict[str, Tensor] | None = None
    ) -> HeadOutputs:
        """Head outputs for a ``[B, 3, S, S]`` canvas batch (see :meth:`taps`)."""
        return self.head_outputs(self.taps(backbone, images, shared_taps), images)

    def head_outputs(self, taps: dict[str, Tensor], images: Tensor) -> HeadOutputs:
        return self.head(self.tuner(taps, images if self.tuner.needs_images else None))

    def training_loss(
        self,
        backbone: FrozenBackbone,
        images: Tensor,
        targets: list[Target],
        progress: float = 0.0,
        shared_taps: dict[str, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """Named loss terms for one batch; ``progress`` in ``[0, 1]`` is the fraction of training done."""
        taps = self.taps(backbone, images, shared_taps)
        losses = self.head.loss(self.head_outputs(taps, images), targets)
        return {**losses, **self.tuner.auxiliary_losses(taps, images, targets, progress)}

    @torch.no_grad()
    def predict(
        self,
        backbone: FrozenBackbone,
        images: Tensor,
        metas: list[ImageMeta],
        config: PostprocessConfig,
        shared_taps: dict[str, Tensor] | None = None,
    ) -> list[Detections]:
        """Detections per image in **original-image** pixels (xyxy), for a ``[B, 3, S, S]`` canvas batch.

        The trainer's evaluation and the server call this same code.
        """
        canvas = (int(images.shape[-2]), int(images.shape[-1]))
        early = self.tuner.early_exit_predict(backbone, images, self.head, canvas, config)
        if early is not None:
            detections = early
        else:
            detections = self.head.predict(self(backbone, images, shared_taps), canvas, config)
        return [ImageTransform.to_original(det, meta) for det, meta in zip(detections, metas)]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]


def architecture_key(method: str, config: dict[str, Any], head_config: dict[str, Any], num_labels: int) -> str:
    """See :attr:`TaskModel.architecture`; computable from an artifact's manifest before building anything."""
    return json.dumps([method, config, resolve_head_config(head_config), num_labels], sort_keys=True)


def build_task_model(
    method: str,
    config: dict[str, Any],
    backbone: FrozenBackbone,
    labels: list[str],
    head_config: dict[str, Any] | None = None,
) -> TaskModel:
    """Builds a registered method's tuner and its head, sized from the tuner's output maps."""
    tuner_cls = TUNERS.get(method)
    extra = {"num_classes": len(labels)} if tuner_cls.needs_num_classes else {}
    tuner = tuner_cls(tuner_cls.config_cls.from_dict(config), backbone, **extra)
    head_config = resolve_head_config(head_config)
    options = {k: v for k, v in head_config.items() if k != "name"}
    head = build_head(head_config["name"], len(labels), tuner.out_channels, tuner.out_strides, **options)
    return TaskModel(method, tuner, head, labels, head_config)
