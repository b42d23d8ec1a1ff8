"""Whole datasets as users have them: split folders in one format, an Ultralytics ``data.yaml``, or a
Roboflow COCO export, with the format detected when it is not given.

  splits:      ``DATA/train/`` and ``DATA/val/`` (and ``DATA/test/``), each a coco, voc or yolo split.
  coco:        ``DATA/annotations/instances_<name>.json`` with the images in ``DATA/<name>/`` (COCO's
               own download, Detectron2, CVAT); ``<name>`` says the split (``train2017``, ``val2017``).
               Or one COCO ``.json`` file, its images in an ``images/`` folder next to it, or next to it.
  voc:         ``DATA/Annotations`` + ``DATA/JPEGImages`` with ``ImageSets/Main/train.txt``, ``val.txt``
               (``trainval.txt``), ``test.txt`` naming each split's files (the VOC2007/2012 download).
  ultralytics: ``DATA/data.yaml`` with ``path``, ``train``, ``val`` (a folder of images, a ``.txt``
               list of images, or a list of either) and ``names`` (a list, or a mapping id -> name);
               each image's labels are in the parallel ``labels/`` folder (``images`` -> ``labels``).
  roboflow:    ``DATA/train/_annotations.coco.json`` with the images beside it, ``valid/``, ``test/``.
  darknet:     ``DATA/obj.data`` naming ``obj.names`` and ``train.txt`` / ``valid.txt`` lists of images,
               each image's YOLO labels beside it (darknet's own layout; CVAT's "YOLO 1.1" export).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import yaml

from tuners.data.archives import unpacked
from tuners.data.files import IMAGE_SUFFIXES, listed, locate, read_lines
from tuners.data.formats import (
    COCO_FILES,
    FORMATS,
    coco_file,
    place_images,
    read_coco,
    read_coco_file,
    read_dataset,
    read_voc,
    write_coco,
    write_dataset,
    write_yolo_labels,
    yolo_record,
)
from tuners.data.records import DatasetError, DetectionData

log = logging.getLogger(__name__)

LAYOUTS = ("ultralytics", "roboflow", "darknet")
DATASET_FORMATS = ("auto", *FORMATS, *LAYOUTS)
ROBOFLOW = "_annotations.coco.json"
SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "test": "test"}


def detect_split_format(folder: Path) -> str:
    """The format of one split folder, from the files it holds."""
    if any((folder / name).is_file() for name in COCO_FILES):
        return "coco"
    if (folder / "Annotations").is_dir():
        return "voc"
    if (folder / "labels").is_dir() and (folder / "classes.txt").is_file():
        return "yolo"
    if coco_file(folder) is not None:  # Label Studio's result.json, ...
        return "coco"
    if listed(folder, {".xml"}):  # LabelImg and Roboflow write each image's XML file beside it
        return "voc"
    raise DatasetError(
        f"{folder}: no annotations.json or other one .json file (coco), Annotations/ or .xml files (voc), or "
        f"labels/ + classes.txt (yolo); pass --format, or see server-data convert"
    )


def detect_format(root: Path) -> str:
    """The format of a dataset folder (or of a ``data.yaml`` or COCO ``.json`` file)."""
    if root.suffix in (".yaml", ".yml") or (root / "data.yaml").is_file():
        return "ultralytics"
    if root.suffix == ".data" or (root / "obj.data").is_file():
        return "darknet"
    if root.suffix == ".json" or coco_annotation_files(root):
        return "coco"
    if (root / "train" / ROBOFLOW).is_file():
        return "roboflow"
    if (root / "train").is_dir():
        return detect_split_format(root / "train")
    return detect_split_format(root)


def is_split(root: Path, fmt: str) -> bool:
    """Whether ``root`` is one split (a split folder of a split format, or one COCO ``.json`` file)."""
    if root.suffix == ".json":
        return True
    if root.suffix.lower() == ".zip" and root.is_file():
        root = unpacked(root)
    several = len(coco_annotation_files(root)) > 1 or bool(voc_image_sets(root))
    return fmt in FORMATS and not several and not any((root / name).is_dir() for name in SPLIT_NAMES)


def read_splits(root: Path, fmt: str = "auto") -> tuple[dict[str, DetectionData], str]:
    """Every split of the dataset at ``root`` (``train``, ``val``, maybe ``test``), and its format.

    A folder that is itself one split (no ``train/``) is returned as ``{"train": ...}``. A ``.zip``
    file is read from the folder it unpacks into (:func:`~tuners.data.archives.unpacked`).
    """
    if not root.exists():
        raise DatasetError(f"{root} does not exist")
    if root.suffix.lower() == ".zip" and root.is_file():
        root = unpacked(root)
    if fmt not in DATASET_FORMATS:
        raise DatasetError(f"unknown format {fmt!r}; use one of {', '.join(DATASET_FORMATS)}")
    fmt = detect_format(root) if fmt == "auto" else fmt
    if fmt == "ultralytics":
        return read_ultralytics(root if root.suffix in (".yaml", ".yml") else root / "data.yaml"), fmt
    if fmt == "roboflow":
        return read_roboflow(root), fmt
    if fmt == "darknet":
        return read_darknet(root if root.suffix == ".data" else root / "obj.data"), fmt
    if fmt == "coco" and (root.suffix == ".json" or coco_annotation_files(root)):
        return read_coco_layout(root), fmt
    if fmt == "voc" and voc_image_sets(root):
        return read_voc_sets(root), fmt
    if not root.is_dir():
        raise DatasetError(f"{root} is not a folder, which --format {fmt} reads")
    folders = {SPLIT_NAMES[p.name]: p for p in sorted(root.iterdir()) if p.is_dir() and p.name in SPLIT_NAMES}
    if not folders:
        return {"train": read_dataset(root, fmt)}, fmt
    splits = {split: read_dataset(folder, fmt) for split, folder in folders.items()}
    derived = fmt == "voc" and not any((folder / "classes.txt").is_file() for folder in folders.values())
    return (_one_class_list(splits) if derived else splits), fmt


def coco_annotation_files(root: Path) -> dict[str, Path]:
    """Split -> COCO document of ``root/annotations/``: its ``instances_<name>.json`` files (else every
    ``.json`` file), each split named by what ``<name>`` holds (``train``, ``val``, ``test``; one
    file alone is ``train``). Empty where ``root`` has no such folder, or is a split folder itself."""
    folder = root / "annotations"
    if not folder.is_dir() or coco_file(root) is not None:
        return {}
    files = [p for p in listed(folder, {".json"}) if p.name.startswith("instances_")] or listed(folder, {".json"})
    splits: dict[str, Path] = {}
    for path in files:
        name = path.stem.removeprefix("instances_").lower()
        split = "train" if len(files) == 1 else next((s for s in ("train", "val", "test") if s in name), None)
        if split is None or split in splits:
            raise DatasetError(f"{folder}: cannot tell which split {path.name} is; name it instances_train.json, ...")
        splits[split] = path
    return splits


def read_coco_layout(root: Path) -> dict[str, DetectionData]:
    """A COCO ``.json`` file (its images in ``images/`` beside it, or beside it), or the splits of
    :func:`coco_annotation_files` (each one's images in ``<name>/``, ``images/<name>/``, ``images/`` or
    the dataset folder, in that order)."""
    if root.suffix == ".json":
        sources = {"train": (root, [root.parent / "images", root.parent])}
    else:
        sources = {split: (path, _coco_images(root, path)) for split, path in coco_annotation_files(root).items()}
    splits = {split: read_coco_file(path, folders) for split, (path, folders) in sources.items()}
    for data in splits.values():
        data.validate()
    return splits


def _coco_images(root: Path, annotations: Path) -> list[Path]:
    name = annotations.stem.removeprefix("instances_")
    return [root / name, root / "images" / name, root / "images", root]


def voc_image_sets(root: Path) -> dict[str, list[str]]:
    """Split -> file stems of a VOC download's ``ImageSets/Main`` (``train.txt`` or ``trainval.txt``,
    ``val.txt``, ``test.txt``); empty where there is no ``train`` list."""
    folder = root / "ImageSets" / "Main"
    found = {s: folder / f"{s}.txt" for s in ("train", "val", "test") if (folder / f"{s}.txt").is_file()}
    if "train" not in found and (folder / "trainval.txt").is_file():
        found["train"] = folder / "trainval.txt"
    if "train" not in found:
        return {}
    return {split: [line.split()[0] for line in read_lines(path)] for split, path in found.items()}


def read_voc_sets(root: Path) -> dict[str, DetectionData]:
    """Each split :func:`voc_image_sets` lists, with one class list: ``classes.txt``, else every name used."""
    splits = {split: read_voc(root, ids) for split, ids in voc_image_sets(root).items()}
    for data in splits.values():
        data.validate()
    return splits if (root / "classes.txt").is_file() else _one_class_list(splits)


def _one_class_list(splits: dict[str, DetectionData]) -> dict[str, DetectionData]:
    """VOC splits whose classes were read from their objects (no ``classes.txt``) get the union of
    every split's classes, sorted, so that a class seen in one split only keeps one index."""
    union = sorted({c for data in splits.values() for c in data.classes})
    for data in splits.values():
        if data.classes != union:
            index = torch.tensor([union.index(c) for c in data.classes] or [0], dtype=torch.int64)
            for record in data.records:
                record.labels = index[record.labels]
            data.classes = union
    return splits


