"""Linear probing: the frozen backbone's pyramid taps feed a trainable neck and head. Shareable."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from models.backbones.base import FrozenBackbone
from tuners.base import Tuner, TunerConfig, register_tuner, tap_shapes


@dataclass
class LinearProbeConfig(TunerConfig):
    """No options: only the neck and head train."""


@register_tuner("linear_probe", LinearProbeConfig)
class LinearProbeTuner(Tuner):
    """The mandatory baseline ("Fixed" in the PETL literature): no tuner parameters at all."""

    kind = "side"

    def __init__(self, config: LinearProbeConfig, backbone: FrozenBackbone) -> None:
        super().__init__(config, backbone)
        self.taps = list(backbone.pyramid_taps)
        self.out_channels, self.out_strides = tap_shapes(backbone, self.taps)

    def required_taps(self) -> list[str]:
        return self.taps

    def forward(self, taps: dict[str, Tensor], images: Tensor | None = None) -> list[Tensor]:
        return [taps[t] for t in self.taps]
