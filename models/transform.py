"""Shared preprocessing: resize, normalise, pad onto a fixed canvas, and map boxes back.

It belongs to the backbone, not to a task: the trainer and the server call the same code, and
every image lands on the same ``[3, S, S]`` canvas, so a task's output does not depend on which
other images share its batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torchvision.transforms.v2.functional as F
from torch import Tensor

from models.imaging import decode_reduced
from models.types import Detections

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MAX_CANVAS = 4096  # the longest image side any command accepts (a 4096 px canvas is 201 MB as float32)
MIN_BOX_SIZE = 0.01  # pixels: narrower boxes are dropped, as torchvision's remove_small_boxes(boxes, 1e-2) does


@dataclass(frozen=True)
class PreprocessSpec:
    """How images become backbone input.

    Attributes:
        size: the longest image side is resized to this many pixels (aspect ratio kept).
        size_divisible: the square canvas side is ``size`` rounded up to a multiple of this.
        mean: per-channel mean of ``[0, 1]`` RGB input.
        std: per-channel standard deviation.
    """

    size: int = 320
    size_divisible: int = 32
    mean: tuple[float, float, float] = field(default=IMAGENET_MEAN)
    std: tuple[float, float, float] = field(default=IMAGENET_STD)

    def __post_init__(self) -> None:
        if self.size < self.size_divisible or self.size_divisible <= 0:
            raise ValueError(f"size ({self.size}) must be >= size_divisible ({self.size_divisible}) > 0")

    @property
    def canvas(self) -> int:
        return math.ceil(self.size / self.size_divisible) * self.size_divisible

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessSpec:
        return cls(
            size=int(data["size"]),
            size_divisible=int(data["size_divisible"]),
            mean=tuple(float(x) for x in data["mean"]),  # type: ignore[arg-type]
            std=tuple(float(x) for x in data["std"]),  # type: ignore[arg-type]
        )


@dataclass(frozen=True)
class ImageMeta:
    """What is needed to map canvas boxes back: ``original = canvas / scale``, clipped to ``(H, W)``."""

    original_size: tuple[int, int]
    scale: float


class ImageTransform:
    """Turns uint8 ``[3, H, W]`` RGB images into a normalised float ``[B, 3, S, S]`` batch."""

    def __init__(self, spec: PreprocessSpec) -> None:
        self.spec = spec
        self._mean = torch.tensor(spec.mean).view(3, 1, 1)
        self._std = torch.tensor(spec.std).view(3, 1, 1)

    def load(self, data: bytes, max_pixels: int | None = None) -> tuple[Tensor, ImageMeta]:
        """Encoded image bytes -> :meth:`resize`'s output, decoded at a reduced scale where the format
        allows (:func:`models.imaging.decode_reduced`). The server, ``server-predict``, ``server-val``
        and unaugmented training all read images through this.

        Raises:
            ImageDecodeError: as :func:`models.imaging.decode`.
        """
        image, size = decode_reduced(data, self.spec.size, max_pixels)
        return self.resize(image, size)

    def resize(self, image: Tensor, size: tuple[int, int] | None = None) -> tuple[Tensor, ImageMeta]:
        """uint8 ``[3, h, w]`` RGB -> uint8 ``[3, h', w']`` with the longest side ``spec.size`` (aspect kept).

        Args:
            image: the image, at full scale or, from a reduced decode, at a fraction of it.
            size: the ``(H, W)`` of the full image when ``image`` is reduced; boxes map back to it.
        """
        if image.ndim != 3 or image.shape[0] != 3 or image.dtype != torch.uint8:
            raise ValueError(f"expected a uint8 [3, H, W] image, got {image.dtype} {tuple(image.shape)}")
        h, w = size or (int(image.shape[1]), int(image.shape[2]))
        scale = self.spec.size / max(h, w)
        new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
        return F.resize(image, [new_h, new_w], antialias=True), ImageMeta(original_size=(h, w), scale=scale)

    def canvas(self, resized: Tensor) -> Tensor:
        """A :meth:`resize` output -> float ``[3, S, S]``: ``(x / 255 - mean) / std``, padded bottom and right
        with zeros. Computed in place in the canvas, with the same float operations in the same order
        as out of place, so the values are bit for bit what trained tasks saw."""
        out = torch.zeros(3, self.spec.canvas, self.spec.canvas)
        out[:, : resized.shape[1], : resized.shape[2]].copy_(resized).div_(255.0).sub_(self._mean).div_(self._std)
        return out

    def one(self, image: Tensor) -> tuple[Tensor, ImageMeta]:
        """Resizes so the longest side is ``spec.size``, normalises, pads bottom/right to the canvas."""
        resized, meta = self.resize(image)
        return self.canvas(resized), meta

    def __call__(self, images: Sequence[Tensor]) -> tuple[Tensor, list[ImageMeta]]:
        pairs = [self.one(image) for image in images]
        return torch.stack([p[0] for p in pairs]), [p[1] for p in pairs]

    @staticmethod
    def boxes_to_canvas(boxes: Tensor, meta: ImageMeta) -> Tensor:
        """``[N, 4]`` x1, y1, x2, y2 boxes in original pixels -> canvas pixels."""
        return boxes * meta.scale

    @staticmethod
    def to_original(det: Detections, meta: ImageMeta) -> Detections:
        """``det`` with its canvas boxes in original pixels (:meth:`boxes_to_original`), less those that
        clipping left under ``MIN_BOX_SIZE`` wide or high: boxes in the canvas's padding, outside the
        image, which clipping flattens onto its edge (torchvision's detectors drop them too)."""
        boxes = ImageTransform.boxes_to_original(det.boxes, meta)
        keep = ((boxes[:, 2] - boxes[:, 0]) >= MIN_BOX_SIZE) & ((boxes[:, 3] - boxes[:, 1]) >= MIN_BOX_SIZE)
        return Detections(boxes[keep], det.scores[keep], det.labels[keep], det.depth)

    @staticmethod
    def boxes_to_original(boxes: Tensor, meta: ImageMeta) -> Tensor:
        """``[N, 4]`` x1, y1, x2, y2 canvas boxes -> original pixels, clipped to the image."""
        h, w = meta.original_size
        out = boxes / meta.scale
        out[:, 0::2] = out[:, 0::2].clamp(0, w)
        out[:, 1::2] = out[:, 1::2].clamp(0, h)
        return out
