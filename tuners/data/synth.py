"""A seeded detection dataset composited from real labelled pixels, with exact boxes.

Objects: scikit-learn's 1,797 handwritten 8x8 digits (10 classes) and scikit-image's LFW crops
(100 faces; the 100 non-face crops are pasted unlabelled, as hard negatives). Backgrounds: crops
of real photos and textures from scikit-image and scikit-learn. This is a composited set for
tests, demos and benchmarks, not a public benchmark: its numbers say nothing about COCO.

``faces-photo`` is ``faces`` made to look like photos, so that a task trained on it transfers
better to real ones (the real-photo set of :mod:`tuners.data.real_faces` measures it). Each choice
removes a shortcut that a detector could learn from compositing instead of from faces:

- No background shows an unlabelled face (``astronaut.png`` is left out), which would teach
  "face = background".
- LFW's crops are grey on colour backgrounds: 70% of them are tinted with a random skin tone,
  and 25% of whole images are made grey, so colour says nothing about where a face is.
- Pastes are feathered (alpha ramps over the outer 12% of the crop), not hard-edged squares.
- Blur (Gaussian, radius 0 to 1) and noise (sigma 0 to 6) are applied to the whole image, so the
  paste and the background share them.
- Faces range from 12 to 120 px (``SynthConfig``), and their boxes extend 12% above and 8% below
  the crop, towards the forehead-to-chin boxes of face datasets and detectors (WIDER FACE, MTCNN).

The data files are located with ``importlib.util.find_spec`` and read as CSV/NPY/PNG; neither
package is imported.
"""

from __future__ import annotations

import gzip
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from tuners.data.formats import write_coco
from tuners.data.records import DatasetError, DetectionData, ImageRecord

_BACKGROUNDS = (
    "astronaut.png",
    "coffee.png",
    "chelsea.png",
    "rocket.jpg",
    "grass.png",
    "gravel.png",
    "brick.png",
    "motorcycle_left.png",
)


@dataclass(frozen=True)
class SynthTask:
    """Which objects are pasted and which of them are labelled (others are distractors)."""

    classes: list[str]
    kinds: tuple[str, ...]  # object kinds drawn with equal probability: "digit", "face", "nonface"
    label: Callable[[str, int], int | None]  # (kind, source class) -> task class index or None
    photo_style: bool = False  # see the module docstring (faces-photo)


TASKS: dict[str, SynthTask] = {
    "digits": SynthTask([str(d) for d in range(10)], ("digit",), lambda k, c: c),
    "digits-low": SynthTask([str(d) for d in range(5)], ("digit",), lambda k, c: c if c < 5 else None),
    "digits-high": SynthTask([str(d) for d in range(5, 10)], ("digit",), lambda k, c: c - 5 if c >= 5 else None),
    "faces": SynthTask(["face"], ("face", "nonface"), lambda k, c: 0 if k == "face" else None),
    "faces-photo": SynthTask(["face"], ("face", "nonface"), lambda k, c: 0 if k == "face" else None, True),
}
FACE_PHOTOS = {"astronaut.png"}  # backgrounds with a face in them: never used by photo-style tasks


@dataclass(frozen=True)
class SynthConfig:
    task: str = "digits"
    images: int = 200
    size: int = 320
    min_objects: int = 1
    max_objects: int = 4
    min_scale: int = 24
    max_scale: int = 72
    seed: int = 0
    val_fraction: float = 0.2

    def __post_init__(self) -> None:
        problems = []
        if self.task not in TASKS:
            problems.append(f"task must be one of {sorted(TASKS)}, got {self.task!r}")
        if not 0 < self.min_objects <= self.max_objects:
            problems.append("need 0 < min_objects <= max_objects")
        if not 8 <= self.min_scale <= self.max_scale <= self.size // 2:
            problems.append("need 8 <= min_scale <= max_scale <= size / 2")
        if self.images < 2 or not 0 < self.val_fraction < 1:
            problems.append("need at least 2 images and 0 < val_fraction < 1")
        if problems:
            raise ValueError("; ".join(problems))


