"""What the offline commands share with the trainer and the server: the backbone an artifact was
trained on, the one decoder and preprocess (:meth:`models.transform.ImageTransform.load`, as the
server reads a request's image) and the one postprocess (:meth:`TaskModel.predict`)."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from models import PostprocessConfig, build_backbone
from models.backbones.base import FrozenBackbone
from models.imaging import ImageDecodeError
from models.runtime.torch import resolve_device
from models.transform import ImageMeta, ImageTransform, PreprocessSpec
from models.types import Detections
from tuners.artifact import load_artifact, read_manifest
from tuners.commands import UsageError, add_common, positive_int
from tuners.data.files import IMAGE_SUFFIXES, listed
from tuners.task_model import TaskModel


@dataclass
class Task:
    """A loaded artifact: its model on the backbone it was trained on (fingerprint checked)."""

    backbone: FrozenBackbone
    model: TaskModel
    manifest: dict[str, Any]
    device: torch.device


def add_task_arguments(parser: argparse.ArgumentParser) -> None:
    add_common(parser)
    parser.add_argument("artifact", type=Path, help="artifact folder: tuner.json + tuner.safetensors (a run's best/)")
    parser.add_argument("--weights", help="backbone weights path, if not the offline package (default: offline)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu", help="(default: cpu)")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="images per forward (default: 8)")


def load_task(artifact: Path, weights: str | None = None, device: str = "cpu") -> Task:
    """Builds the artifact's backbone (name and canvas from its manifest) and loads the task on it."""
    if not (artifact / "tuner.json").is_file():
        raise UsageError(f"{artifact} is not an artifact folder: it has no tuner.json (a run keeps one in OUT/best)")
    manifest = read_manifest(artifact)
    preprocess = PreprocessSpec.from_dict(manifest["preprocess"])
    where = resolve_device(device)
    name = manifest["backbone"]["name"]
    backbone = build_backbone(name, weights=weights, allow_download=False, preprocess=preprocess).to(where)
    model, _ = load_artifact(artifact, backbone, manifest)
    return Task(backbone, model.to(where), manifest, where)


def image_paths(sources: list[Path]) -> list[Path]:
    """Files as given, and the images inside folders (sorted), as Ultralytics' ``source`` reads them."""
    found: list[Path] = []
    for source in sources:
        if source.is_dir():
            found += listed(source, IMAGE_SUFFIXES, recursive=True)
        elif source.is_file():
            found.append(source)
        else:
            raise UsageError(f"{source} does not exist")
    if not found:
        raise UsageError(f"no images in {', '.join(map(str, sources))}")
    return found


@torch.no_grad()
def detect(
    task: Task, images: list[tuple[torch.Tensor, ImageMeta]], post: PostprocessConfig, batch_size: int = 8
) -> list[Detections]:
    """Detections per image resized for the canvas (:meth:`ImageTransform.load`), boxes xyxy in original pixels."""
    transform = ImageTransform(task.backbone.preprocess)
    found: list[Detections] = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        canvas = torch.stack([transform.canvas(image) for image, _ in chunk]).to(task.device)
        found += [d.to("cpu") for d in task.model.predict(task.backbone, canvas, [m for _, m in chunk], post)]
    return found


def detect_files(
    task: Task, paths: list[Path], post: PostprocessConfig, batch_size: int = 8
) -> Iterator[tuple[Path, ImageMeta, Detections]]:
    """(path, its resize record, detections) per file, read as the server reads a request's image
    (:meth:`ImageTransform.load`), a batch at a time: any number of images in bounded memory."""
    transform = ImageTransform(task.backbone.preprocess)
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        images = [_load(transform, p) for p in chunk]
        yield from zip(chunk, [meta for _, meta in images], detect(task, images, post, batch_size))


def _load(transform: ImageTransform, path: Path) -> tuple[torch.Tensor, ImageMeta]:
    """:meth:`ImageTransform.load` of a file; a decode error names the file."""
    try:
        return transform.load(path.read_bytes())
    except ImageDecodeError as e:
        raise ImageDecodeError(e.kind, f"{path}: {e}") from e
