"""MobileNetV2 (Sandler et al., 2018) as a frozen backbone; taps c2..c5 at strides 4/8/16/32."""

from __future__ import annotations

from pathlib import Path

from torch import nn
from torchvision.models import MobileNet_V2_Weights
from torchvision.models import mobilenet_v2 as tv_mobilenet_v2
from torchvision.models.mobilenetv2 import InvertedResidual

from models.backbones.base import FrozenBackbone, SequentialBackbone, load_into
from models.registry import BACKBONES
from models.transform import PreprocessSpec
from models.weights import RANDOM, resolve_weights, seeded_init


def _block_shape(block: nn.Module) -> tuple[int, int]:
    """(out channels, stride) of one ``features`` entry."""
    if isinstance(block, InvertedResidual):
        return block.out_channels, block.stride
    conv = block[0]
    return conv.out_channels, conv.stride[0]


def stage_depths(shapes: list[tuple[int, int]]) -> dict[str, int]:
    """c2..c5 = the last block at stride 4, 8, 16 and 32."""
    names = {4: "c2", 8: "c3", 16: "c4", 32: "c5"}
    return {names[s]: depth for depth, (_, s) in enumerate(shapes) if s in names}


class MobileNetV2Backbone(SequentialBackbone):
    """``torchvision.models.mobilenet_v2().features``: 19 blocks; c5 is the 1280-channel last conv."""

    def __init__(self, features: nn.Sequential, preprocess: PreprocessSpec, weights_source: str) -> None:
        super().__init__("mobilenet_v2", preprocess, weights_source)
        shapes, stride = [], 1
        for block in features:
            channels, block_stride = _block_shape(block)
            stride *= block_stride
            shapes.append((channels, stride))
        self._setup(list(features), shapes, stage_depths(shapes))


@BACKBONES.register("mobilenet_v2")
def mobilenet_v2(
    *,
    weights: str | Path | None = None,
    allow_download: bool = True,
    preprocess: PreprocessSpec | None = None,
    width_mult: float = 1.0,
) -> FrozenBackbone:
    """Builds the frozen MobileNetV2 trunk.

    Args:
        weights: ``None`` for ImageNet weights (offline package, then download), a file path, or ``"random"``.
        allow_download: allow torchvision's download as a last resort.
        preprocess: override the shared preprocessing.
        width_mult: channel multiplier; values other than 1.0 exist for small random test models.
    """
    if width_mult != 1.0 and weights != RANDOM:
        raise ValueError("width_mult != 1.0 has no pretrained weights; pass weights='random'")
    with seeded_init():
        model = tv_mobilenet_v2(weights=None, width_mult=width_mult)
    resolved = resolve_weights(
        "mobilenet_v2", weights, MobileNet_V2_Weights.IMAGENET1K_V1, allow_download=allow_download
    )
    load_into(model, resolved.state_dict, "mobilenet_v2")
    return MobileNetV2Backbone(model.features, preprocess or PreprocessSpec(), resolved.source)
