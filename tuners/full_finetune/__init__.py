"""Full fine-tuning: the baseline for the benchmarks. Inline.

The task owns a trainable copy of the whole backbone (BatchNorm statistics stay frozen, as in
torchvision's detection backbones), so its artifact carries every backbone weight and says so
(``carries_backbone_copy`` in tuner.json). The shared backbone is never touched.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from torch import Tensor

from models.backbones.base import FrozenBackbone
from tuners.base import Tuner, TunerConfig, register_tuner, tap_shapes


@dataclass
class FullFinetuneConfig(TunerConfig):
    """No options."""


@register_tuner("full_finetune", FullFinetuneConfig)
class FullFinetuneTuner(Tuner):
    kind = "inline"
    carries_backbone_copy = True  # the artifact holds every backbone weight

    def __init__(self, config: FullFinetuneConfig, backbone: FrozenBackbone) -> None:
        super().__init__(config, backbone)
        self.trunk = copy.deepcopy(backbone)
        for p in self.trunk.parameters():
            p.requires_grad_(True)
        self.taps = list(backbone.pyramid_taps)
        self.out_channels, self.out_strides = tap_shapes(backbone, self.taps)

    def required_taps(self) -> list[str]:
        return self.taps

    def backbone_forward(self, backbone: FrozenBackbone, images: Tensor) -> dict[str, Tensor]:
        return self.trunk(images, self.taps)

    def forward(self, taps: dict[str, Tensor], images: Tensor | None = None) -> list[Tensor]:
        return [taps[t] for t in self.taps]
