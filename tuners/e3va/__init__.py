"""E3VA (Yin et al., arXiv 2306.09729): parallel low-rank adapters on a gradient highway. Shareable.

Adapters read frozen activations and their outputs are summed on a highway that is merged into
the maps the neck reads; the highway never re-enters the backbone, so training never backprops
through it. No code was published; what we chose (TUNERS.md, section 10.5):

- CNN: for every residual block j of stage i, ``h_ij = A_ij(x_ij)`` on the block input (1x1 conv to
  ``rank``, ReLU, 1x1 conv to the block's output channels, with the block's stride). Stage highway
  ``H_i = P_i(H_{i-1}) + sum_j h_ij``, where ``P_i`` is a trainable 1x1 stride-2 projection (the paper
  inherits the backbone's down-sampling; ours is trained). ``F_i = c_i + GN_i(H_i)``.
- ViT: ``h_l = A_attn(a_l) + A_mlp(m_l)`` on the pre-attention and pre-MLP LayerNorm outputs;
  ``F = z_L + GN(sum_l h_l)`` (one stride-16 map; the neck builds the pyramid).
- The plain bottleneck ablation stands in for the paper's "dual low-rank" factorisation.
- ``GN`` scales start at 0, so the tuner starts at the frozen maps; adapters are not zero-initialised
  (with both at zero no gradient would flow).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from models.backbones.base import FrozenBackbone
from tuners.base import Tuner, TunerConfig, option, register_tuner, tap_shapes
from tuners.layers import zero_init_gn


@dataclass
class E3VAConfig(TunerConfig):
    rank: int = option(16, "adapter bottleneck width")

    def validate(self) -> list[str]:
        return [] if self.rank >= 1 else ["rank must be >= 1"]


def _adapter(cin: int, cout: int, rank: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, rank, 1, stride), nn.ReLU(inplace=True), nn.Conv2d(rank, cout, 1))


@register_tuner("e3va", E3VAConfig)
class E3VATuner(Tuner):
    kind = "side"

    def __init__(self, config: E3VAConfig, backbone: FrozenBackbone) -> None:
        super().__init__(config, backbone)
        spec = backbone.feature_spec
        if backbone.family == "vit":
            layers = len(backbone.blocks)
            self.inputs = [[t for layer in range(1, layers + 1) for t in (f"a{layer}", f"m{layer}")]]
            self.outputs = [f"z{layers}"]
        else:
            self.outputs = list(backbone.stage_taps)
            self.inputs = [[f"b{d - 1}" for d in backbone.blocks_of_stage(s) if d > 0] for s in self.outputs]
        out_ch, out_st = tap_shapes(backbone, self.outputs)
        self.adapters = nn.ModuleList()
        for taps, c_out, s_out in zip(self.inputs, out_ch, out_st):
            self.adapters.append(
                nn.ModuleList(_adapter(spec[t].channels, c_out, config.rank, s_out // spec[t].stride) for t in taps)
            )
        self.proj = nn.ModuleList(nn.Conv2d(a, b, 1, 2) for a, b in zip(out_ch[:-1], out_ch[1:]))
        self.norm = nn.ModuleList(zero_init_gn(c) for c in out_ch)
        first = 1 if backbone.family == "cnn" else 0  # c2 feeds the highway only
        self.first_output = first
        self.out_channels, self.out_strides = out_ch[first:], out_st[first:]

    def required_taps(self) -> list[str]:
        return sorted({t for taps in self.inputs for t in taps} | set(self.outputs))

    def forward(self, taps: dict[str, Tensor], images: Tensor | None = None) -> list[Tensor]:
        out, highway = [], None
        for i, (inputs, adapters, stage) in enumerate(zip(self.inputs, self.adapters, self.outputs)):
            h = sum(a(taps[t]) for a, t in zip(adapters, inputs))
            highway = h if highway is None else self.proj[i - 1](highway) + h
            if i >= self.first_output:
                out.append(taps[stage] + self.norm[i](highway))
        return out
