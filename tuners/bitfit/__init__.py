"""BitFit / norm tuning (Ben Zaken et al., 2022): only biases and norm affine parameters train. Inline.

CNN convs feeding BatchNorm have no bias, so on CNNs this tunes the frozen BatchNorm scale and
shift (running statistics stay frozen). ViT: every Linear and attention bias and LayerNorm shift.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn
from torchvision.ops.misc import FrozenBatchNorm2d

from models.backbones.base import FrozenBackbone
from tuners.base import Tuner, TunerConfig, register_tuner, tap_shapes
from tuners.inline import key, run_with_tensors


@dataclass
class BitFitConfig(TunerConfig):
    """No options."""


def bias_like(backbone: FrozenBackbone) -> dict[str, Tensor]:
    found: dict[str, Tensor] = {}
    for name, module in backbone.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, FrozenBatchNorm2d):
            found[prefix + "weight"], found[prefix + "bias"] = module.weight, module.bias
        elif isinstance(module, nn.LayerNorm) and module.bias is not None:
            found[prefix + "bias"] = module.bias
        elif isinstance(module, (nn.Linear, nn.Conv2d)) and module.bias is not None:
            found[prefix + "bias"] = module.bias
        elif isinstance(module, nn.MultiheadAttention) and module.in_proj_bias is not None:
            found[prefix + "in_proj_bias"] = module.in_proj_bias
    return found


@register_tuner("bitfit", BitFitConfig)
class BitFitTuner(Tuner):
    kind = "inline"

    def __init__(self, config: BitFitConfig, backbone: FrozenBackbone) -> None:
        super().__init__(config, backbone)
        self.names = sorted(bias_like(backbone))
        self.bitfit = nn.ParameterDict(
            {key(n): nn.Parameter(t.detach().clone()) for n, t in bias_like(backbone).items()}
        )
        self.taps = list(backbone.pyramid_taps)
        self.out_channels, self.out_strides = tap_shapes(backbone, self.taps)

    def required_taps(self) -> list[str]:
        return self.taps

    def merged(self, backbone: FrozenBackbone) -> dict[str, Tensor]:
        """The backbone tensors this task replaces: its trained biases and norm scales."""
        return {n: self.bitfit[key(n)] for n in self.names}

    def backbone_forward(self, backbone: FrozenBackbone, images: Tensor) -> dict[str, Tensor]:
        return run_with_tensors(backbone, self.merged(backbone), images, self.taps)

    def forward(self, taps: dict[str, Tensor], images: Tensor | None = None) -> list[Tensor]:
        return [taps[t] for t in self.taps]
