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

    def forward(self, taps: dict[str, Tensor], images: Tensor | None = None) -> list[Tensor]:
        assert images is not None, "side_tuning reads the image"
        side, x = [], images
        for conv in self.side:
            x = conv(x)
            side.append(x)  # strides 2, 4, 8, 16, 32
        out = []
        for i, (tap, stride) in enumerate(zip(self.taps, self.out_strides)):
            a = torch.sigmoid(self.alpha[i])
            out.append(a * taps[tap] + (1 - a) * self.proj[i](side[int(math.log2(stride)) - 1]))
        return out
