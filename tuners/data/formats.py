"""Readers and writers for COCO JSON, Pascal VOC XML and YOLO txt. All produce :class:`DetectionData`.

Layouts (one split per folder; whole datasets, Ultralytics and Roboflow, are in :mod:`.layouts`):
  coco: ``annotations.json`` (or the folder's one ``.json`` file, as Label Studio and CVAT name theirs)
        + ``images/``; boxes are ``[x, y, w, h]`` pixels; ``iscrowd`` kept; ``file_name`` is found under
        ``images/`` or beside the JSON, with or without the folders it names.
  voc:  ``Annotations/*.xml`` + ``JPEGImages/``, or the XML files beside their images (LabelImg,
        Roboflow) (+ ``classes.txt`` for the class order); coordinates are read and written as
        given, with no 1-based shift; ``difficult`` kept.
  yolo: ``images/`` + ``labels/*.txt`` (class cx cy w h, normalised to the upright image, or a
        segmentation polygon, boxed as Ultralytics boxes it) + ``classes.txt``.

Boxes are in the upright image's pixels (EXIF orientation applied), as annotation tools show it.
Text files may have Windows line ends and a UTF-8 byte-order mark.
"""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

import torch

from models.imaging import upright_size
from tuners.artifact import parse_json
from tuners.data.files import IMAGE_SUFFIXES, listed, locate, read_lines
from tuners.data.records import DatasetError, DetectionData, ImageRecord

FORMATS = ("coco", "voc", "yolo")
COCO_FILES = ("annotations.json", "_annotations.coco.json")  # ours and Roboflow's; else a folder's one .json
# YOLO values may pass 0 or 1 by rounding (1.0000001); pixel coordinates, a common mix-up, pass by far more.
YOLO_SLACK = 0.01


def _boxes(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64).reshape(-1, 4)


def _labels(rows: list[int]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.int64)


def read_coco(root: Path, annotations: str | None = None, images: str = "images") -> DetectionData:
    """A COCO split: ``root/annotations`` (default: :data:`COCO_FILES`, else the folder's one ``.json``
    file) naming images in ``root/images`` or ``root``.

    Raises:
        DatasetError: as :func:`read_coco_file`, or the folder has no annotation file.
    """
    path = root / annotations if annotations else coco_file(root)
    if path is None:
        raise DatasetError(f"{root}: no annotations.json, and not exactly one .json file to read instead")
    return read_coco_file(path, [root / images, root])


def coco_file(folder: Path) -> Path | None:
    """The COCO document of a split folder: :data:`COCO_FILES`, else its only ``.json`` file."""
    for name in COCO_FILES:
        if (folder / name).is_file():
            return folder / name
    found = listed(folder, {".json"})
    return found[0] if len(found) == 1 else None


def read_coco_file(path: Path, images: Sequence[Path]) -> DetectionData:
    """The COCO document at ``path``, its images found by :func:`locate` in ``images``.

    Raises:
        DatasetError: the file cannot be read, is not JSON, or is not a COCO document (with the key,
            type or value that is wrong).
    """
    try:
        doc = parse_json(path.read_bytes())
    except (OSError, ValueError) as e:
        raise DatasetError(f"cannot read {path}: {e}") from e
    try:
        return _coco_data(doc, images)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise DatasetError(
            f"{path} is not a COCO document with 'categories' (id, name), 'images' (id, file_name, width, "
            f"height) and 'annotations' (image_id, category_id, bbox) that name each other: {e!r}"
        ) from e


def _coco_data(doc: dict, images: Sequence[Path]) -> DetectionData:
    """The records of a parsed COCO document; raises KeyError, TypeError or ValueError where it is malformed."""
    categories = sorted(doc["categories"], key=lambda c: c["id"])
    index = {c["id"]: i for i, c in enumerate(categories)}
    per_image: dict[int, tuple[list, list, list]] = {img["id"]: ([], [], []) for img in doc["images"]}
    for ann in doc["annotations"]:
        for what, known in (("image", per_image), ("category", index)):
            if ann[f"{what}_id"] not in known:
                raise ValueError(
                    f"annotation {ann.get('id')!r} names {what} {ann[f'{what}_id']!r}, which is not listed"
                )
        boxes, labels, crowd = per_image[ann["image_id"]]
        boxes.append(_coco_box(ann))
        labels.append(index[ann["category_id"]])
        crowd.append(bool(ann.get("iscrowd", 0)))
    records = [
        ImageRecord(
            locate(images, str(img["file_name"])),
            img.get("width", 0),  # 0: read from the image
            img.get("height", 0),
            _boxes(per_image[img["id"]][0]),
            _labels(per_image[img["id"]][1]),
            torch.tensor(per_image[img["id"]][2], dtype=torch.bool),
        )
        for img in sorted(doc["images"], key=lambda i: i["id"])
    ]
    info = doc.get("info")
    description = str(info.get("description", "")) if isinstance(info, dict) else ""
    return DetectionData([str(c["name"]) for c in categories], records, description)


def _coco_box(ann: dict) -> list[float]:
    """An annotation's ``[x1, y1, x2, y2]``: its ``bbox`` (x, y, w, h), else the extremes of its polygon
    ``segmentation``, as pycocotools derives a missing ``bbox``."""
    if ann.get("bbox"):
        x, y, w, h = ann["bbox"]
        return [x, y, x + w, y + h]
    polygons = ann.get("segmentation")
    if not isinstance(polygons, list) or not all(isinstance(p, list) for p in polygons):
        raise ValueError(f"annotation {ann.get('id')!r} has no bbox, nor a polygon segmentation to box")
    return list(_extremes([float(v) for polygon in polygons for v in polygon]))


