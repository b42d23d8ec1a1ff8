"""Conv-Adapter (Chen et al., arXiv 2208.07463): a depthwise-separable bottleneck parallel to a
block's spatial convolution. Inline: the adapter output re-enters the residual stream.

Module (official ``ConvAdapter``): k x k grouped conv ``C -> C / gamma`` (groups ``C / gamma``, the
block's stride), ReLU, 1x1 conv to the output channels, times a per-channel scale. Placement:
ResNet Bottleneck, parallel to conv2 on ``relu(bn1(conv1(x)))``; BasicBlock, on the block input,
added before bn1 (the official BasicBlock path is broken; TUNERS.md section 10.4); MobileNetV2,
parallel to the depthwise conv; ViT, parallel to the MLP on the ``ln_2`` grid (CLS unchanged).
Our choice: the scale starts at 0, so the task starts at the pretrained function.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.mobilenetv2 import InvertedResidual
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.models.vision_transformer import EncoderBlock

from models.backbones.base import FrozenBackbone
from models.backbones.vit import attention
from tuners.base import Tuner, TunerConfig, option, register_tuner, tap_shapes


@dataclass
class ConvAdapterConfig(TunerConfig):
    gamma: int = option(4, "compression: the adapter's hidden width is C / gamma")

    def validate(self) -> list[str]:
        return [] if self.gamma >= 1 else ["gamma must be >= 1"]


class ConvAdapter(nn.Module):
    def __init__(self, cin: int, cout: int, gamma: int, stride: int) -> None:
        super().__init__()
        hidden = max(1, cin // gamma)
        self.down = nn.Conv2d(cin, hidden, 3, stride, 1, groups=hidden if cin % hidden == 0 else 1, bias=False)
        self.up = nn.Conv2d(hidden, cout, 1, bias=False)
        self.scale = nn.Parameter(torch.zeros(cout, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * self.up(F.relu(self.down(x)))


def _adapter_for(block: nn.Module, gamma: int) -> ConvAdapter | None:
    if isinstance(block, Bottleneck):
        return ConvAdapter(block.conv2.in_channels, block.conv2.out_channels, gamma, block.conv2.stride[0])
    if isinstance(block, BasicBlock):
        return ConvAdapter(block.conv1.in_channels, block.conv1.out_channels, gamma, block.conv1.stride[0])
    if isinstance(block, InvertedResidual):
        dw = block.conv[-3][0]
        return ConvAdapter(dw.in_channels, dw.out_channels, gamma, dw.stride[0])
    if isinstance(block, EncoderBlock):
        dim = block.ln_2.normalized_shape[0]
        return ConvAdapter(dim, dim, gamma, 1)
    return None  # stems and plain conv layers are left as they are


def _bottleneck(block: Bottleneck, adapter: nn.Module, x: Tensor) -> Tensor:
    u = block.relu(block.bn1(block.conv1(x)))
    y = block.relu(block.bn2(block.conv2(u))) + adapter(u)
    identity = block.downsample(x) if block.downsample is not None else x
    return block.relu(block.bn3(block.conv3(y)) + identity)


def _basic(block: BasicBlock, adapter: nn.Module, x: Tensor) -> Tensor:
    y = block.relu(block.bn1(block.conv1(x) + adapter(x)))
    identity = block.downsample(x) if block.downsample is not None else x
    return block.relu(block.bn2(block.conv2(y)) + identity)


def _inverted(block: InvertedResidual, adapter: nn.Module, x: Tensor) -> Tensor:
    layers = list(block.conv)
    u = layers[0](x) if len(layers) == 4 else x  # expand 1x1, when there is one
    y = layers[-3](u) + adapter(u)  # depthwise conv-bn-relu6, plus the adapter
    y = layers[-1](layers[-2](y))  # project 1x1 + bn
    return x + y if block.use_res_connect else y


def _encoder(block: EncoderBlock, adapter: nn.Module, x: Tensor, grid: tuple[int, int]) -> Tensor:
    x = x + block.dropout(attention(block.self_attention, block.ln_1(x)))
    m = block.ln_2(x)
    b, n, d = m.shape
    tokens = m[:, 1:].transpose(1, 2).reshape(b, d, *grid)
    side = adapter(tokens).flatten(2).transpose(1, 2)
    return x + block.mlp(m) + torch.cat([torch.zeros_like(side[:, :1]), side], dim=1)


def adapted_block(block: nn.Module, adapter: nn.Module, x: Tensor, grid: tuple[int, int]) -> Tensor:
    """``block(x)`` with ``adapter`` in its place (see the module docstring); ``grid`` is the ViT patch grid."""
    if isinstance(block, Bottleneck):
        return _bottleneck(block, adapter, x)
    if isinstance(block, BasicBlock):
        return _basic(block, adapter, x)
    if isinstance(block, InvertedResidual):
        return _inverted(block, adapter, x)
    return _encoder(block, adapter, x, grid)


def block_adapters(backbone: FrozenBackbone, gamma: int) -> dict[str, ConvAdapter]:
    """One adapter per adaptable block, keyed by the block's depth (ViT layers count from 1)."""
    offset = 1 if backbone.family == "vit" else 0
    adapters = {str(i + offset): _adapter_for(b, gamma) for i, b in enumerate(backbone.blocks)}
    return {k: a for k, a in adapters.items() if a is not None}


@register_tuner("conv_adapter", ConvAdapterConfig)
class ConvAdapterTuner(Tuner):
    kind = "inline"

    def __init__(self, config: ConvAdapterConfig, backbone: FrozenBackbone) -> None:
        super().__init__(config, backbone)
        self.adapters = nn.ModuleDict(block_adapters(backbone, config.gamma))
        self.taps = list(backbone.pyramid_taps)
        self.patch = getattr(backbone, "patch_size", 1)
        self.out_channels, self.out_strides = tap_shapes(backbone, self.taps)

    def required_taps(self) -> list[str]:
        return self.taps

    def backbone_forward(self, backbone: FrozenBackbone, images: Tensor) -> dict[str, Tensor]:
        grid = (images.shape[-2] // self.patch, images.shape[-1] // self.patch)

        def block_fn(depth: int, block: nn.Module, x: Tensor) -> Tensor:
            adapter = self.adapters[str(depth)] if str(depth) in self.adapters else None
            return block(x) if adapter is None else adapted_block(block, adapter, x, grid)

        return backbone(images, self.taps, block_fn=block_fn)

    def forward(self, taps: dict[str, Tensor], images: Tensor | None = None) -> list[Tensor]:
        return [taps[t] for t in self.taps]
