"""Shared machinery of inline tuners that replace some backbone tensors for their own pass."""

from __future__ import annotations

from torch import Tensor
from torch.func import functional_call

from models.backbones.base import FrozenBackbone


def run_with_tensors(backbone: FrozenBackbone, tensors: dict[str, Tensor], images: Tensor, taps: list[str]) -> dict:
    """Runs ``backbone`` with some parameters or buffers replaced by this task's tensors.

    ``functional_call`` swaps them in for the call and restores the shared tensors afterwards, so
    the shared backbone is never changed. The engine and the trainer run one pass at a time.
    """
    return functional_call(backbone, tensors, (images, taps), strict=False)


def key(name: str) -> str:
    """Module paths contain dots, which parameter containers refuse."""
    return name.replace(".", "__")
