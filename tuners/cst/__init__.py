"""CST, Calibration Side-Tuning (Feng Chen, arXiv 2402.12736), read-only form. Shareable.

The paper's side network and its "maximal transition calibration" (MTC) formula could not be
retrieved (TUNERS.md, section 10.1). What we chose:

- side widths ``w_i = max(min_width, c_i / reduction)``; lateral ``L_i`` (1x1 + BN) from each stage
  tap; ``s_1 = B_1(L_1(c2))``, ``s_i = B_i(L_i(c_i) + D_i(s_{i-1}))`` with ``D_i`` a 3x3 stride-2 conv + BN;
  ``B_i`` two depthwise-separable residual units;
- calibration ``F_i = c_i + lambda_i * U_i(s_i)`` with ``U_i`` a zero-initialised 1x1 conv and a per-channel
  transition coefficient ``lambda_i = tanh(beta_i)``. The spec starts ``beta`` at 0, but with ``U`` and
  ``lambda`` both zero no gradient reaches either, so ``beta`` starts at ``lambda_init`` (1.0):
  the tuner still starts exactly at the frozen backbone because ``U`` is zero;
- ablations: ``max`` (``max(c, c + U(s))``) and ``gate`` (``mu c + (1 - mu) U(s)``, ``mu = sigmoid(alpha / 0.1)``).

Calibrated maps go to the head only and never re-enter the backbone, which is what makes it shareable.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from models.backbones.base import FrozenBackbone
from tuners.base import Tuner, TunerConfig, option, register_tuner, require_cnn, tap_shapes
from tuners.layers import DWResidual, conv_bn


@dataclass
class CSTConfig(TunerConfig):
    reduction: int = option(8, "side width = max(min_width, stage channels / reduction)")
    min_width: int = option(32, "smallest side width")
    calibration: str = option("mtc", "mtc | max | gate")
    lambda_init: float = option(1.0, "initial beta of lambda = tanh(beta) (mtc)")

    def validate(self) -> list[str]:
        problems = [] if self.calibration in ("mtc", "max", "gate") else ["calibration must be mtc, max or gate"]
        return problems + ([] if self.reduction >= 1 and self.min_width >= 1 else ["reduction, min_width >= 1"])


@register_tuner("cst", CSTConfig)
class CSTTuner(Tuner):
    kind = "side"

    def __init__(self, config: CSTConfig, backbone: FrozenBackbone) -> None:
        super().__init__(config, backbone)
        require_cnn(backbone, "cst")
        self.stages = list(backbone.stage_taps)
        channels, strides = tap_shapes(backbone, self.stages)
        widths = [max(config.min_width, c // config.reduction) for c in channels]
        self.lateral = nn.ModuleList(conv_bn(c, w) for c, w in zip(channels, widths))
        self.down = nn.ModuleList(conv_bn(a, b, 3, 2) for a, b in zip(widths[:-1], widths[1:]))
        self.body = nn.ModuleList(nn.Sequential(DWResidual(w), DWResidual(w)) for w in widths)
        self.outputs = self.stages[1:]  # c3..c5 go to the head
        self.up = nn.ModuleList(nn.Conv2d(w, c, 1) for w, c in zip(widths[1:], channels[1:]))
        for up in self.up:
            nn.init.zeros_(up.weight)
            nn.init.zeros_(up.bias)
        self.beta = nn.ParameterList(nn.Parameter(torch.full((c, 1, 1), config.lambda_init)) for c in channels[1:])
        self.out_channels, self.out_strides = channels[1:], strides[1:]

    def required_taps(self) -> list[str]:
        return self.stages

    def side_maps(self, taps: dict[str, Tensor], images: Tensor | None = None) -> list[tuple[Tensor, Tensor]]:
        """``(c_i, s_i)`` for c3..c5: each tap ``[B, C_i, h, w]`` and the side map ``[B, w_i, h, w]``
        that calibrates it."""
        s = self.body[0](self.lateral[0](taps[self.stages[0]]))
        pairs = []
        for i, stage in enumerate(self.stages[1:], start=1):
            s = self.body[i](self.lateral[i](taps[stage]) + self.down[i - 1](s))
            pairs.append((taps[stage], s))
        return pairs

    def calibrate(self, i: int, c: Tensor, s: Tensor) -> Tensor:
        """Output ``i``: tap ``c`` calibrated by side map ``s`` (``[B, C_i, h, w]``)."""
        u, mode = self.up[i](s), self.config.calibration
        if mode == "mtc":
            return c + torch.tanh(self.beta[i]) * u
        if mode == "max":
            return torch.maximum(c, c + u)
        mu = torch.sigmoid(self.beta[i] / 0.1)
        return mu * c + (1 - mu) * u

    def calibration_affine(self, i: int) -> tuple[Tensor, Tensor, Tensor] | None:
        """Output ``i`` as ``F = d * c + M s + m`` per position: ``(d [C_i], M [C_i, w_i], m [C_i])``, with
        ``d`` ones, under ``mtc``; None under the nonlinear ``max`` and ``gate``. Compiled graphs fold
        it into the head (:mod:`tuners.fold`)."""
        if self.config.calibration != "mtc":
            return None
        lam, up = torch.tanh(self.beta[i]).flatten(), self.up[i]
        return torch.ones_like(lam), lam[:, None] * up.weight.flatten(1), lam * up.bias

    def forward(self, taps: dict[str, Tensor], images: Tensor | None = None) -> list[Tensor]:
        return [self.calibrate(i, c, s) for i, (c, s) in enumerate(self.side_maps(taps, images))]
