"""Readers and writers for COCO JSON, Pascal VOC XML and YOLO txt. All produce :class:`DetectionData`.

Layouts (one split per folder; whole datasets, Ultralytics and Roboflow, are in :mod:`.layouts`):
  coco: ``annotations.json`` + ``images/``; boxes are ``[x, y, w, h]`` pixels; ``iscrowd`` kept.
  voc:  ``Annotations/*.xml`` + ``JPEGImages/`` (+ ``classes.txt`` for the class order);
        coordinates are read and written as given, with no 1-based shift; ``difficult`` kept.
  yolo: ``images/`` + ``labels/*.txt`` (class cx cy w h, normalised to the upright image) + ``classes.txt``.

Boxes are in the upright image's pixels (EXIF orientation applied), as annotation tools show it.
"""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

from models.imaging import upright_size
from tuners.artifact import parse_json
from tuners.data.records import DatasetError, DetectionData, ImageRecord

FORMATS = ("coco", "voc", "yolo")
# Every format models.imaging reads, as Ultralytics lists its IMG_FORMATS.
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".mpo", ".avif"}


def _boxes(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64).reshape(-1, 4)


def _labels(rows: list[int]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.int64)


def read_coco(root: Path, annotations: str = "annotations.json", images: str = "images") -> DetectionData:
    """A COCO split: ``root/annotations`` naming images in ``root/images``.

    Raises:
        DatasetError: the file cannot be read, is not JSON, or is not a COCO document (with the key,
            type or value that is wrong).
    """
    path = root / annotations
    try:
        doc = parse_json(path.read_bytes())
    except (OSError, ValueError) as e:
        raise DatasetError(f"cannot read {path}: {e}") from e
    try:
        return _coco_data(doc, root / images)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise DatasetError(
            f"{path} is not a COCO document with 'categories' (id, name), 'images' (id, file_name, width, "
            f"height) and 'annotations' (image_id, category_id, bbox) that name each other: {e!r}"
        ) from e


def _coco_data(doc: dict, images: Path) -> DetectionData:
    """The records of a parsed COCO document; raises KeyError, TypeError or ValueError where it is malformed."""
    categories = sorted(doc["categories"], key=lambda c: c["id"])
    index = {c["id"]: i for i, c in enumerate(categories)}
    per_image: dict[int, tuple[list, list, list]] = {img["id"]: ([], [], []) for img in doc["images"]}
    for ann in doc["annotations"]:
        x, y, w, h = ann["bbox"]
        boxes, labels, crowd = per_image[ann["image_id"]]
        boxes.append([x, y, x + w, y + h])
        labels.append(index[ann["category_id"]])
        crowd.append(bool(ann.get("iscrowd", 0)))
    records = [
        ImageRecord(
            images / img["file_name"],
            img["width"],
            img["height"],
            _boxes(per_image[img["id"]][0]),
            _labels(per_image[img["id"]][1]),
            torch.tensor(per_image[img["id"]][2], dtype=torch.bool),
        )
        for img in sorted(doc["images"], key=lambda i: i["id"])
    ]
    info = doc.get("info")
    description = str(info.get("description", "")) if isinstance(info, dict) else ""
    return DetectionData([str(c["name"]) for c in categories], records, description)


def to_coco(data: DetectionData) -> dict:
    """The COCO document for ``data``: image ids from 1, category id = label + 1, ``bbox`` = x, y, w, h."""
    images, annotations = [], []
    for image_id, r in enumerate(data.records, start=1):
        images.append({"id": image_id, "file_name": r.path.name, "width": r.width, "height": r.height})
        for box, label, crowd in zip(r.boxes.tolist(), r.labels.tolist(), r.crowd.tolist()):
            x1, y1, x2, y2 = box
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": label + 1,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": int(crowd),
                }
            )
    return {
        "info": {"description": data.description},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": c} for i, c in enumerate(data.classes)],
    }


def write_coco(
    data: DetectionData,
    root: Path,
    copy_images: bool = True,
    annotations: str = "annotations.json",
    images: str = "images",
) -> None:
    place_images(data, root / images, copy_images)
    (root / annotations).write_text(json.dumps(to_coco(data), indent=1, sort_keys=True))


def read_voc(root: Path) -> DetectionData:
    """A VOC split: ``root/Annotations/*.xml`` naming images in ``root/JPEGImages``.

    Raises:
        DatasetError: no XML file, one that is not XML or lacks a readable box or size, or an
            object whose class is not in ``classes.txt``.
    """
    files = sorted((root / "Annotations").glob("*.xml"))
    if not files:
        raise DatasetError(f"no XML files in {root / 'Annotations'}")
    parsed = [_voc_file(f) for f in files]
    classes_file = root / "classes.txt"
    classes = (
        classes_file.read_text().split("\n")
        if classes_file.is_file()
        else sorted({name for *_, objs in parsed for name, _, _ in objs})
    )
    classes = [c for c in classes if c]
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({n for *_, objs in parsed for n, _, _ in objs} - set(index))
    if unknown:
        raise DatasetError(f"{root}: objects named {unknown} are not in classes.txt")
    records = [
        ImageRecord(
            root / "JPEGImages" / name,
            w,
            h,
            _boxes([b for _, b, _ in objs]),
            _labels([index[n] for n, _, _ in objs]),
            torch.tensor([d for _, _, d in objs], dtype=torch.bool),
        )
        for name, w, h, objs in parsed
    ]
    return DetectionData(classes, records)


