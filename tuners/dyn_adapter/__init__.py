"""Dyn-Adapter (Zhang et al., arXiv 2407.14302, ECCV 2024): early exits on top of in-backbone adapters. Inline.

From the paper (TUNERS.md section 3): a base PETL method inside the frozen backbone, "balanced"
early heads at intermediate depths (heavier heads early), exit-loss weights that change during
training, bidirectional sparsity (more dropout in shallow layers; random masks on the adapters'
gradients), and inference that stops at the first exit confident enough.

The paper is about classification and has no code; for detection we chose (TUNERS.md 10.3):

- base adapters: Conv-Adapter in every block (:mod:`tuners.conv_adapter`);
- exits at the inner stage taps (CNN ``c3``, ``c4``; ViT-B ``z6``, ``z9``), each a light FCOS head
  over the pyramid taps up to that depth, with a deeper tower than the final head (``exit_convs``);
- loss: final head + sum_k lambda_k(t) * exit_k, lambda ramping 0 -> 1 over the first 30% of training,
  then falling linearly to 0.5;
- adapter output dropout falling linearly from ``max_dropout`` at the first block to 0 at the last;
  each step every adapter gradient entry is kept with probability ``grad_keep``;
- exit confidence of an image: the lowest score among its detections after NMS (every reported box
  is sure), or ``1 - score_thresh`` when it has none. With ``exit_threshold > 0`` the backbone stops
  once every image of the batch has a confident exit; each image reports the depth it used.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.backbones.base import BlockFn, FrozenBackbone
from models.heads import MAX_LAYERS, DetectionHead, build_head
from models.postprocess import PostprocessConfig
from models.types import Detections, Target
from tuners.base import Tuner, TunerConfig, option, register_tuner, tap_shapes
from tuners.conv_adapter import adapted_block, block_adapters


@dataclass
class DynAdapterConfig(TunerConfig):
    gamma: int = option(4, "Conv-Adapter compression (hidden width C / gamma)")
    max_dropout: float = option(0.3, "adapter dropout at the first block, falling linearly to 0 at the last")
    grad_keep: float = option(0.5, "chance that each adapter gradient entry is kept at a step")
    exit_threshold: float = option(0.0, "stop at the first exit this confident (0: always run full depth)")
    exit_convs: int = option(3, "tower depth of the early-exit heads (deeper than the final head's)")
    exit_width: int = option(96, "channels of the early-exit heads")

    def validate(self) -> list[str]:
        problems = (
            [] if min(self.gamma, self.exit_convs, self.exit_width) >= 1 else ["gamma, exit_convs, exit_width >= 1"]
        )
        problems += [] if self.exit_convs <= MAX_LAYERS else [f"exit_convs must be at most {MAX_LAYERS}"]
        if not (0 <= self.max_dropout < 1 and 0 < self.grad_keep <= 1 and 0 <= self.exit_threshold <= 1):
            problems.append("need 0 <= max_dropout < 1, 0 < grad_keep <= 1, 0 <= exit_threshold <= 1")
        return problems


def exit_weight(progress: float) -> float:
    """lambda(t) of an early exit: 0 -> 1 over the first 30% of training, then down to 0.5."""
    if progress < 0.3:
        return progress / 0.3
    return 1.0 - 0.5 * (progress - 0.3) / 0.7


@register_tuner("dyn_adapter", DynAdapterConfig)
class DynAdapterTuner(Tuner):
    kind = "inline"
    needs_num_classes = True

    def __init__(self, config: DynAdapterConfig, backbone: FrozenBackbone, num_classes: int = 1) -> None:
        super().__init__(config, backbone)
        self.adapters = nn.ModuleDict(block_adapters(backbone, config.gamma))
        order = sorted(self.adapters, key=int)
        self.dropout = {k: config.max_dropout * (1 - i / max(1, len(order) - 1)) for i, k in enumerate(order)}
        for p in self.adapters.parameters():
            p.register_hook(self._sparsify)
        spec = backbone.feature_spec
        self.pyramid = list(backbone.pyramid_taps)
        self.exit_taps = list(backbone.stage_taps[1:-1])
        self.exit_inputs = [[t for t in self.pyramid if spec[t].depth <= spec[e].depth] or [e] for e in self.exit_taps]
        self.exit_heads = nn.ModuleList(
            build_head(
                "light", num_classes, *tap_shapes(backbone, taps), width=config.exit_width, num_convs=config.exit_convs
            )
            for taps in self.exit_inputs
        )
        self.blocks_run = {t: spec[t].depth + (1 if backbone.family == "cnn" else 0) for t in spec}
        self.patch = getattr(backbone, "patch_size", 1)
        self.out_channels, self.out_strides = tap_shapes(backbone, self.pyramid)

    def _sparsify(self, grad: Tensor) -> Tensor:
        if not self.training or self.config.grad_keep >= 1:
            return grad
        return grad * (torch.rand_like(grad) < self.config.grad_keep)

    def required_taps(self) -> list[str]:
        return sorted(set(self.pyramid) | {t for taps in self.exit_inputs for t in taps})

    def _block_fn(self, images: Tensor) -> BlockFn:
        grid = (images.shape[-2] // self.patch, images.shape[-1] // self.patch)

        def block_fn(depth: int, block: nn.Module, x: Tensor) -> Tensor:
            key = str(depth)
            if key not in self.adapters:
                return block(x)
            adapter, p = self.adapters[key], self.dropout[key]
            return adapted_block(block, lambda u: F.dropout(adapter(u), p, self.training), x, grid)

        return block_fn

    def backbone_forward(self, backbone: FrozenBackbone, images: Tensor) -> dict[str, Tensor]:
        return backbone(images, self.required_taps(), block_fn=self._block_fn(images))

    def forward(self, taps: dict[str, Tensor], images: Tensor | None = None) -> list[Tensor]:
        return [taps[t] for t in self.pyramid]

    def auxiliary_losses(
        self, taps: dict[str, Tensor], images: Tensor, targets: list[Target], progress: float
    ) -> dict[str, Tensor]:
        weight = exit_weight(progress)
        losses = {}
        for tap, inputs, head in zip(self.exit_taps, self.exit_inputs, self.exit_heads):
            terms = head.loss(head([taps[t] for t in inputs]), targets)
            losses[f"exit_{tap}"] = weight * sum(terms.values())
        return losses

    @staticmethod
    def confidence(det: Detections, config: PostprocessConfig) -> float:
        return float(det.scores.min()) if len(det) else 1.0 - config.score_thresh

    def early_exit_predict(
        self,
        backbone: FrozenBackbone,
        images: Tensor,
        head: DetectionHead,
        canvas: tuple[int, int],
        config: PostprocessConfig,
    ) -> list[Detections] | None:
        """Runs the backbone exit by exit; each image takes its first exit with confidence >= threshold."""
        if self.config.exit_threshold <= 0 or self.training:
            return None
        taps: dict[str, Tensor] = {}
        chosen: list[Detections | None] = [None] * images.shape[0]
        pending = list(zip(self.exit_taps, self.exit_inputs, self.exit_heads))
        for name, tensor in backbone.iter_taps(images, self.required_taps(), self._block_fn(images)):
            taps[name] = tensor
            while pending and all(t in taps for t in pending[0][1]):
                tap, inputs, exit_head = pending.pop(0)
                for i, det in enumerate(exit_head.predict(exit_head([taps[t] for t in inputs]), canvas, config)):
                    if chosen[i] is None and self.confidence(det, config) >= self.config.exit_threshold:
                        det.depth, chosen[i] = self.blocks_run[tap], det
                if all(c is not None for c in chosen):
                    return chosen  # type: ignore[return-value]  # the deeper blocks never run
        final = head.predict(head(self.forward(taps)), canvas, config)
        deepest = max(self.blocks_run[t] for t in taps)
        for i, det in enumerate(final):
            if chosen[i] is None:
                det.depth, chosen[i] = deepest, det
        return chosen  # type: ignore[return-value]