def read_roboflow(root: Path) -> dict[str, DetectionData]:
    splits = {}
    for name, split in SPLIT_NAMES.items():
        if (root / name / ROBOFLOW).is_file():
            data = _drop_group_category(read_coco(root / name, ROBOFLOW, "."), root / name / ROBOFLOW)
            data.validate()
            splits[split] = data
    if not splits:
        raise DatasetError(f"{root}: no train/{ROBOFLOW}, nor valid/ or test/ (a Roboflow COCO export)")
    return splits


def _drop_group_category(data: DetectionData, path: Path) -> DetectionData:
    """Roboflow lists its dataset's name as category 0, the supercategory of the real classes, with
    no boxes. It is left out (when it has boxes, it is a real class and stays)."""
    categories = sorted(json.loads(path.read_text())["categories"], key=lambda c: c["id"])
    groups = {str(c.get("supercategory")) for c in categories[1:]}  # as text: any JSON value may stand there
    used = {int(label) for r in data.records for label in r.labels.tolist()}
    if len(categories) < 2 or data.classes[0] not in groups or 0 in used:
        return data
    for r in data.records:
        r.labels = r.labels - 1
    return DetectionData(data.classes[1:], data.records, data.description)


def _images(entry: str | list[str], bases: list[Path]) -> list[Path]:
    """Images named by one ``data.yaml`` split entry: folders, ``.txt`` lists of paths, or lists of both."""
    found: list[Path] = []
    for item in [entry] if isinstance(entry, str) else entry:
        path = _entry(str(item), bases)
        if path is not None and path.suffix == ".txt":
            found += [locate([path.parent, *bases], line) for line in read_lines(path)]
        elif path is not None and path.is_dir():
            found += listed(path, IMAGE_SUFFIXES, recursive=True)
        else:
            raise DatasetError(f"data.yaml names {item!r}, which is not a folder or a .txt list under {bases[0]}")
    return found


