"""Detection heads (neck + dense head + loss + decoding). Importing registers every head."""

from __future__ import annotations

from typing import Any

from models.heads import fcos, light, retinanet  # noqa: F401  (registration)
from models.heads.base import DetectionHead, HeadOutputs
from models.registry import HEADS


def build_head(
    name: str, num_classes: int, in_channels: list[int], in_strides: list[int], **options: Any
) -> DetectionHead:
    """Builds registered head ``name`` (``light`` by default elsewhere; ``fcos``, ``retinanet``)."""
    return HEADS.get(name)(num_classes, in_channels, in_strides, **options)


def list_heads() -> list[str]:
    return HEADS.names()


__all__ = ["DetectionHead", "HeadOutputs", "build_head", "list_heads"]
