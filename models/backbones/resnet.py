"""ResNet-18/50 (He et al., 2016) as frozen backbones; every residual block is a tap."""

from __future__ import annotations

from pathlib import Path

from torch import nn
from torchvision.models import ResNet18_Weights, ResNet50_Weights, WeightsEnum
from torchvision.models import resnet18 as tv_resnet18
from torchvision.models import resnet50 as tv_resnet50
from torchvision.models.resnet import BasicBlock, ResNet

from models.backbones.base import FrozenBackbone, SequentialBackbone, load_into
from models.registry import BACKBONES
from models.transform import PreprocessSpec
from models.weights import resolve_weights, seeded_init


class ResNetBackbone(SequentialBackbone):
    """Block 0 is the stem (conv1, bn1, relu, maxpool; stride 4), then one block per residual unit.

    c2..c5 are the outputs of ``layer1..layer4``.
    """

    def __init__(self, name: str, model: ResNet, preprocess: PreprocessSpec, weights_source: str) -> None:
        super().__init__(name, preprocess, weights_source)
        stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
        blocks: list[nn.Module] = [stem]
        shapes = [(model.conv1.out_channels, 4)]
        stages: dict[str, int] = {}
        stride = 4
        for stage, layer in zip(("c2", "c3", "c4", "c5"), (model.layer1, model.layer2, model.layer3, model.layer4)):
            for block in layer:
                stride *= block.stride
                out = block.conv2.out_channels if isinstance(block, BasicBlock) else block.conv3.out_channels
                blocks.append(block)
                shapes.append((out, stride))
            stages[stage] = len(blocks) - 1
        self._setup(blocks, shapes, stages)


def _build(name: str, builder, tv_weights: WeightsEnum, weights, allow_download, preprocess) -> FrozenBackbone:  # noqa: ANN001
    with seeded_init():
        model = builder(weights=None)
    resolved = resolve_weights(name, weights, tv_weights, allow_download=allow_download)
    load_into(model, resolved.state_dict, name)
    return ResNetBackbone(name, model, preprocess or PreprocessSpec(), resolved.source)


@BACKBONES.register("resnet18")
def resnet18(
    *, weights: str | Path | None = None, allow_download: bool = True, preprocess: PreprocessSpec | None = None
) -> FrozenBackbone:
    """Frozen ResNet-18 trunk (c2..c5 channels 64/128/256/512). ``weights``: as for mobilenet_v2."""
    return _build("resnet18", tv_resnet18, ResNet18_Weights.IMAGENET1K_V1, weights, allow_download, preprocess)


@BACKBONES.register("resnet50")
def resnet50(
    *, weights: str | Path | None = None, allow_download: bool = True, preprocess: PreprocessSpec | None = None
) -> FrozenBackbone:
    """Frozen ResNet-50 trunk (c2..c5 channels 256/512/1024/2048). ``weights``: as for mobilenet_v2."""
    return _build("resnet50", tv_resnet50, ResNet50_Weights.IMAGENET1K_V1, weights, allow_download, preprocess)
