"""Backbone taps computed once per image and reused across epochs (side tuners only).

The trainer caches both splits: validation images are never augmented, and training images are
the same every epoch only with augmentation ``none``; the config refuses other combinations.
``memory`` keeps the taps as computed; ``disk`` writes them as fp16 safetensors. Both stay within
one byte budget: images past it are recomputed each epoch rather than cached. The taps come from
what the trainer passes in: on the CPU by default the backbone in ONNX Runtime (within 1e-4 of
torch), or the torch backbone itself, whose cached taps give exactly the uncached losses and
predictions. Once every image of a split is cached and the tuner reads no pixels, the trainer
stops decoding that split's images (``RememberedSamples``).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

log = logging.getLogger(__name__)

TapFn = Callable[[Tensor, list[str]], dict[str, Tensor]]


class FeatureCache:
    """Taps per dataset index, for one fixed set of tap names.

    Args:
        mode: ``memory`` or ``disk``.
        budget_bytes: most bytes the cached taps may take (in memory, or on disk).
        folder: where ``disk`` mode writes (emptied first).
    """

    def __init__(self, mode: str, budget_bytes: int, folder: Path | None = None) -> None:
        if mode not in ("memory", "disk"):
            raise ValueError(f"mode must be memory or disk, got {mode!r}")
        if mode == "disk":
            if folder is None:
                raise ValueError("disk mode needs a folder")
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
        self.mode, self.budget_bytes, self.folder = mode, budget_bytes, folder
        self._memory: dict[int, dict[str, Tensor]] = {}
        self._on_disk: set[int] = set()
        self.bytes = 0
        self.hits = self.misses = self.refused = 0

    def _get(self, index: int) -> dict[str, Tensor] | None:
        if index in self._memory:
            return self._memory[index]
        if index in self._on_disk:
            return {k: v.float() for k, v in load_file(str(self._path(index))).items()}
        return None

    def _path(self, index: int) -> Path:
        assert self.folder is not None
        return self.folder / f"{index:08d}.safetensors"

    def _put(self, index: int, taps: dict[str, Tensor]) -> None:
        stored = {k: (v.half() if self.mode == "disk" else v).detach().cpu().contiguous() for k, v in taps.items()}
        size = sum(v.numel() * v.element_size() for v in stored.values())
        if self.bytes + size > self.budget_bytes:
            self.refused += 1
            return
        if self.mode == "memory":
            self._memory[index] = stored
        else:
            save_file(stored, str(self._path(index)))
            self._on_disk.add(index)
        self.bytes += size

    def holds(self, indices: Iterable[int]) -> bool:
        """Whether the taps of every one of ``indices`` are cached."""
        return all(i in self._memory or i in self._on_disk for i in indices)

    @torch.no_grad()
    def taps(self, backbone: TapFn, images: Tensor, indices: list[int], names: list[str]) -> dict[str, Tensor]:
        """``{tap: [B, C, h, w]}`` for a batch, from the cache where possible, else from ``backbone``
        (the frozen backbone, or a runtime of it: anything called as ``backbone(images, names)``)."""
        cached = [self._get(i) for i in indices]
        missing = [k for k, c in enumerate(cached) if c is None]
        self.hits += len(indices) - len(missing)
        self.misses += len(missing)
        if missing:
            fresh = backbone(images[missing], names)
            for j, k in enumerate(missing):
                one = {n: fresh[n][j : j + 1] for n in names}
                cached[k] = one
                self._put(indices[k], {n: t[0] for n, t in one.items()})
        rows = [{n: (t if t.ndim == 4 else t[None]) for n, t in c.items()} for c in cached]  # type: ignore[union-attr]
        return {n: torch.cat([r[n] for r in rows]).to(images.device) for n in names}

    def stats(self) -> dict[str, int | str]:
        return {
            "mode": self.mode,
            "bytes": self.bytes,
            "budget_bytes": self.budget_bytes,
            "hits": self.hits,
            "misses": self.misses,
            "not_cached_over_budget": self.refused,
        }
