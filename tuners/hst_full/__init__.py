"""HST as published (Lin et al., arXiv 2310.05393): meta tokens and LayerNorm tuning. Inline, ViT only.

Before ViT block ``l`` a learnable meta token ``m_l`` (Xavier-uniform) is put in front of the token
sequence (before CLS); after the block its output ``g_l`` is taken out, so every patch token has
attended to it (AFeng-x/HST ``vit_hsn.py``). ``ln_1``/``ln_2`` of every block are tuned per task.
The Hierarchical Side Network (see :mod:`tuners.hst`) reads the patch maps as in ``hst``, and its
K/V token for layer ``l`` is ``LN(T-Bridge(g_l))`` instead of a learned token.

Because the meta tokens change every activation, this needs its own backbone pass per task, and
training backpropagates through the frozen ViT (its weights never change; gradients reach the
meta tokens and the LayerNorm copies).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.backbones.base import FrozenBackbone
from models.backbones.vit import attention
from tuners.base import register_tuner
from tuners.errors import TunerError
from tuners.hst import HSTConfig, HSTTuner


@register_tuner("hst_full", HSTConfig)
class HSTFullTuner(HSTTuner):
    kind = "inline"
    learned_tokens = False

    def __init__(self, config: HSTConfig, backbone: FrozenBackbone) -> None:
        if backbone.family != "vit":
            raise TunerError(f"hst_full needs a ViT backbone (meta tokens and LayerNorm tuning); got {backbone.name}")
        super().__init__(config, backbone)
        dim, layers = backbone.feature_spec["z1"].channels, len(backbone.blocks)
        self.meta = nn.Parameter(nn.init.xavier_uniform_(torch.empty(layers, 1, dim)))
        norms = [(blk.ln_1, blk.ln_2) for blk in backbone.blocks]
        self.ln_weight = nn.Parameter(torch.stack([torch.stack([a.weight, b.weight]) for a, b in norms]).clone())
        self.ln_bias = nn.Parameter(torch.stack([torch.stack([a.bias, b.bias]) for a, b in norms]).clone())
        self.eps = backbone.blocks[0].ln_1.eps

    def backbone_forward(self, backbone: FrozenBackbone, images: Tensor) -> dict[str, Tensor]:
        meta_out: list[Tensor] = []

        def block_fn(layer: int, block: nn.Module, tokens: Tensor) -> Tensor:
            i, dim = layer - 1, tokens.shape[-1]
            x = torch.cat([self.meta[i].expand(tokens.shape[0], 1, dim), tokens], dim=1)
            a = F.layer_norm(x, (dim,), self.ln_weight[i, 0], self.ln_bias[i, 0], self.eps)
            x = x + attention(block.self_attention, a)
            x = x + block.mlp(F.layer_norm(x, (dim,), self.ln_weight[i, 1], self.ln_bias[i, 1], self.eps))
            meta_out.append(x[:, :1])
            return x[:, 1:]

        taps = backbone(images, self.taps, block_fn=block_fn)
        return {**taps, "meta": torch.cat(meta_out, dim=1)}  # [B, layers, D]

    def forward(self, taps: dict[str, Tensor], images: Tensor | None = None) -> list[Tensor]:
        if images is None:
            raise ValueError("hst_full reads the image (its stem) as well as the taps")
        meta, bridged, layer = taps["meta"], [], 0
        for i, group in enumerate(self.hsn.groups):
            weight = self.hsn.bridge[i].weight.flatten(1)  # the stage's T-Bridge as a Linear
            for _ in group:
                bridged.append(F.linear(meta[:, layer : layer + 1], weight, self.hsn.bridge[i].bias))
                layer += 1
        return self.hsn(taps, images, meta=bridged)[1:]