def _voc_file(f: Path) -> tuple[str, int, int, list[tuple[str, list[float], bool]]]:
    """One VOC XML file: (image file name, width, height, [(class, [x1, y1, x2, y2], difficult)])."""
    try:
        tree = ET.parse(f).getroot()
    except ET.ParseError as e:
        raise DatasetError(f"{f}: {e}") from e
    try:
        objects = [
            (
                o.findtext("name", ""),
                [float(o.find("bndbox").findtext(k, "nan")) for k in ("xmin", "ymin", "xmax", "ymax")],  # type: ignore[union-attr]
                o.findtext("difficult", "0").strip() == "1",
            )
            for o in tree.iter("object")
        ]
    except (AttributeError, ValueError) as e:
        raise DatasetError(f"{f}: an object has no readable bndbox ({e})") from e
    size = tree.find("size")
    try:
        width, height = (0, 0) if size is None else [_whole(size.findtext(k, "0")) for k in ("width", "height")]
    except ValueError as e:
        raise DatasetError(f"{f}: the size is not two integers ({e})") from e
    return tree.findtext("filename", f.stem), width, height, objects


def _whole(text: str) -> int:
    """A VOC size field: ``640``, or ``640.0`` as some tools write it."""
    value = float(text)
    if not value.is_integer():
        raise ValueError(f"{text!r} is not a whole number")
    return int(value)


def write_voc(data: DetectionData, root: Path, copy_images: bool = True) -> None:
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    place_images(data, root / "JPEGImages", copy_images)
    (root / "classes.txt").write_text("\n".join(data.classes) + "\n")
    for r in data.records:
        ann = ET.Element("annotation")
        ET.SubElement(ann, "filename").text = r.path.name
        size = ET.SubElement(ann, "size")
        for k, v in (("width", r.width), ("height", r.height), ("depth", 3)):
            ET.SubElement(size, k).text = str(v)
        for box, label, crowd in zip(r.boxes.tolist(), r.labels.tolist(), r.crowd.tolist()):
            obj = ET.SubElement(ann, "object")
            ET.SubElement(obj, "name").text = data.classes[label]
            ET.SubElement(obj, "difficult").text = str(int(crowd))
            bnd = ET.SubElement(obj, "bndbox")
            for k, v in zip(("xmin", "ymin", "xmax", "ymax"), box):
                ET.SubElement(bnd, k).text = repr(float(v))
        ET.ElementTree(ann).write(root / "Annotations" / f"{r.path.stem}.xml")


def read_yolo(root: Path) -> DetectionData:
    classes_file = root / "classes.txt"
    if not classes_file.is_file():
        raise DatasetError(f"{classes_file} is missing")
    classes = [c for c in classes_file.read_text().split("\n") if c]
    images = sorted(p for p in (root / "images").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    return DetectionData(classes, [yolo_record(image, root / "labels" / f"{image.stem}.txt") for image in images])


def yolo_record(image: Path, label_file: Path) -> ImageRecord:
    """One image and its YOLO label file (absent: no objects); boxes in the upright image's pixels."""
    w, h = upright_size(image)
    rows, labels = [], []
    lines = label_file.read_text().split("\n") if label_file.is_file() else []
    for line in filter(None, (ln.strip() for ln in lines)):
        parts = line.split()
        try:
            if len(parts) != 5:
                raise ValueError("not five values")
            label, (cx, cy, bw, bh) = int(parts[0]), (float(v) for v in parts[1:])
            if not all(0 <= v <= 1 for v in (cx, cy, bw, bh)):  # NaN too
                raise ValueError("coordinates outside [0, 1]")
        except ValueError as e:
            expected = "'class cx cy w h' (an integer, four numbers in [0, 1], fractions of the image's size)"
            raise DatasetError(f"{label_file}: expected {expected}, got {line!r}") from e
        rows.append([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h])
        labels.append(label)
    return ImageRecord(image, w, h, _boxes(rows), _labels(labels))


def write_yolo(data: DetectionData, root: Path, copy_images: bool = True) -> None:
    place_images(data, root / "images", copy_images)
    (root / "classes.txt").write_text("\n".join(data.classes) + "\n")
    write_yolo_labels(data, root / "labels")


def write_yolo_labels(data: DetectionData, folder: Path) -> None:
    """One ``<image stem>.txt`` per image: ``class cx cy w h``, normalised (crowd boxes left out)."""
    folder.mkdir(parents=True, exist_ok=True)
    for r in data.records:
        lines = []
        for (x1, y1, x2, y2), label, crowd in zip(r.boxes.tolist(), r.labels.tolist(), r.crowd.tolist()):
            cx, cy = (x1 + x2) / 2 / r.width, (y1 + y2) / 2 / r.height
            if not crowd:
                lines.append(f"{label} {cx!r} {cy!r} {(x2 - x1) / r.width!r} {(y2 - y1) / r.height!r}")
        (folder / f"{r.path.stem}.txt").write_text("\n".join(lines) + ("\n" if lines else ""))


def place_images(data: DetectionData, folder: Path, copy: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if copy:
        for r in data.records:
            if r.path.resolve() != (folder / r.path.name).resolve():
                shutil.copyfile(r.path, folder / r.path.name)


READERS = {"coco": read_coco, "voc": read_voc, "yolo": read_yolo}
WRITERS = {"coco": write_coco, "voc": write_voc, "yolo": write_yolo}


def read_dataset(root: Path, fmt: str) -> DetectionData:
    """Reads one split folder in format ``fmt`` and validates every record."""
    if fmt not in READERS:
        raise DatasetError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    if not root.is_dir():
        raise DatasetError(f"{root} is not a folder")
    data = READERS[fmt](root)
    data.validate()
    return data


def write_dataset(data: DetectionData, root: Path, fmt: str) -> None:
    if fmt not in WRITERS:
        raise DatasetError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    root.mkdir(parents=True, exist_ok=True)
    WRITERS[fmt](data, root)
