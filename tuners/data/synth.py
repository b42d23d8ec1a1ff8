"""A seeded detection dataset composited from real labelled pixels, with exact boxes.

Objects: scikit-learn's 1,797 handwritten 8x8 digits (10 classes) and scikit-image's LFW crops
(100 faces; the 100 non-face crops are pasted unlabelled, as hard negatives). Backgrounds: crops
of real photos and textures from scikit-image and scikit-learn. This is a composited set for
tests, demos and benchmarks, not a public benchmark: its numbers say nothing about COCO.

``faces-photo`` is ``faces`` made to look like photos, so that a task trained on it transfers
to real ones (the real-photo set of :mod:`tuners.data.real_faces` measures it). Each choice
removes a shortcut that a detector could learn from compositing instead of from faces:

- No background shows an unlabelled face (``astronaut.png`` is left out), which would teach
  "face = background". Grey real photos (a clock, cells, text, a page) join the backgrounds.
- LFW's crops are grey on colour backgrounds: 70% of them are tinted with a random skin tone,
  and 25% of whole images are made grey, so colour says nothing about where a face is.
- Pastes are feathered (alpha ramps over the outer 12% of the crop), not hard-edged squares.
- 100 crops of 25 px make few faces, and blurry ones once enlarged: every LFW crop (face or not)
  is mirrored at random, given a random gamma, contrast and brightness, resized bicubically and,
  above 50 px, sharpened (unsharp mask), as real faces at that size are sharp.
- Hard negatives: besides LFW's non-face crops, square regions of the real photos are pasted
  with the same tint and feathering, so "a tinted, feathered square" is not a face either.
- Blur (Gaussian, radius 0 to 1), noise (sigma 0 to 6) and, for half of the images, JPEG
  compression (quality 30 to 90) are applied to the whole image, so the pastes and the background
  share them.
- Faces range from ``min_scale`` to ``max_scale`` px (the demo: 12 to 120). Each face is boxed
  where MTCNN boxes it on its LFW crop (``lfw_face_boxes.json``, written by
  ``bench/label_real_faces.py``): forehead to chin, about 0.75 of the crop wide and 1.3 times as
  tall as wide, as face detectors and WIDER FACE box faces, and as the real-photo set is labelled.
  Boxing the crop's square instead capped the IoU of a perfect prediction at about 0.6.

The data files are located with ``importlib.util.find_spec`` and read as CSV/NPY/PNG; neither
package is imported.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from models.transform import MAX_CANVAS
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
# Real grey photos that only the photo-style tasks use: more scenes, none of them in the real-photo set.
_PHOTO_STYLE_BACKGROUNDS = ("clock_motion.png", "cell.png", "text.png", "page.png")
LFW_BOXES = Path(__file__).with_name("lfw_face_boxes.json")


@dataclass(frozen=True)
class SynthTask:
    """Which objects are pasted and which of them are labelled (others are distractors)."""

    classes: list[str]
    kinds: tuple[str, ...]  # object kinds drawn with equal probability: "digit", "face", "nonface", "patch"
    label: Callable[[str, int], int | None]  # (kind, source class) -> task class index or None
    photo_style: bool = False  # see the module docstring (faces-photo)
    test_backgrounds: frozenset[str] = frozenset()  # photos only the test split draws from (a domain shift)


TASKS: dict[str, SynthTask] = {
    "digits": SynthTask([str(d) for d in range(10)], ("digit",), lambda k, c: c),
    "digits-low": SynthTask([str(d) for d in range(5)], ("digit",), lambda k, c: c if c < 5 else None),
    "digits-high": SynthTask([str(d) for d in range(5, 10)], ("digit",), lambda k, c: c - 5 if c >= 5 else None),
    "faces": SynthTask(["face"], ("face", "nonface"), lambda k, c: 0 if k == "face" else None),
    "digits-clutter": SynthTask(
        [str(d) for d in range(10)],
        ("digit", "digit", "digit", "face", "nonface", "patch"),
        lambda k, c: c if k == "digit" else None,
        test_backgrounds=frozenset({"astronaut.png", "rocket.jpg", "motorcycle_left.png", "china.jpg"}),
    ),
    "faces-photo": SynthTask(
        ["face"], ("face", "face", "nonface", "patch"), lambda k, c: 0 if k == "face" else None, True
    ),
}
FACE_PHOTOS = {"astronaut.png"}  # backgrounds with a face in them: never used by photo-style tasks
PHOTO_STYLE_ONLY = set(_PHOTO_STYLE_BACKGROUNDS)


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
    test_images: int = 0  # a third split, "test", drawn after train and val (from the task's test backgrounds)

    def __post_init__(self) -> None:
        problems = []
        if self.task not in TASKS:
            problems.append(f"task must be one of {sorted(TASKS)}, got {self.task!r}")
        if not 0 < self.min_objects <= self.max_objects:
            problems.append(f"need 0 < min_objects <= max_objects, got {self.min_objects} and {self.max_objects}")
        if self.size > MAX_CANVAS:  # as server-train's and server-serve's image_size
            problems.append(f"need size <= {MAX_CANVAS} px, got {self.size}")
        if not 8 <= self.min_scale <= self.max_scale <= self.size // 2:
            problems.append(
                f"need 8 <= min_scale <= max_scale <= size / 2, got {self.min_scale} and {self.max_scale} "
                f"with size {self.size}"
            )
        if self.images < 2 or not 0 < self.val_fraction < 1 or self.test_images < 0:
            problems.append(
                f"need at least 2 images, 0 < val_fraction < 1 and test_images >= 0, got {self.images}, "
                f"{self.val_fraction} and {self.test_images}"
            )
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


def lfw_subset() -> np.ndarray:
    """scikit-image's LFW crops, ``[200, 25, 25]`` float in [0, 1]: 100 faces, then 100 non-faces."""
    return np.load(package_dir("skimage") / "data/lfw_subset.npy", allow_pickle=False)


