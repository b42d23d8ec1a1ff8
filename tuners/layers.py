"""Small blocks shared by several methods."""

from __future__ import annotations

from torch import Tensor, nn


def conv_bn(cin: int, cout: int, k: int = 1, stride: int = 1, groups: int = 1, act: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class DWResidual(nn.Module):
    """x + ReLU(BN(pointwise(depthwise3x3(x))))."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False),
            conv_bn(channels, channels, 1, act=True),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class BasicSideBlock(nn.Module):
    """A ResNet BasicBlock from ``cin`` to ``cout`` channels with ``stride``; 1x1 shortcut when shapes change."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(conv_bn(cin, cout, 3, stride, act=True), conv_bn(cout, cout, 3))
        self.shortcut = nn.Identity() if cin == cout and stride == 1 else conv_bn(cin, cout, 1, stride)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.body(x) + self.shortcut(x))


def zero_init_gn(channels: int) -> nn.GroupNorm:
    """GroupNorm whose scale starts at 0, so ``x + norm(h)`` starts exactly at ``x``."""
    groups = next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0)
    norm = nn.GroupNorm(groups, channels)
    nn.init.zeros_(norm.weight)
    return norm