def package_dir(name: str) -> Path:
    """Folder of an installed package whose data files we read, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError(f"{name} is not installed; `make install` installs it (--no-deps, data files only)")
    return Path(list(spec.submodule_search_locations)[0])


def photo(name: str) -> Path:
    """One of scikit-image's sample photos (``astronaut.png``, ``coffee.png``, ...) for demos and tests."""
    return package_dir("skimage") / "data" / name


@dataclass
class Sources:
    """Real labelled crops and backgrounds, as uint8/float arrays."""

    digits: np.ndarray  # [1797, 8, 8] float in [0, 1]
    digit_labels: np.ndarray  # [1797] int
    faces: np.ndarray  # [100, 25, 25] float in [0, 1]
    nonfaces: np.ndarray  # [100, 25, 25]
    backgrounds: list[np.ndarray]  # [H, W, 3] uint8
    background_names: tuple[str, ...] = ()

    @classmethod
    def load(cls) -> Sources:
        sklearn, skimage = package_dir("sklearn"), package_dir("skimage")
        with gzip.open(sklearn / "datasets/data/digits.csv.gz") as f:
            table = np.loadtxt(f, delimiter=",")
        lfw = np.load(skimage / "data/lfw_subset.npy", allow_pickle=False)
        photos = [skimage / "data" / n for n in _BACKGROUNDS] + [sklearn / "datasets/images/china.jpg"]
        backgrounds = [np.asarray(Image.open(p).convert("RGB")) for p in photos]
        names = tuple(p.name for p in photos)
        digits, labels = table[:, :64].reshape(-1, 8, 8) / 16.0, table[:, 64].astype(int)
        return cls(digits, labels, lfw[:100], lfw[100:], backgrounds, names)


