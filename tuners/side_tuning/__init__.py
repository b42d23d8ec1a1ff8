"""Side-Tuning (Zhang et al., arXiv 1912.13503): a small side network on the raw image,
alpha-blended with the frozen backbone's maps. Shareable: the backbone pass is untouched.

Reference code: jozhang97/side-tuning (``merge_operators.Alpha``: sigma(a) base + (1 - sigma(a)) side,
a initialised to 0). The paper has no detection setting; our choice is a 5-layer stride-2 FCN whose
stride-s output is projected (1x1) onto each pyramid tap of stride s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from models.backbones.base import FrozenBackbone
from tuners.base import Tuner, TunerConfig, option, register_tuner, tap_shapes
from tuners.layers import conv_bn


@dataclass
class SideTuningConfig(TunerConfig):
    widths: tuple[int, ...] = option(
        (16, 32, 64, 96, 128), "channels of the side FCN's stride-2 convs (strides 2..32)"
    )

    def validate(self) -> list[str]:
        return [] if len(self.widths) == 5 and min(self.widths) > 0 else ["widths needs 5 positive values"]


@register_tuner("side_tuning", SideTuningConfig)
class SideTuningTuner(Tuner):
    kind = "side"
    needs_images = True

    def __init__(self, config: SideTuningConfig, backbone: FrozenBackbone) -> None:
        super().__init__(config, backbone)
        self.taps = list(backbone.pyramid_taps)
        self.out_channels, self.out_strides = tap_shapes(backbone, self.taps)
        widths = list(config.widths)
        self.side = nn.ModuleList(conv_bn(c_in, c_out, 3, 2, act=True) for c_in, c_out in zip([3] + widths, widths))
        self.proj = nn.ModuleList(
            nn.Conv2d(widths[int(math.log2(s)) - 1], c, 1) for c, s in zip(self.out_channels, self.out_strides)
        )
        self.alpha = nn.Parameter(torch.zeros(len(self.taps)))

    def required_taps(self) -> list[str]:
        return self.taps

    def side_maps(self, taps: dict[str, Tensor], images: Tensor | None = None) -> list[tuple[Tensor, Tensor]]:
        """``(c_i, s_i)`` per pyramid tap: the tap ``[B, C_i, h, w]`` and the side FCN's map of its stride."""
        assert images is not None, "side_tuning reads the image"
        side, x = [], images
        for conv in self.side:
            x = conv(x)
            side.append(x)  # strides 2, 4, 8, 16, 32
        return [(taps[t], side[int(math.log2(s)) - 1]) for t, s in zip(self.taps, self.out_strides)]

    def calibrate(self, i: int, c: Tensor, s: Tensor) -> Tensor:
        """Output ``i``: ``sigmoid(alpha_i) c + (1 - sigmoid(alpha_i)) proj_i(s)``."""
        a = torch.sigmoid(self.alpha[i])
        return a * c + (1 - a) * self.proj[i](s)

    def calibration_affine(self, i: int) -> tuple[Tensor, Tensor, Tensor]:
        """Output ``i`` as ``F = d * c + M s + m`` per position: ``(d [C_i], M [C_i, w], m [C_i])``."""
        a, proj = torch.sigmoid(self.alpha[i]), self.proj[i]
        return a.expand(proj.out_channels), (1 - a) * proj.weight.flatten(1), (1 - a) * proj.bias

    def forward(self, taps: dict[str, Tensor], images: Tensor | None = None) -> list[Tensor]:
        return [self.calibrate(i, c, s) for i, (c, s) in enumerate(self.side_maps(taps, images))]
