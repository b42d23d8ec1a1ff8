"""Necks: a slim depthwise FPN (default) and torchvision's FPN, both fed maps at any strides.

A ViT gives one stride-16 map; missing pyramid levels are then made ViTDet-style (2x2
transposed convs up, max-pool down) before the lateral convolutions.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import FeaturePyramidNetwork


def conv_bn_act(cin: int, cout: int, k: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def dw_separable(channels: int) -> nn.Sequential:
    """3x3 depthwise then 1x1 pointwise, each with BatchNorm and ReLU."""
    return nn.Sequential(conv_bn_act(channels, channels, 3, groups=channels), conv_bn_act(channels, channels, 1))


class Resample(nn.Module):
    """Changes a map's stride by a power of two: transposed 2x2 convs up, 2x2 max-pools down."""

    def __init__(self, channels: int, factor: float) -> None:
        super().__init__()
        steps = round(math.log2(factor))
        if abs(2**steps - factor) > 1e-6:
            raise ValueError(f"strides must differ by a power of two, got a factor {factor}")
        layers: list[nn.Module] = []
        for _ in range(max(0, -steps)):
            layers.append(nn.ConvTranspose2d(channels, channels, 2, stride=2))
        for _ in range(max(0, steps)):
            layers.append(nn.MaxPool2d(2))
        self.body = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


class LevelSelect(nn.Module):
    """Maps the input maps onto ``out_strides``: each level takes the input of nearest stride, resampled."""

    def __init__(self, in_channels: list[int], in_strides: list[int], out_strides: tuple[int, ...]) -> None:
        super().__init__()
        self.sources = [
            min(range(len(in_strides)), key=lambda i: abs(math.log2(in_strides[i] / s))) for s in out_strides
        ]
        self.resample = nn.ModuleList(
            Resample(in_channels[i], s / in_strides[i]) for i, s in zip(self.sources, out_strides)
        )
        self.out_channels = [in_channels[i] for i in self.sources]

    def forward(self, maps: list[Tensor]) -> list[Tensor]:
        return [r(maps[i]) for i, r in zip(self.sources, self.resample)]


class LightFPN(nn.Module):
    """1x1 laterals to ``width`` and a nearest-neighbour top-down sum; P3..P5 (strides 8/16/32)."""

    def __init__(
        self, in_channels: list[int], in_strides: list[int], width: int, out_strides: tuple[int, ...]
    ) -> None:
        super().__init__()
        self.select = LevelSelect(in_channels, in_strides, out_strides)
        self.laterals = nn.ModuleList(conv_bn_act(c, width, 1, act=False) for c in self.select.out_channels)

    def forward(self, maps: list[Tensor]) -> list[Tensor]:
        """``maps``: ``[B, C_i, H_i, W_i]`` at ``in_strides`` -> ``[B, width, H/s, W/s]`` per out stride."""
        levels = [lat(x) for lat, x in zip(self.laterals, self.select(maps))]
        for i in range(len(levels) - 2, -1, -1):
            levels[i] = levels[i] + F.interpolate(levels[i + 1], size=levels[i].shape[-2:], mode="nearest")
        return levels


class TorchvisionFPN(nn.Module):
    """``torchvision.ops.FeaturePyramidNetwork`` behind the same interface as :class:`LightFPN`."""

    def __init__(
        self, in_channels: list[int], in_strides: list[int], width: int, out_strides: tuple[int, ...]
    ) -> None:
        super().__init__()
        self.select = LevelSelect(in_channels, in_strides, out_strides)
        self.fpn = FeaturePyramidNetwork(self.select.out_channels, width)

    def forward(self, maps: list[Tensor]) -> list[Tensor]:
        out = self.fpn({str(i): x for i, x in enumerate(self.select(maps))})
        return list(out.values())
