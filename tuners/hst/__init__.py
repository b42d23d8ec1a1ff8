"""HST, Hierarchical Side-Tuning (Lin et al., arXiv 2310.05393), the shareable "HST-shared" variant.

The Hierarchical Side Network (HSN, read from AFeng-x/HST ``vit_hsn.py``; TUNERS.md section 2):
a stem on the image (Conv3x3/2, BN, ReLU, Conv2x2/2, LayerNorm: stride 4), then 4 stages at
strides 4/8/16/32 (stages 2-4 open with Conv3x3/2 + LayerNorm). Stage ``i`` reads a group of
backbone layers through one T-Bridge (Linear ``C -> d_i``, shared by the group); side block ``j``
reads layer ``k`` of the group and does three residual steps:

1. cross-attention from the side tokens to K/V = [learned token ``t_ij``, GlobalT_k], each through a
   per-block LayerNorm, GlobalT_k being the spatial mean of the bridged map of layer ``k``;
2. "FG injection": ``x += resize(bridge(z_k))`` (bilinear to the stage grid);
3. ``x += MLP(LN(x))``, ratio 4, GELU.

Shareable variant (TUNERS.md 10.2): the published meta tokens and LayerNorm tuning change the
backbone's forward, so here the K/V token is learned inside the side network and the backbone is
only read. ``hst_full`` is the published, inline form.

Our choices: widths (32, 64, 128, 192) (the paper's dense widths are 64..384; TUNERS.md suggests this
lighter set), heads = width / 32; the bridge runs before the resize (the two commute, and it is
cheaper at the tap's resolution); the last MLP Linear of each side block is zero-initialised; the
stride-8/16/32 stage outputs go to the head. ViT: the 12 layers form 4 groups of 3. CNNs: stage
tap ``c{i+2}`` stands for the group of stage ``i``, read by each of its ``depth`` side blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.backbones.base import FrozenBackbone
from models.heads import MAX_LAYERS
from tuners.base import Tuner, TunerConfig, option, register_tuner


@dataclass
class HSTConfig(TunerConfig):
    widths: tuple[int, ...] = option((32, 64, 128, 192), "side widths of the 4 stages (strides 4/8/16/32)")
    depth: int = option(3, "side blocks per stage on CNNs (ViT: layers per group)")
    mlp_ratio: int = option(4, "hidden width of the side MLP, as a multiple of the stage width")

    def validate(self) -> list[str]:
        problems = [] if len(self.widths) == 4 else ["widths must list 4 stage widths"]
        problems += [] if all(w >= 32 and w % 32 == 0 for w in self.widths) else ["widths must be multiples of 32"]
        problems += [] if 1 <= self.depth <= MAX_LAYERS else [f"depth must be 1 to {MAX_LAYERS}"]
        return problems + ([] if self.mlp_ratio >= 1 else ["mlp_ratio must be >= 1"])


class ChannelNorm(nn.LayerNorm):
    """LayerNorm over the channels of a ``[B, C, H, W]`` map."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class SideBlock(nn.Module):
    """Cross-attention to a few K/V tokens, FG injection, MLP; on ``[B, N, d]`` side tokens."""

    def __init__(self, dim: int, mlp_ratio: int) -> None:
        super().__init__()
        self.heads = max(1, dim // 32)
        self.norm_q, self.norm_kv, self.norm_mlp = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.k, self.v, self.proj = (nn.Linear(dim, dim) for _ in range(4))
        self.mlp = nn.Sequential(nn.Linear(dim, dim * mlp_ratio), nn.GELU(), nn.Linear(dim * mlp_ratio, dim))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def _split(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        return x.reshape(b, n, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, x: Tensor, kv: Tensor, injection: Tensor) -> Tensor:
        """``x [B, N, d]``, ``kv [B, T, d]`` tokens, ``injection [B, N, d]`` bridged layer map."""
        kv = self.norm_kv(kv)
        q, k, v = self._split(self.q(self.norm_q(x))), self._split(self.k(kv)), self._split(self.v(kv))
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(x.shape)
        x = x + self.proj(attended) + injection
        return x + self.mlp(self.norm_mlp(x))


def layer_groups(backbone: FrozenBackbone, depth: int) -> list[list[str]]:
    """The backbone taps each of the 4 side stages reads, one per side block."""
    if backbone.family == "vit":
        layers = len(backbone.blocks)
        bounds = [layers * i // 4 for i in range(5)]
        return [[f"z{layer}" for layer in range(bounds[i] + 1, bounds[i + 1] + 1)] for i in range(4)]
    return [[tap] * depth for tap in backbone.stage_taps]


class HierarchicalSideNetwork(nn.Module):
    """The HSN over 4 layer groups; returns the ``[B, d_i, H_i, W_i]`` map of every stage."""

    def __init__(
        self, config: HSTConfig, groups: list[list[str]], tap_channels: list[int], learned_tokens: bool = True
    ) -> None:
        super().__init__()
        w = config.widths
        self.groups = groups
        self.stem = nn.Sequential(
            nn.Conv2d(3, w[0], 3, 2, 1, bias=False),
            nn.BatchNorm2d(w[0]),
            nn.ReLU(inplace=True),
            nn.Conv2d(w[0], w[0], 2, 2),
            ChannelNorm(w[0]),
        )
        self.down = nn.ModuleList(nn.Sequential(nn.Conv2d(a, b, 3, 2, 1), ChannelNorm(b)) for a, b in zip(w, w[1:]))
        self.bridge = nn.ModuleList(nn.Conv2d(c, d, 1) for c, d in zip(tap_channels, w))  # per-pixel Linear
        self.blocks = nn.ModuleList(
            nn.ModuleList(SideBlock(d, config.mlp_ratio) for _ in group) for d, group in zip(w, groups)
        )
        self.tokens = nn.ParameterList(
            nn.Parameter(torch.randn(len(g), 1, d) * 0.02) for d, g in zip(w, groups) if learned_tokens
        )
        self.stage_norm = nn.ModuleList(nn.LayerNorm(d) for d in w)

    def forward(self, taps: dict[str, Tensor], images: Tensor, meta: list[Tensor] | None = None) -> list[Tensor]:
        """``meta``: per-layer bridged meta-token outputs ``[B, 1, d_i]`` (hst_full); else learned tokens."""
        x, outputs, seen = self.stem(images), [], 0
        for i, group in enumerate(self.groups):
            if i > 0:
                x = self.down[i - 1](x)
            b, d, h, w = x.shape
            tokens = x.flatten(2).transpose(1, 2)
            bridged: dict[str, Tensor] = {}
            for j, tap in enumerate(group):
                if tap not in bridged:
                    bridged[tap] = self.bridge[i](taps[tap])
                fg = F.interpolate(bridged[tap], size=(h, w), mode="bilinear", align_corners=False)
                global_token = bridged[tap].mean(dim=(2, 3))[:, None]
                token = meta[seen + j] if meta is not None else self.tokens[i][j].expand(b, 1, d)
                tokens = self.blocks[i][j](tokens, torch.cat([token, global_token], 1), fg.flatten(2).transpose(1, 2))
            seen += len(group)
            x = self.stage_norm[i](tokens).transpose(1, 2).reshape(b, d, h, w)
            outputs.append(x)
        return outputs


@register_tuner("hst", HSTConfig)
class HSTTuner(Tuner):
    kind = "side"
    needs_images = True
    learned_tokens = True  # hst_full reads the meta-token outputs instead

    def __init__(self, config: HSTConfig, backbone: FrozenBackbone) -> None:
        super().__init__(config, backbone)
        groups = layer_groups(backbone, config.depth)
        channels = [backbone.feature_spec[g[0]].channels for g in groups]
        self.hsn = HierarchicalSideNetwork(config, groups, channels, self.learned_tokens)
        self.taps = sorted({t for g in groups for t in g})
        self.out_channels, self.out_strides = list(config.widths[1:]), [8, 16, 32]

    def required_taps(self) -> list[str]:
        return self.taps

    def forward(self, taps: dict[str, Tensor], images: Tensor | None = None) -> list[Tensor]:
        if images is None:
            raise ValueError("hst reads the image (its stem) as well as the taps")
        return self.hsn(taps, images)[1:]
