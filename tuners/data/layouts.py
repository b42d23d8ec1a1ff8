"""Whole datasets as users have them: split folders in one format, an Ultralytics ``data.yaml``, or a
Roboflow COCO export, with the format detected when it is not given.

  splits:      ``DATA/train/`` and ``DATA/val/`` (and ``DATA/test/``), each a coco, voc or yolo split.
  ultralytics: ``DATA/data.yaml`` with ``path``, ``train``, ``val`` (a folder of images, a ``.txt``
               list of images, or a list of either) and ``names`` (a list, or a mapping id -> name);
               each image's labels are in the parallel ``labels/`` folder (``images`` -> ``labels``).
  roboflow:    ``DATA/train/_annotations.coco.json`` with the images beside it, ``valid/``, ``test/``.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from tuners.data.formats import (
    FORMATS,
    IMAGE_SUFFIXES,
    place_images,
    read_coco,
    read_dataset,
    write_coco,
    write_dataset,
    write_yolo_labels,
    yolo_record,
)
from tuners.data.records import DatasetError, DetectionData

LAYOUTS = ("ultralytics", "roboflow")
DATASET_FORMATS = ("auto", *FORMATS, *LAYOUTS)
ROBOFLOW = "_annotations.coco.json"
SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "test": "test"}


def detect_split_format(folder: Path) -> str:
    """The format of one split folder, from the files it holds."""
    if (folder / "annotations.json").is_file():
        return "coco"
    if (folder / "Annotations").is_dir():
        return "voc"
    if (folder / "labels").is_dir() and (folder / "classes.txt").is_file():
        return "yolo"
    raise DatasetError(
        f"{folder}: no annotations.json (coco), Annotations/ (voc) or labels/ + classes.txt (yolo); "
        f"pass --format, or see server-data convert"
    )


def detect_format(root: Path) -> str:
    """The format of a dataset folder (or of a ``data.yaml`` file)."""
    if root.suffix in (".yaml", ".yml") or (root / "data.yaml").is_file():
        return "ultralytics"
    if (root / "train" / ROBOFLOW).is_file():
        return "roboflow"
    if (root / "train").is_dir():
        return detect_split_format(root / "train")
    return detect_split_format(root)


def is_split(root: Path, fmt: str) -> bool:
    """Whether ``root`` is one split folder (no ``train/``, ``val/``... inside) of a split format."""
    return fmt in FORMATS and not any((root / name).is_dir() for name in SPLIT_NAMES)


def read_splits(root: Path, fmt: str = "auto") -> tuple[dict[str, DetectionData], str]:
    """Every split of the dataset at ``root`` (``train``, ``val``, maybe ``test``), and its format.

    A folder that is itself one split (no ``train/``) is returned as ``{"train": ...}``.
    """
    if not root.exists():
        raise DatasetError(f"{root} does not exist")
    if fmt not in DATASET_FORMATS:
        raise DatasetError(f"unknown format {fmt!r}; use one of {', '.join(DATASET_FORMATS)}")
    fmt = detect_format(root) if fmt == "auto" else fmt
    if fmt == "ultralytics":
        return read_ultralytics(root if root.suffix in (".yaml", ".yml") else root / "data.yaml"), fmt
    if fmt == "roboflow":
        return read_roboflow(root), fmt
    folders = {SPLIT_NAMES[p.name]: p for p in sorted(root.iterdir()) if p.is_dir() and p.name in SPLIT_NAMES}
    if not folders:
        return {"train": read_dataset(root, fmt)}, fmt
    return {split: read_dataset(folder, fmt) for split, folder in folders.items()}, fmt


def read_roboflow(root: Path) -> dict[str, DetectionData]:
    splits = {}
    for name, split in SPLIT_NAMES.items():
        if (root / name / ROBOFLOW).is_file():
            data = _drop_group_category(read_coco(root / name, ROBOFLOW, "."), root / name / ROBOFLOW)
            data.validate()
            splits[split] = data
    return splits


def _drop_group_category(data: DetectionData, path: Path) -> DetectionData:
    """Roboflow lists its dataset's name as category 0, the supercategory of the real classes, with
    no boxes. It is left out (when it has boxes, it is a real class and stays)."""
    categories = sorted(json.loads(path.read_text())["categories"], key=lambda c: c["id"])
    groups = {c.get("supercategory") for c in categories[1:]}
    used = {int(label) for r in data.records for label in r.labels.tolist()}
    if len(categories) < 2 or categories[0]["name"] not in groups or 0 in used:
        return data
    for r in data.records:
        r.labels = r.labels - 1
    return DetectionData(data.classes[1:], data.records, data.description)


def _images(entry: str | list[str], base: Path) -> list[Path]:
    """Images named by one ``data.yaml`` split entry: folders, ``.txt`` lists of paths, or lists of both."""
    found: list[Path] = []
    for item in [entry] if isinstance(entry, str) else entry:
        path = (base / item).resolve()
        if path.suffix == ".txt":
            lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
            found += [(path.parent / line).resolve() for line in lines]
        elif path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            raise DatasetError(f"data.yaml names {item!r}, which is not a folder or a .txt list under {base}")
    return found


def _labels_for(image: Path) -> Path:
    """Ultralytics' rule: the last ``images`` folder of the path becomes ``labels``, suffix ``.txt``."""
    parts = list(image.parts)
    at = len(parts) - 1 - parts[::-1].index("images") if "images" in parts else None
    if at is None:
        return image.with_suffix(".txt")
    parts[at] = "labels"
    return Path(*parts).with_suffix(".txt")


def read_ultralytics(path: Path) -> dict[str, DetectionData]:
    try:
        spec = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise DatasetError(f"cannot read {path}: {e}") from e
    if not isinstance(spec, dict) or "names" not in spec or "train" not in spec:
        raise DatasetError(f"{path} needs at least 'train' and 'names' (and usually 'path' and 'val')")
    names = spec["names"]
    classes = [str(names[k]) for k in sorted(names)] if isinstance(names, dict) else [str(n) for n in names]
    base = path.parent / str(spec.get("path") or ".")
    splits = {}
    for split in ("train", "val", "test"):
        if spec.get(split):
            records = [yolo_record(image, _labels_for(image)) for image in _images(spec[split], base)]
            splits[split] = DetectionData(classes, records)
            splits[split].validate()
    return splits


def write_splits(splits: dict[str, DetectionData], root: Path, fmt: str) -> None:
    """Writes ``splits`` as a dataset in ``fmt`` (a split format: one folder per split; or a layout)."""
    root.mkdir(parents=True, exist_ok=True)
    if fmt == "ultralytics":
        for split, data in splits.items():
            place_images(data, root / "images" / split, True)
            write_yolo_labels(data, root / "labels" / split)
        classes = next(iter(splits.values())).classes
        spec = {"path": ".", **{s: f"images/{s}" for s in splits}, "names": dict(enumerate(classes))}
        (root / "data.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    elif fmt == "roboflow":
        for split, data in splits.items():
            folder = root / {"val": "valid"}.get(split, split)
            write_coco(data, folder, annotations=ROBOFLOW, images=".")
    else:
        for split, data in splits.items():
            write_dataset(data, root / split, fmt)