def _entry(item: str, bases: list[Path]) -> Path | None:
    """Where a ``data.yaml`` entry is: under ``path``, else under the file's folder. An entry written for
    another folder (Roboflow's ``../train/images``, a Colab ``/content/...`` path, ``name-1/train/images``)
    is found by its tail of two parts or more, as Ultralytics finds Roboflow's ``../`` entries."""
    named = Path(item)
    parts = [p for p in named.parts if p not in (named.anchor, "")]
    for k in range(max(1, len(parts) - 1)):
        for base in bases:
            path = base / (Path(*parts[k:]) if k else named)
            if path.exists():
                if k or base != bases[0]:
                    log.info("data.yaml's %r is read from %s", item, path)
                return path.resolve()
    return None


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
    except (OSError, ValueError, yaml.YAMLError) as e:  # ValueError: not UTF-8
        raise DatasetError(f"cannot read {path}: {e}") from e
    if not isinstance(spec, dict) or "names" not in spec or "train" not in spec:
        raise DatasetError(f"{path} needs at least 'train' and 'names' (and usually 'path' and 'val')")
    classes = _class_names(spec["names"], path)
    bases = list(dict.fromkeys([path.parent / str(spec.get("path") or "."), path.parent]))
    splits = {}
    for split in ("train", "val", "test"):
        if spec.get(split):
            if not isinstance(spec[split], str | list):
                raise DatasetError(f"{path}: '{split}' must be a folder or .txt list, or a list of them")
            records = [yolo_record(image, _labels_for(image)) for image in _images(spec[split], bases)]
            splits[split] = DetectionData(classes, records)
            splits[split].validate()
    return splits


