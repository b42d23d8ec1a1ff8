"""Feature metadata: which taps a backbone exposes, with channels and stride for each."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class TapInfo:
    """One named intermediate output of a backbone.

    Attributes:
        channels: number of channels ``C`` of the ``[B, C, H/stride, W/stride]`` map.
        stride: input pixels per output pixel.
        depth: position of the block that produces it, in forward order (0 = first block).
    """

    channels: int
    stride: int
    depth: int


class FeatureSpec(Mapping[str, TapInfo]):
    """Ordered, validated mapping of tap name -> :class:`TapInfo` (timm ``FeatureInfo`` style).

    Every tap is a ``[B, C, H, W]`` float map. Depths never decrease along the order.
    """

    def __init__(self, taps: Mapping[str, TapInfo]) -> None:
        problems = []
        last_depth = -1
        for name, info in taps.items():
            if info.channels <= 0 or info.stride <= 0:
                problems.append(f"{name}: channels and stride must be positive, got {info}")
            if info.depth < last_depth:
                problems.append(f"{name}: depth {info.depth} comes after depth {last_depth}")
            last_depth = info.depth
        if problems:
            raise ValueError("invalid feature spec: " + "; ".join(problems))
        self._taps = dict(taps)

    def __getitem__(self, name: str) -> TapInfo:
        try:
            return self._taps[name]
        except KeyError:
            raise KeyError(f"unknown tap {name!r}; this backbone has {', '.join(self._taps)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._taps)

    def __len__(self) -> int:
        return len(self._taps)

    def deepest(self, names: list[str] | set[str] | tuple[str, ...]) -> int:
        """Depth of the deepest of ``names``; the backbone may stop after that block."""
        return max(self[n].depth for n in names)

    def to_dict(self) -> dict[str, dict[str, int]]:
        return {n: {"channels": t.channels, "stride": t.stride, "depth": t.depth} for n, t in self._taps.items()}