def _background(src: Sources, rng: np.random.Generator, size: int, photo_style: bool = False) -> np.ndarray:
    pool = src.backgrounds
    if photo_style and src.background_names:
        pool = [b for b, n in zip(src.backgrounds, src.background_names) if n not in FACE_PHOTOS]
    photo = pool[rng.integers(len(pool))]
    h, w = photo.shape[:2]
    side = int(rng.integers(min(h, w) // 2, min(h, w) + 1))
    y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    crop = Image.fromarray(photo[y : y + side, x : x + side]).resize((size, size), Image.BILINEAR)
    return np.asarray(crop).astype(np.float32)


def _object(src: Sources, kind: str, rng: np.random.Generator, side: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Returns (alpha [s, s], colour [s, s, 3], source class) for one object of ``side`` pixels."""
    if kind == "digit":
        i = int(rng.integers(len(src.digits)))
        alpha = np.asarray(
            Image.fromarray((src.digits[i] * 255).astype(np.uint8)).resize((side, side), Image.BILINEAR)
        )
        colour = np.broadcast_to(rng.integers(0, 256, 3).astype(np.float32), (side, side, 3))
        return alpha.astype(np.float32) / 255.0, colour, int(src.digit_labels[i])
    pool = src.faces if kind == "face" else src.nonfaces
    patch = np.asarray(Image.fromarray((pool[rng.integers(len(pool))] * 255).astype(np.uint8)).resize((side, side)))
    return np.ones((side, side), np.float32), np.repeat(patch[..., None], 3, axis=2).astype(np.float32), 0


def _photo_style_object(alpha: np.ndarray, colour: np.ndarray, rng: np.random.Generator) -> tuple:
    """A face or non-face crop tinted with a skin tone (70%) and feathered at its border."""
    if rng.random() < 0.7:
        tint = np.array([rng.uniform(0.9, 1.15), rng.uniform(0.7, 0.95), rng.uniform(0.55, 0.85)], np.float32)
        colour = np.clip(colour * tint, 0, 255)
    side = alpha.shape[0]
    yy, xx = np.mgrid[0:side, 0:side] / max(side - 1, 1)
    edge = np.minimum.reduce([xx, yy, 1 - xx, 1 - yy])
    return np.clip(edge / 0.12, 0, 1).astype(np.float32) * alpha, colour


def _photo_style_image(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Whole-image greyscale (25%), Gaussian blur and noise, shared by the pastes and the background."""
    image = Image.fromarray(pixels)
    if rng.random() < 0.25:
        image = image.convert("L").convert("RGB")
    radius = float(rng.uniform(0, 1.0))
    if radius > 0.2:
        image = image.filter(ImageFilter.GaussianBlur(radius))
    noisy = np.asarray(image).astype(np.float32) + rng.normal(0, rng.uniform(0, 6), pixels.shape)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def _free(box: tuple[int, int, int, int], taken: list[tuple[int, int, int, int]], margin: int = 2) -> bool:
    x1, y1, x2, y2 = box
    return all(
        x2 + margin <= a1 or a2 + margin <= x1 or y2 + margin <= b1 or b2 + margin <= y1 for a1, b1, a2, b2 in taken
    )


def compose(
    src: Sources, task: SynthTask, cfg: SynthConfig, rng: np.random.Generator
) -> tuple[np.ndarray, list, list]:
    """One ``[S, S, 3]`` uint8 image, its exact xyxy boxes (tight around visible ink) and labels."""
    canvas = _background(src, rng, cfg.size, task.photo_style)
    boxes, labels, taken = [], [], []
    for _ in range(int(rng.integers(cfg.min_objects, cfg.max_objects + 1))):
        side = int(rng.integers(cfg.min_scale, cfg.max_scale + 1))
        for _attempt in range(30):
            x, y = int(rng.integers(0, cfg.size - side + 1)), int(rng.integers(0, cfg.size - side + 1))
            if _free((x, y, x + side, y + side), taken):
                break
        else:
            continue
        kind = task.kinds[int(rng.integers(len(task.kinds)))]
        alpha, colour, cls = _object(src, kind, rng, side)
        if task.photo_style:
            alpha, colour = _photo_style_object(alpha, colour, rng)
        region = canvas[y : y + side, x : x + side]
        canvas[y : y + side, x : x + side] = region * (1 - alpha[..., None]) + colour * alpha[..., None]
        taken.append((x, y, x + side, y + side))
        label = task.label(kind, cls)
        ys, xs = np.nonzero(alpha > 0)
        if label is not None and len(xs):
            box = [x + int(xs.min()), y + int(ys.min()), x + int(xs.max()) + 1, y + int(ys.max()) + 1]
            if task.photo_style:  # forehead to chin: taller than the crop
                h = box[3] - box[1]
                box[1], box[3] = max(0, box[1] - round(0.12 * h)), min(cfg.size, box[3] + round(0.08 * h))
            boxes.append(box)
            labels.append(label)
    pixels = np.clip(canvas + 0.5, 0, 255).astype(np.uint8)
    return (_photo_style_image(pixels, rng) if task.photo_style else pixels), boxes, labels


def generate(cfg: SynthConfig, out: Path, sources: Sources | None = None) -> dict[str, DetectionData]:
    """Writes ``out/train`` and ``out/val`` in COCO format; byte-for-byte identical for a seed."""
    import torch

    src = sources or Sources.load()
    task = TASKS[cfg.task]
    rng = np.random.default_rng(cfg.seed)
    n_val = max(1, round(cfg.images * cfg.val_fraction))
    splits: dict[str, DetectionData] = {}
    for split, count in (("train", cfg.images - n_val), ("val", n_val)):
        folder = out / split / "images"
        folder.mkdir(parents=True, exist_ok=True)
        records = []
        for i in range(count):
            pixels, boxes, labels = compose(src, task, cfg, rng)
            path = folder / f"{split}_{i:05d}.png"
            Image.fromarray(pixels).save(path, format="PNG", optimize=False)
            records.append(
                ImageRecord(
                    path,
                    cfg.size,
                    cfg.size,
                    torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4),
                    torch.tensor(labels, dtype=torch.int64),
                )
            )
        description = (
            f"synth:{cfg.task} composited from real labelled crops (scikit-learn digits, scikit-image "
            f"LFW) on real photos; seed={cfg.seed}; {split}; not a public benchmark"
        )
        splits[split] = DetectionData(task.classes, records, description)
        write_coco(splits[split], out / split, copy_images=False)
    return splits