def _class_names(names: object, path: Path) -> list[str]:
    """``data.yaml``'s ``names``: a list, or a mapping from each id 0..N-1 to its name."""
    if isinstance(names, dict) and sorted(names, key=str) == sorted(range(len(names)), key=str):
        return [str(names[k]) for k in range(len(names))]
    if isinstance(names, list) and all(isinstance(n, str | int | float) for n in names):
        return [str(n) for n in names]
    raise DatasetError(f"{path}: 'names' must be a list of class names, or a mapping from 0..N-1 to them")


def read_darknet(path: Path) -> dict[str, DetectionData]:
    """A darknet ``obj.data`` (``names = obj.names``, ``train = train.txt``, ``valid = valid.txt``, as
    ``key = value`` lines). Its paths are relative to where darknet runs (often ``data/...``), so each
    is found by :func:`locate` under the file's folder; each image's labels are beside it."""
    if not path.is_file():
        raise DatasetError(f"{path} does not exist")
    spec = {k.strip(): v.split("#")[0].strip() for k, _, v in (line.partition("=") for line in read_lines(path))}
    base = path.parent
    classes = read_lines(locate([base], spec.get("names") or "obj.names"))
    splits = {}
    for key, split in (("train", "train"), ("valid", "val"), ("test", "test")):
        if spec.get(key):
            images = [locate([base], line) for line in read_lines(locate([base], spec[key]))]
            splits[split] = DetectionData(classes, [yolo_record(i, i.with_suffix(".txt")) for i in images])
            splits[split].validate()
    if "train" not in splits:
        raise DatasetError(f"{path} names no 'train' list of images")
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
    elif fmt == "darknet":
        _write_darknet(splits, root)
    elif fmt == "roboflow":
        for split, data in splits.items():
            folder = root / {"val": "valid"}.get(split, split)
            write_coco(data, folder, annotations=ROBOFLOW, images=".")
    else:
        for split, data in splits.items():
            write_dataset(data, root / split, fmt)


def _write_darknet(splits: dict[str, DetectionData], root: Path) -> None:
    """``obj.data``, ``obj.names``, and per split ``obj_<split>_data/`` (images, labels beside) listed in
    ``<split>.txt``, as CVAT's "YOLO 1.1" export (``val`` is darknet's ``valid``)."""
    lists = {}
    for split, data in splits.items():
        key = {"val": "valid"}.get(split, split)
        folder = root / f"obj_{key}_data"
        place_images(data, folder, True)
        write_yolo_labels(data, folder)
        (root / f"{key}.txt").write_text("".join(f"{folder.name}/{r.path.name}\n" for r in data.records))
        lists[key] = f"{key}.txt"
    classes = next(iter(splits.values())).classes
    (root / "obj.names").write_text("\n".join(classes) + "\n")
    spec = {"classes": len(classes), "names": "obj.names", **lists}
    (root / "obj.data").write_text("".join(f"{k} = {v}\n" for k, v in spec.items()))
