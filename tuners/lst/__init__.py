"""LST, Ladder Side-Tuning (Sung et al., NeurIPS 2022, arXiv 2206.06522). Shareable.

A narrow side network (width ``channels / reduction``) climbs a ladder of detached backbone taps:
after each side step, ``s = mu s + (1 - mu) Down(tap)``, ``mu = sigmoid(alpha / T)``, ``T = 0.1``,
``alpha = 0`` (reference code: ylsung/Ladder-Side-Tuning). CNN: one rung per residual block,
side steps are BasicBlocks at the side width (stride 2 where the backbone's stride doubles).
ViT: one rung per block ``z1..zL``, convolutional side steps on the stride-16 grid (our choice:
the paper's side transformer would need token layouts our heads do not read).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from models.backbones.base import FrozenBackbone
from tuners.base import Tuner, TunerConfig, option, register_tuner, tap_shapes
from tuners.layers import BasicSideBlock


@dataclass
class LSTConfig(TunerConfig):
    reduction: int = option(8, "side width = tap channels / reduction")
    min_width: int = option(8, "smallest side width")
    temperature: float = option(0.1, "gate temperature T in mu = sigmoid(alpha / T)")

    def validate(self) -> list[str]:
        return [] if self.reduction >= 1 and self.temperature > 0 else ["reduction >= 1 and temperature > 0"]


@register_tuner("lst", LSTConfig)
class LSTTuner(Tuner):
    kind = "side"

    def __init__(self, config: LSTConfig, backbone: FrozenBackbone) -> None:
        super().__init__(config, backbone)
        if backbone.family == "vit":
            self.rungs = [f"z{i}" for i in range(1, len(backbone.blocks) + 1)]
            self.outputs = [self.rungs[-1]]
        else:
            start = backbone.blocks_of_stage(backbone.stage_taps[0])[0]
            self.rungs = [
                f"b{d}" for d in range(max(start, 1), backbone.feature_spec[backbone.stage_taps[-1]].depth + 1)
            ]
            self.outputs = [f"b{backbone.feature_spec[t].depth}" for t in backbone.pyramid_taps]
        channels, strides = tap_shapes(backbone, self.rungs)
        widths = [max(config.min_width, c // config.reduction) for c in channels]
        self.down = nn.ModuleList(nn.Conv2d(c, w, 1) for c, w in zip(channels, widths))
        self.steps = nn.ModuleList(
            BasicSideBlock(widths[k - 1], widths[k], strides[k] // strides[k - 1]) for k in range(1, len(self.rungs))
        )
        self.alpha = nn.Parameter(torch.zeros(len(self.rungs)))
        index = {t: k for k, t in enumerate(self.rungs)}
        self.out_index = [index[t] for t in self.outputs]
        self.out_channels = [widths[k] for k in self.out_index]
        self.out_strides = [strides[k] for k in self.out_index]

    def required_taps(self) -> list[str]:
        return self.rungs

    def forward(self, taps: dict[str, Tensor], images: Tensor | None = None) -> list[Tensor]:
        s = self.down[0](taps[self.rungs[0]])
        states = [s]
        for k in range(1, len(self.rungs)):
            mu = torch.sigmoid(self.alpha[k] / self.config.temperature)
            s = mu * self.steps[k - 1](s) + (1 - mu) * self.down[k](taps[self.rungs[k]])
            states.append(s)
        return [states[k] for k in self.out_index]
