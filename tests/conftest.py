"""Shared fixtures: the real offline mobilenet_v2, small random backbones, real photos. No network."""

from __future__ import annotations

import pytest
import torch

from models import FrozenBackbone, PreprocessSpec, build_backbone

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def mobilenet() -> FrozenBackbone:
    """The real ImageNet mobilenet_v2, resolved offline, on a 128 px canvas."""
    return build_backbone("mobilenet_v2", allow_download=False, preprocess=PreprocessSpec(size=128))


SMALL = PreprocessSpec(size=64)


def small_backbone(name: str) -> FrozenBackbone:
    """Small random backbones for structure tests (seeded, so fingerprints are stable)."""
    if name == "mobilenet_v2":
        return build_backbone(name, weights="random", width_mult=0.25, preprocess=SMALL)
    if name == "vit_b_16":
        return build_backbone(
            name, weights="random", num_layers=12, num_heads=2, hidden_dim=32, mlp_dim=64, preprocess=SMALL
        )
    return build_backbone(name, weights="random", preprocess=SMALL)