@dataclass
class Sources:
    """Real labelled crops and backgrounds, as uint8/float arrays."""

    digits: np.ndarray  # [1797, 8, 8] float in [0, 1]
    digit_labels: np.ndarray  # [1797] int
    faces: np.ndarray  # [100, 25, 25] float in [0, 1]
    nonfaces: np.ndarray  # [100, 25, 25]
    backgrounds: list[np.ndarray]  # [H, W, 3] uint8
    background_names: tuple[str, ...] = ()
    face_boxes: np.ndarray | None = None  # [100, 4] MTCNN's x1, y1, x2, y2 on each face crop, in crop units

    @classmethod
    def load(cls) -> Sources:
        sklearn, skimage = package_dir("sklearn"), package_dir("skimage")
        with gzip.open(sklearn / "datasets/data/digits.csv.gz") as f:
            table = np.loadtxt(f, delimiter=",")
        lfw = lfw_subset()
        photos = [skimage / "data" / n for n in _BACKGROUNDS] + [sklearn / "datasets/images/china.jpg"]
        photos += [skimage / "data" / n for n in _PHOTO_STYLE_BACKGROUNDS]
        backgrounds = [np.asarray(Image.open(p).convert("RGB")) for p in photos]
        names = tuple(p.name for p in photos)
        digits, labels = table[:, :64].reshape(-1, 8, 8) / 16.0, table[:, 64].astype(int)
        face_boxes = np.asarray(json.loads(LFW_BOXES.read_text())["boxes"], dtype=np.float64)
        return cls(digits, labels, lfw[:100], lfw[100:], backgrounds, names, face_boxes)


def backgrounds_for(src: Sources, task: SynthTask, split: str) -> list[np.ndarray]:
    """The photos a task's split draws backgrounds and photo patches from: photo-style tasks skip
    photos with faces and add grey ones; a task with test backgrounds keeps them for ``test``."""
    if not src.background_names:
        return src.backgrounds
    skip = FACE_PHOTOS if task.photo_style else PHOTO_STYLE_ONLY
    keep = [n not in skip for n in src.background_names]
    if task.test_backgrounds:
        held_out = [n in task.test_backgrounds for n in src.background_names]
        keep = [k and h == (split == "test") for k, h in zip(keep, held_out)]
    return [b for b, k in zip(src.backgrounds, keep) if k]