def _extremes(points: list[float]) -> tuple[float, float, float, float]:
    """``(x1, y1, x2, y2)`` around a polygon given as ``[x, y, x, y, ...]``."""
    xs, ys = points[0::2], points[1::2]
    return min(xs), min(ys), max(xs), max(ys)


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


def read_voc(root: Path, ids: Sequence[str] | None = None) -> DetectionData:
    """A VOC split: ``root/Annotations/*.xml`` naming images in ``root/JPEGImages``, or XML files beside
    their images in ``root``; only the files ``ids`` (stems, as ``ImageSets/Main`` lists them) when
    given. The classes are ``root/classes.txt``, else the objects' names, sorted.

    Raises:
        DatasetError: no XML file, one that is not XML or lacks a readable box or size, or an
            object whose class is not in ``classes.txt``.
    """
    annotations, images = voc_folders(root)
    files = listed(annotations, {".xml"}) if ids is None else [annotations / f"{i}.xml" for i in ids]
    if not files:
        raise DatasetError(f"no XML files in {annotations}")
    parsed = [_voc_file(f) for f in files]
    names = {n for *_, objs in parsed for n, _, _ in objs}
    classes = read_lines(root / "classes.txt") if (root / "classes.txt").is_file() else sorted(names)
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(names - set(index))
    if unknown:
        raise DatasetError(f"{root}: objects named {unknown} are not in classes.txt")
    records = [
        ImageRecord(
            _voc_image(images, name, f.stem),
            w,
            h,
            _boxes([b for _, b, _ in objs]),
            _labels([index[n] for n, _, _ in objs]),
            torch.tensor([d for _, _, d in objs], dtype=torch.bool),
        )
        for f, (name, w, h, objs) in zip(files, parsed)
    ]
    return DetectionData(classes, records)


def voc_folders(root: Path) -> tuple[Path, list[Path]]:
    """(annotations, image folders) of a VOC split: ``Annotations/`` with ``JPEGImages/`` (or ``images/``,
    as Label Studio writes), or ``root`` for both (XML files beside their images)."""
    if (root / "Annotations").is_dir():
        return root / "Annotations", [root / "JPEGImages", root / "images", root]
    return root, [root]


def _voc_image(folders: list[Path], filename: str, stem: str) -> Path:
    """A VOC file's image: its ``<filename>``; else that name, or the XML file's stem, with an image
    suffix (some tools write the name without one, or the images were converted after labelling)."""
    named = locate(folders, filename or stem)
    if named.is_file():
        return named
    for base in dict.fromkeys((named.name, named.stem, stem)):
        for suffix in sorted(IMAGE_SUFFIXES):
            for folder, case in ((f, c) for f in folders for c in (suffix, suffix.upper())):
                if (folder / f"{base}{case}").is_file():
                    return folder / f"{base}{case}"
    return named


def _voc_file(f: Path) -> tuple[str, int, int, list[tuple[str, list[float], bool]]]:
    """One VOC XML file: (image file name, width, height, [(class, [x1, y1, x2, y2], difficult)])."""
    try:
        tree = ET.parse(f).getroot()
    except (ET.ParseError, OSError, ValueError) as e:  # ValueError: a NUL in a listed name
        raise DatasetError(f"{f}: {e}") from e
    try:
        objects = [
            (
                o.findtext("name", "").strip(),
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
    return tree.findtext("filename", "").strip(), width, height, objects


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
    images = listed(root / "images", IMAGE_SUFFIXES)
    return DetectionData(
        read_lines(classes_file), [yolo_record(image, root / "labels" / f"{image.stem}.txt") for image in images]
    )


def yolo_record(image: Path, label_file: Path) -> ImageRecord:
    """One image and its YOLO label file (absent: no objects); boxes in the upright image's pixels. An
    image that is missing or unreadable gets a record with no size, which validation reports."""
    try:
        w, h = upright_size(image)
    except (OSError, SyntaxError, ValueError):
        return ImageRecord(image, 0, 0)
    rows, labels = [], []
    for line in read_lines(label_file) if label_file.is_file() else []:
        try:
            label, (x1, y1, x2, y2) = _yolo_row(line.split())
        except ValueError as e:
            expected = (
                "'class cx cy w h' or a polygon 'class x1 y1 x2 y2 x3 y3 ...' (an integer, then numbers in "
                "[0, 1], fractions of the image's size)"
            )
            raise DatasetError(f"{label_file}: expected {expected}, got {line!r} ({e})") from e
        rows.append([x1 * w, y1 * h, x2 * w, y2 * h])
        labels.append(label)
    return ImageRecord(image, w, h, _boxes(rows), _labels(labels))


def _yolo_row(values: list[str]) -> tuple[int, tuple[float, float, float, float]]:
    """A label line's class and box corners ``(x1, y1, x2, y2)`` as fractions of the image. A line of
    more than five values is a segmentation polygon, boxed by its extremes, as Ultralytics reads it."""
    label, coords = float(values[0]), [float(v) for v in values[1:]]
    if not label.is_integer():
        raise ValueError("the class is not a whole number")
    if not all(-YOLO_SLACK <= v <= 1 + YOLO_SLACK for v in coords):  # NaN too
        raise ValueError("coordinates outside [0, 1]")
    if len(coords) == 4:
        cx, cy, bw, bh = coords
        return int(label), (cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2)
    if len(coords) >= 6 and len(coords) % 2 == 0:
        return int(label), _extremes(coords)
    raise ValueError(f"{len(values)} values")


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
