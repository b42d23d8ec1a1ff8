"""Frozen backbones. Importing this package registers every family."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from models.backbones import mobilenet, resnet, vit  # noqa: F401  (registration)
from models.backbones.base import BlockFn, FrozenBackbone, SequentialBackbone
from models.registry import BACKBONES


def build_backbone(name: str, *, weights: str | Path | None = None, **kwargs: Any) -> FrozenBackbone:
    """Builds registered backbone ``name``. See each builder for ``weights`` and options."""
    return BACKBONES.get(name)(weights=weights, **kwargs)


def list_backbones() -> list[str]:
    return BACKBONES.names()


__all__ = ["BlockFn", "FrozenBackbone", "SequentialBackbone", "build_backbone", "list_backbones"]