def _background(pool: list[np.ndarray], rng: np.random.Generator, size: int) -> np.ndarray:
    """A random square crop of a random photo of ``pool``, resized to ``[size, size, 3]`` float."""
    photo = pool[rng.integers(len(pool))]
    h, w = photo.shape[:2]
    side = int(rng.integers(min(h, w) // 2, min(h, w) + 1))
    y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    crop = Image.fromarray(photo[y : y + side, x : x + side]).resize((size, size), Image.BILINEAR)
    return np.asarray(crop).astype(np.float32)


def _object(
    src: Sources, kind: str, rng: np.random.Generator, side: int, pool: list[np.ndarray], photo_style: bool = False
) -> tuple[np.ndarray, np.ndarray, int, np.ndarray | None]:
    """(alpha [s, s], colour [s, s, 3], source class, MTCNN's face box in crop units or None) for
    one object of ``side`` pixels."""
    if kind == "digit":
        i = int(rng.integers(len(src.digits)))
        alpha = np.asarray(
            Image.fromarray((src.digits[i] * 255).astype(np.uint8)).resize((side, side), Image.BILINEAR)
        )
        colour = np.broadcast_to(rng.integers(0, 256, 3).astype(np.float32), (side, side, 3))
        return alpha.astype(np.float32) / 255.0, colour, int(src.digit_labels[i]), None
    if kind == "patch":  # a square region of a real photo of the split's pool (a hard negative)
        return np.ones((side, side), np.float32), _background(pool, rng, side), 0, None
    crops = src.faces if kind == "face" else src.nonfaces
    i = int(rng.integers(len(crops)))
    grey = Image.fromarray((crops[i] * 255).astype(np.uint8))
    box = src.face_boxes[i].copy() if kind == "face" and src.face_boxes is not None else None
    if photo_style:
        grey, flipped = _photo_style_crop(grey, side, rng)
        if flipped and box is not None:
            box[[0, 2]] = 1.0 - box[[2, 0]]
    else:
        grey = grey.resize((side, side))
    patch = np.asarray(grey)
    return np.ones((side, side), np.float32), np.repeat(patch[..., None], 3, axis=2).astype(np.float32), 0, box


def _photo_style_crop(grey: Image.Image, side: int, rng: np.random.Generator) -> tuple[Image.Image, bool]:
    """An LFW crop (face or not) mirrored (50%), with random gamma, contrast and brightness, resized
    bicubically to ``side`` and, when enlarged more than twice, sharpened: 100 crops of 25 px make
    a few, blurry faces, and real faces at 50 to 120 px are sharp. Returns (crop, mirrored)."""
    flipped = bool(rng.random() < 0.5)
    if flipped:
        grey = grey.transpose(Image.FLIP_LEFT_RIGHT)
    tone = np.asarray(grey).astype(np.float32) / 255.0
    tone = tone ** rng.uniform(0.7, 1.4)
    tone = (tone - tone.mean()) * rng.uniform(0.7, 1.3) + tone.mean() + rng.uniform(-0.1, 0.1)
    grey = Image.fromarray(np.clip(tone * 255 + 0.5, 0, 255).astype(np.uint8)).resize((side, side), Image.BICUBIC)
    if side > 50:
        grey = grey.filter(ImageFilter.UnsharpMask(radius=side / 40, percent=int(rng.integers(60, 160)), threshold=2))
    return grey, flipped


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
    """Whole-image greyscale (25%), Gaussian blur, noise and JPEG (50%), shared by the pastes and the background."""
    image = Image.fromarray(pixels)
    if rng.random() < 0.25:
        image = image.convert("L").convert("RGB")
    radius = float(rng.uniform(0, 1.0))
    if radius > 0.2:
        image = image.filter(ImageFilter.GaussianBlur(radius))
    noisy = np.asarray(image).astype(np.float32) + rng.normal(0, rng.uniform(0, 6), pixels.shape)
    out = np.clip(noisy, 0, 255).astype(np.uint8)
    if rng.random() < 0.5:
        buffer = io.BytesIO()
        Image.fromarray(out).save(buffer, format="JPEG", quality=int(rng.integers(30, 91)))
        out = np.asarray(Image.open(buffer).convert("RGB"))
    return out


def _free(box: tuple[int, int, int, int], taken: list[tuple[int, int, int, int]], margin: int = 2) -> bool:
    x1, y1, x2, y2 = box
    return all(
        x2 + margin <= a1 or a2 + margin <= x1 or y2 + margin <= b1 or b2 + margin <= y1 for a1, b1, a2, b2 in taken
    )


def compose(
    src: Sources, task: SynthTask, cfg: SynthConfig, rng: np.random.Generator, pool: list[np.ndarray]
) -> tuple[np.ndarray, list, list]:
    """One ``[S, S, 3]`` uint8 image on a crop of ``pool``, its exact xyxy boxes (tight around
    visible ink; photo-style faces: MTCNN's box) and labels."""
    canvas = _background(pool, rng, cfg.size)
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
        alpha, colour, cls, face_box = _object(src, kind, rng, side, pool, task.photo_style)
        if task.photo_style:
            alpha, colour = _photo_style_object(alpha, colour, rng)
        region = canvas[y : y + side, x : x + side]
        canvas[y : y + side, x : x + side] = region * (1 - alpha[..., None]) + colour * alpha[..., None]
        taken.append((x, y, x + side, y + side))
        label = task.label(kind, cls)
        ys, xs = np.nonzero(alpha > 0)
        if label is not None and len(xs):
            if task.photo_style and face_box is not None:  # where MTCNN boxes this face
                fx1, fy1, fx2, fy2 = face_box
                box = [max(0, x + round(fx1 * side)), max(0, y + round(fy1 * side)),
                       min(cfg.size, x + round(fx2 * side)), min(cfg.size, y + round(fy2 * side))]  # fmt: skip
            else:
                box = [x + int(xs.min()), y + int(ys.min()), x + int(xs.max()) + 1, y + int(ys.max()) + 1]
            boxes.append(box)
            labels.append(label)
    pixels = np.clip(canvas + 0.5, 0, 255).astype(np.uint8)
    return (_photo_style_image(pixels, rng) if task.photo_style else pixels), boxes, labels


def _write_png(pixels: np.ndarray, path: Path) -> None:
    """``[H, W, 3]`` uint8 as PNG at zlib level 3: files a few percent larger than the default level 6
    makes (4 to 6% on the demo datasets), written several times faster; the pixels are the same."""
    Image.fromarray(pixels).save(path, format="PNG", optimize=False, compress_level=3)


def generate(cfg: SynthConfig, out: Path, sources: Sources | None = None) -> dict[str, DetectionData]:
    """Writes ``out/train``, ``out/val`` (and ``out/test`` when ``cfg.test_images``) in COCO format;
    byte-for-byte identical for a seed. ``images`` counts train + val; the test split comes last, so
    asking for it leaves train and val as they were."""
    import torch

    src = sources or Sources.load()
    task = TASKS[cfg.task]
    rng = np.random.default_rng(cfg.seed)
    n_val = max(1, round(cfg.images * cfg.val_fraction))
    splits: dict[str, DetectionData] = {}
    for split, count in (("train", cfg.images - n_val), ("val", n_val), ("test", cfg.test_images)):
        if not count:
            continue
        pool = backgrounds_for(src, task, split)
        folder = out / split / "images"
        folder.mkdir(parents=True, exist_ok=True)
        records, written = [], []
        with ThreadPoolExecutor(max_workers=1) as writer:  # zlib releases the GIL: PNGs encode while the next composes
            for i in range(count):
                pixels, boxes, labels = compose(src, task, cfg, rng, pool)
                path = folder / f"{split}_{i:05d}.png"
                written.append(writer.submit(_write_png, pixels, path))
                box_tensor = torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4)
                records.append(
                    ImageRecord(path, cfg.size, cfg.size, box_tensor, torch.tensor(labels, dtype=torch.int64))
                )
        for done in written:
            done.result()  # raises a failed write
        description = (
            f"synth:{cfg.task} composited from real labelled crops (scikit-learn digits, scikit-image "
            f"LFW) on real photos; seed={cfg.seed}; {split}; not a public benchmark"
        )
        splits[split] = DetectionData(task.classes, records, description)
        write_coco(splits[split], out / split, copy_images=False)
    return splits
