"""Box-aware training augmentation (``torchvision.transforms.v2`` + ``tv_tensors``) and the torch dataset.

Augmentation runs on the original image, before the backbone's shared preprocessing
(:class:`models.transform.ImageTransform`), which the trainer and the server both apply.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from models.imaging import ImageDecodeError, read_image
from models.transform import ImageMeta, ImageTransform
from models.types import Target
from tuners.data.records import DatasetError, DetectionData, ImageRecord

AUGMENTATIONS = ("none", "flip", "standard")


def build_augmentation(name: str) -> v2.Transform | None:
    """``none``; ``flip`` (horizontal flips); ``standard`` (flips, photometric distortion, zoom-out, IoU crops)."""
    if name == "none":
        return None
    if name == "flip":
        return v2.RandomHorizontalFlip(0.5)
    if name == "standard":
        return v2.Compose(
            [
                v2.RandomPhotometricDistort(p=0.5),
                v2.RandomZoomOut(fill=114, side_range=(1.0, 1.6), p=0.3),
                v2.RandomIoUCrop(sampler_options=[0.3, 0.5, 0.7, 0.9, 1.0], trials=20),
                v2.RandomHorizontalFlip(0.5),
                v2.SanitizeBoundingBoxes(min_size=4),
            ]
        )
    raise ValueError(f"augmentation must be one of {AUGMENTATIONS}, got {name!r}")


@dataclass
class Sample:
    """One preprocessed image: canvas tensor ``[3, S, S]``, target in canvas pixels, and the mapping back."""

    image: Tensor
    target: Target
    meta: ImageMeta
    index: int


class DetectionDataset(Dataset[Sample]):
    """Reads, augments and preprocesses records into canvas samples."""

    def __init__(self, data: DetectionData, transform: ImageTransform, augmentation: str = "none") -> None:
        self.data = data
        self.transform = transform
        self.augment = build_augmentation(augmentation)

    def __len__(self) -> int:
        return len(self.data.records)

    def __getitem__(self, index: int) -> Sample:
        record = self.data.records[index]
        try:
            return self._sample(record, index)
        except ImageDecodeError as e:  # a file whose header read well and whose pixels do not: say which
            raise DatasetError(f"{record.path}: {e}") from e

    def _sample(self, record: ImageRecord, index: int) -> Sample:
        boxes, labels = record.boxes.float(), record.labels
        if self.augment is None:  # read as the server reads a request's image
            resized, meta = self.transform.load(record.path.read_bytes())
        else:  # augmented at full scale
            image = read_image(record.path)  # the server's decoder: EXIF orientation applied
            h, w = image.shape[-2:]
            sample = {"boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(h, w)), "labels": labels}
            image, sample = self.augment(tv_tensors.Image(image), sample)
            image, boxes, labels = image.as_subclass(Tensor), sample["boxes"].as_subclass(Tensor), sample["labels"]
            resized, meta = self.transform.resize(image)
        return Sample(
            self.transform.canvas(resized), Target(ImageTransform.boxes_to_canvas(boxes, meta), labels), meta, index
        )


def collate(samples: list[Sample]) -> tuple[Tensor, list[Target], list[ImageMeta], list[int]]:
    """Stacks canvases into ``[B, 3, S, S]``; keeps targets, metas and dataset indices as lists."""
    return (
        torch.stack([s.image for s in samples]),
        [s.target for s in samples],
        [s.meta for s in samples],
        [s.index for s in samples],
    )


class RememberedSamples(Dataset[Sample]):
    """A dataset's targets and metas, remembered as its batches pass, without their pixels.

    Once the feature cache holds every image's taps and the tuner reads no pixels, an epoch needs
    nothing else: the trainer iterates this instead of :class:`DetectionDataset` and decodes no
    image. Each ``image`` is a zero-stride view of zeros in the canvas shape ``[3, S, S]``, so a
    batch keeps the ``[B, 3, S, S]`` shape that callers read the canvas size from.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.samples: dict[int, Sample] = {}

    def remember(self, images: Tensor, targets: list[Target], metas: list[ImageMeta], indices: list[int]) -> None:
        """Keeps one batch's labels: ``images`` ``[B, 3, S, S]`` gives only its shape."""
        blank = images.new_zeros(()).expand(images.shape[1:])
        for target, meta, index in zip(targets, metas, indices, strict=True):
            self.samples[index] = Sample(blank, target, meta, index)

    @property
    def complete(self) -> bool:
        return len(self.samples) == self.size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> Sample:
        return self.samples[index]
