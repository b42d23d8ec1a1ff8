"""FrozenBackbone: a frozen pretrained trunk that exposes named taps and can stop early."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator

import torch
from torch import Tensor, nn
from torchvision.ops.misc import FrozenBatchNorm2d

from models.features import FeatureSpec
from models.transform import PreprocessSpec
from models.weights import fingerprint

# An inline tuner's replacement for ``block(x)``: (depth, frozen block, input) -> output.
BlockFn = Callable[[int, nn.Module, Tensor], Tensor]


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replaces every ``nn.BatchNorm2d`` below ``module`` by a ``FrozenBatchNorm2d`` with the same statistics."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            frozen.weight.copy_(child.weight.detach())
            frozen.bias.copy_(child.bias.detach())
            frozen.running_mean.copy_(child.running_mean)
            frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen)
        else:
            freeze_batchnorm(child)
    return module


class FrozenBackbone(nn.Module):
    """Base class of every backbone: eval mode, ``FrozenBatchNorm2d``, ``requires_grad=False``.

    Subclasses fill ``blocks`` (run in order) and implement :meth:`_walk`, which yields
    ``(tap name, [B, C, H, W] tensor)`` pairs in forward order. :meth:`forward` stops the walk as
    soon as every requested tap has been produced, so later blocks never run.

    Attributes:
        name: registered name.
        family: ``"cnn"`` or ``"vit"``.
        feature_spec: channels, stride and depth of every tap.
        preprocess: the shared preprocessing spec for this backbone.
        pyramid_taps: the taps a neck reads by default (``c3..c5``, or ``z12`` for ViT).
        stage_taps: one tap per stage, shallow to deep (``c2..c5`` or ``z3, z6, z9, z12``).
        fingerprint: sha256 of the weights; artifacts trained on other weights are refused.
    """

    family: str = "cnn"
    pyramid_taps: tuple[str, ...] = ()
    stage_taps: tuple[str, ...] = ()

    def __init__(self, name: str, preprocess: PreprocessSpec, weights_source: str) -> None:
        super().__init__()
        self.name = name
        self.preprocess = preprocess
        self.weights_source = weights_source
        self.blocks = nn.ModuleList()
        self.feature_spec = FeatureSpec({})
        self.fingerprint = ""

    def _finalize(self, feature_spec: FeatureSpec) -> None:
        """Called by subclasses once ``blocks`` and the weights are in place."""
        self.feature_spec = feature_spec
        freeze_batchnorm(self)
        for p in self.parameters():
            p.requires_grad_(False)
        super().train(False)
        self.fingerprint = fingerprint(self)

    def train(self, mode: bool = True) -> FrozenBackbone:
        """A backbone stays in eval mode whatever the caller asks."""
        return super().train(False)

    def _walk(self, images: Tensor, last_depth: int, block_fn: BlockFn | None) -> Iterator[tuple[str, Tensor]]:
        raise NotImplementedError

    def iter_taps(
        self, images: Tensor, taps: Collection[str] | None = None, block_fn: BlockFn | None = None
    ) -> Iterator[tuple[str, Tensor]]:
        """Yields ``(tap, [B, C, H / stride, W / stride])`` for the requested taps in forward order.

        The trunk runs lazily: a caller that stops iterating (an early exit) stops the blocks too.
        """
        wanted = set(taps or self.pyramid_taps)
        for name in wanted:
            self.feature_spec[name]  # raises with the list of valid taps
        found = 0
        for name, tensor in self._walk(images, self.feature_spec.deepest(wanted), block_fn):
            if name in wanted:
                yield name, tensor
                found += 1
                if found == len(wanted):
                    return

    def forward(
        self,
        images: Tensor,
        taps: Collection[str] | None = None,
        block_fn: BlockFn | None = None,
    ) -> dict[str, Tensor]:
        """Runs the trunk up to the deepest requested tap.

        Args:
            images: normalised ``[B, 3, H, W]`` batch, H and W multiples of ``preprocess.size_divisible``.
            taps: tap names to return (default: ``pyramid_taps``).
            block_fn: an inline tuner's block override (see :data:`BlockFn`).

        Returns:
            ``{tap: [B, C, H / stride, W / stride]}`` for the requested taps.
        """
        return dict(self.iter_taps(images, taps, block_fn))


class SequentialBackbone(FrozenBackbone):
    """A CNN trunk that is a flat sequence of blocks; every block output is tap ``b{depth}``.

    Subclasses call :meth:`_setup` with the blocks, each block's (channels, stride), and the
    depths of the stage taps ``c2..c5``.
    """

    pyramid_taps = ("c3", "c4", "c5")
    stage_taps = ("c2", "c3", "c4", "c5")

    def _setup(self, blocks: list[nn.Module], shapes: list[tuple[int, int]], stages: dict[str, int]) -> None:
        from models.features import TapInfo

        self.blocks = nn.ModuleList(blocks)
        taps: dict[str, TapInfo] = {}
        self._taps_at: list[list[str]] = [[] for _ in blocks]
        stage_at = {depth: name for name, depth in stages.items()}
        for depth, (channels, stride) in enumerate(shapes):
            names = [f"b{depth}"] + ([stage_at[depth]] if depth in stage_at else [])
            for name in names:
                taps[name] = TapInfo(channels=channels, stride=stride, depth=depth)
            self._taps_at[depth] = names
        self._finalize(FeatureSpec(taps))

    def _walk(self, images: Tensor, last_depth: int, block_fn: BlockFn | None) -> Iterator[tuple[str, Tensor]]:
        x = images
        for depth in range(last_depth + 1):
            block = self.blocks[depth]
            x = block_fn(depth, block, x) if block_fn is not None else block(x)
            for name in self._taps_at[depth]:
                yield name, x

    def blocks_of_stage(self, stage: str) -> list[int]:
        """Depths of the blocks that end at or before stage tap ``stage`` and after the previous one."""
        order = list(self.stage_taps)
        end = self.feature_spec[stage].depth
        i = order.index(stage)
        start = self.feature_spec[order[i - 1]].depth + 1 if i > 0 else 0
        return list(range(start, end + 1))


def load_into(model: nn.Module, state_dict: dict[str, torch.Tensor] | None, name: str) -> None:
    """Strict load into a torchvision model; every missing or unexpected key is reported."""
    if state_dict is None:
        return
    result = model.load_state_dict(state_dict, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"weights do not fit {name}: missing {result.missing_keys[:10]}, unexpected {result.unexpected_keys[:10]}"
        )
