"""LoRA (Hu et al., 2022) on convolutions and on ViT attention. Inline.

CNN: every dense (``groups == 1``) convolution except the stem gets ``W + (alpha / r) B A``, with A a
``k x k`` conv to ``r`` channels (Gaussian) and B a 1x1 conv back (zeros), merged into one weight.
ViT: low-rank deltas on the q and v slices of the packed ``in_proj_weight``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from models.backbones.base import FrozenBackbone
from tuners.base import Tuner, TunerConfig, option, register_tuner, tap_shapes
from tuners.inline import key, run_with_tensors


@dataclass
class LoRAConfig(TunerConfig):
    rank: int = option(8, "rank r of each delta")
    alpha: float = option(16.0, "scale numerator: delta = (alpha / r) B A")

    def validate(self) -> list[str]:
        return [] if self.rank >= 1 else ["rank must be >= 1"]


def lora_targets(backbone: FrozenBackbone) -> dict[str, tuple[int, ...]]:
    """Weight name -> shape of the weight that gets a delta."""
    found: dict[str, tuple[int, ...]] = {}
    for name, module in backbone.named_modules():
        if isinstance(module, nn.Conv2d) and module.groups == 1 and module.in_channels > 3:
            found[f"{name}.weight"] = tuple(module.weight.shape)
        elif isinstance(module, nn.MultiheadAttention):
            found[f"{name}.in_proj_weight"] = tuple(module.in_proj_weight.shape)
    return found


@register_tuner("lora", LoRAConfig)
class LoRATuner(Tuner):
    kind = "inline"

    def __init__(self, config: LoRAConfig, backbone: FrozenBackbone) -> None:
        super().__init__(config, backbone)
        self.targets = lora_targets(backbone)
        self.lora_A, self.lora_B = nn.ParameterDict(), nn.ParameterDict()
        r = config.rank
        for name, shape in self.targets.items():
            if name.endswith("in_proj_weight"):  # [3D, D]: q and v deltas, each B [D, r] @ A [r, D]
                d = shape[1]
                self.lora_A[key(name)] = nn.Parameter(torch.randn(2, r, d) * 0.02)
                self.lora_B[key(name)] = nn.Parameter(torch.zeros(2, d, r))
            else:  # conv [C_out, C_in, k, k]
                self.lora_A[key(name)] = nn.Parameter(torch.randn(r, *shape[1:]) * 0.02)
                self.lora_B[key(name)] = nn.Parameter(torch.zeros(shape[0], r))
        self.taps = list(backbone.pyramid_taps)
        self.out_channels, self.out_strides = tap_shapes(backbone, self.taps)

    def required_taps(self) -> list[str]:
        return self.taps

    def delta(self, name: str) -> Tensor:
        a, b = self.lora_A[key(name)], self.lora_B[key(name)]
        scale = self.config.alpha / self.config.rank
        if name.endswith("in_proj_weight"):
            dq, dv = b[0] @ a[0], b[1] @ a[1]
            return scale * torch.cat([dq, torch.zeros_like(dq), dv])
        return scale * (b @ a.flatten(1)).view(b.shape[0], *a.shape[1:])

    def merged(self, backbone: FrozenBackbone) -> dict[str, Tensor]:
        """The backbone tensors this task replaces, deltas folded in (PEFT's ``merge_and_unload``)."""
        weights = dict(backbone.named_parameters())
        return {n: weights[n] + self.delta(n) for n in self.targets}

    def backbone_forward(self, backbone: FrozenBackbone, images: Tensor) -> dict[str, Tensor]:
        return run_with_tensors(backbone, self.merged(backbone), images, self.taps)

    def forward(self, taps: dict[str, Tensor], images: Tensor | None = None) -> list[Tensor]:
        return [taps[t] for t in self.taps]
