"""Shared fixtures: the real offline mobilenet_v2, small random backbones, real photos. No network."""

from __future__ import annotations

import copy

import pytest
import torch

from models import FrozenBackbone, PreprocessSpec, build_backbone
from models.runtime.torch import set_float32_precision

torch.set_num_threads(2)

# The CUDA path, as torchvision tests it: the same tests on both devices, CUDA's skipped without a
# GPU. `make bench-gpu`'s machine runs them with `pytest -k cuda` (docs/BENCHMARKS.md, GPU section).
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=needs_cuda)])
def device(request: pytest.FixtureRequest) -> str:
    """Each device in turn; CUDA in IEEE float32, as the server runs ``--dtype fp32`` (invariant 3)."""
    if request.param == "cuda":
        set_float32_precision("fp32")
    return request.param


def on_device(backbone: FrozenBackbone, device: str) -> FrozenBackbone:
    """``backbone`` itself for the CPU; a copy on CUDA, so session fixtures stay on the CPU."""
    return backbone if device == "cpu" else copy.deepcopy(backbone).to(device)


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
