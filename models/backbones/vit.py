"""ViT-B/16 (Dosovitskiy et al., 2021) as a frozen backbone with a size-agnostic forward.

torchvision's ``VisionTransformer`` only accepts 224 px input. This forward runs ``conv_proj``,
adds a bicubically interpolated position embedding, then the encoder blocks one by one, so any
input whose sides are multiples of 16 works. Taps, as ``[B, D, H/16, W/16]`` grids (CLS dropped):
``z{l}`` block output, ``a{l}`` pre-attention LayerNorm output, ``m{l}`` pre-MLP LayerNorm output.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import VisionTransformer, ViT_B_16_Weights

from models.backbones.base import BlockFn, FrozenBackbone, load_into
from models.features import FeatureSpec, TapInfo
from models.registry import BACKBONES
from models.transform import PreprocessSpec
from models.weights import RANDOM, resolve_weights, seeded_init


def attention(mha: nn.MultiheadAttention, x: Tensor, in_proj_weight: Tensor | None = None) -> Tensor:
    """Self-attention with ``mha``'s weights, written out so it exports to ONNX and takes weight deltas.

    Args:
        x: ``[B, N, D]`` tokens.
        in_proj_weight: ``[3D, D]`` packed q/k/v weight to use instead of ``mha.in_proj_weight`` (LoRA).
    """
    b, n, d = x.shape
    heads = mha.num_heads
    weight = mha.in_proj_weight if in_proj_weight is None else in_proj_weight
    qkv = F.linear(x, weight, mha.in_proj_bias).reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
    y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # [B, heads, N, D / heads]
    return mha.out_proj(y.transpose(1, 2).reshape(b, n, d))


def encoder_block_forward(block: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """torchvision ``EncoderBlock.forward``, also returning the two LayerNorm outputs.

    Args:
        x: ``[B, N, D]`` tokens.

    Returns:
        (block output, ``ln_1(x)``, ``ln_2`` of the post-attention residual), each ``[B, N, D]``.
    """
    a = block.ln_1(x)
    x = x + block.dropout(attention(block.self_attention, a))
    m = block.ln_2(x)
    return x + block.mlp(m), a, m


class ViTBackbone(FrozenBackbone):
    family = "vit"
    pyramid_taps = ("z12",)

    def __init__(self, name: str, model: VisionTransformer, preprocess: PreprocessSpec, weights_source: str) -> None:
        super().__init__(name, preprocess, weights_source)
        if preprocess.size_divisible % model.patch_size:
            raise ValueError(f"size_divisible must be a multiple of the patch size {model.patch_size}")
        self.patch_size = model.patch_size
        self.conv_proj = model.conv_proj
        self.class_token = model.class_token
        self.pos_embedding = model.encoder.pos_embedding
        self.blocks = model.encoder.layers
        layers, dim = len(self.blocks), model.hidden_dim
        self.stage_taps = tuple(f"z{layers * (i + 1) // 4}" for i in range(4))
        self.pyramid_taps = (f"z{layers}",)
        taps: dict[str, TapInfo] = {}
        for layer in range(1, layers + 1):
            for prefix in ("a", "m", "z"):
                taps[f"{prefix}{layer}"] = TapInfo(channels=dim, stride=self.patch_size, depth=layer)
        self._finalize(FeatureSpec(taps))

    def embed(self, images: Tensor) -> tuple[Tensor, int, int]:
        """``[B, 3, H, W]`` -> ``[B, 1 + h*w, D]`` tokens (CLS first) with interpolated positions."""
        x = self.conv_proj(images)
        b, d, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)
        pos_cls, pos_grid = self.pos_embedding[:, :1], self.pos_embedding[:, 1:]
        side = int(pos_grid.shape[1] ** 0.5)
        grid = pos_grid.reshape(1, side, side, d).permute(0, 3, 1, 2)
        if (h, w) != (side, side):
            grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
        pos = torch.cat([pos_cls, grid.flatten(2).transpose(1, 2)], dim=1)
        tokens = torch.cat([self.class_token.expand(b, -1, -1), x], dim=1) + pos
        return tokens, h, w

    @staticmethod
    def to_grid(tokens: Tensor, h: int, w: int) -> Tensor:
        """``[B, 1 + h*w, D]`` (CLS first) -> ``[B, D, h, w]``."""
        return tokens[:, 1:].transpose(1, 2).reshape(tokens.shape[0], -1, h, w)

    def _walk(self, images: Tensor, last_depth: int, block_fn: BlockFn | None) -> Iterator[tuple[str, Tensor]]:
        tokens, h, w = self.embed(images)
        for layer in range(1, last_depth + 1):
            block = self.blocks[layer - 1]
            if block_fn is not None:
                tokens = block_fn(layer, block, tokens)
            else:
                tokens, a, m = encoder_block_forward(block, tokens)
                yield f"a{layer}", self.to_grid(a, h, w)
                yield f"m{layer}", self.to_grid(m, h, w)
            yield f"z{layer}", self.to_grid(tokens, h, w)


@BACKBONES.register("vit_b_16")
def vit_b_16(
    *,
    weights: str | Path | None = None,
    allow_download: bool = True,
    preprocess: PreprocessSpec | None = None,
    num_layers: int = 12,
    num_heads: int = 12,
    hidden_dim: int = 768,
    mlp_dim: int = 3072,
) -> FrozenBackbone:
    """Builds the frozen ViT-B/16 trunk. Sizes other than the defaults exist for small random test models."""
    custom = (num_layers, num_heads, hidden_dim, mlp_dim) != (12, 12, 768, 3072)
    if custom and weights != RANDOM:
        raise ValueError("a resized ViT has no pretrained weights; pass weights='random'")
    with seeded_init():
        model = VisionTransformer(224, 16, num_layers, num_heads, hidden_dim, mlp_dim)
    resolved = resolve_weights("vit_b_16", weights, ViT_B_16_Weights.IMAGENET1K_V1, allow_download=allow_download)
    load_into(model, resolved.state_dict, "vit_b_16")
    return ViTBackbone("vit_b_16", model, preprocess or PreprocessSpec(), resolved.source)
