"""A real-photo evaluation set for faces: every natural photo shipped in the installed packages,
with face boxes **from a pretrained detector, not from people**.

The boxes in ``real_faces.json`` are MTCNN's (facenet-pytorch 2.6.0, its own offline weights),
kept at probability >= :data:`MIN_PROB`, written by ``bench/label_real_faces.py``. They are a
pretrained model's output, not human ground truth: say so wherever they are used. Photos where
MTCNN finds no face count too, for false positives. Some photos are also backgrounds of the
``synth`` faces task (:data:`SYNTH_BACKGROUNDS`); results on them are not independent of training.

``server-data real-faces --out DIR`` copies the photos into a COCO split that ``server-val`` reads.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from models.imaging import upright_size
from tuners.data.formats import write_coco
from tuners.data.records import DatasetError, DetectionData, ImageRecord
from tuners.data.synth import package_dir

LABELS = Path(__file__).with_name("real_faces.json")
MIN_PROB = 0.95
# (package, path inside it): natural photos only (no renderings, text, charts or 100 px crops).
PHOTOS = (
    ("skimage", "data/astronaut.png"),
    ("skimage", "data/camera.png"),
    ("skimage", "data/chelsea.png"),
    ("skimage", "data/coffee.png"),
    ("skimage", "data/rocket.jpg"),
    ("skimage", "data/motorcycle_left.png"),
    ("skimage", "data/motorcycle_right.png"),
    ("skimage", "data/coins.png"),
    ("skimage", "data/moon.png"),
    ("skimage", "data/hubble_deep_field.jpg"),
    ("skimage", "data/retina.jpg"),
    ("skimage", "data/ihc.png"),
    ("sklearn", "datasets/images/china.jpg"),
    ("sklearn", "datasets/images/flower.jpg"),
    ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
    ("ultralytics", "assets/bus.jpg"),
    ("ultralytics", "assets/zidane.jpg"),
    ("insightface", "data/images/t1.jpg"),
)
SYNTH_BACKGROUNDS = {"astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png", "china.jpg"}


def photo_path(package: str, relpath: str) -> Path:
    path = package_dir(package) / relpath
    if not path.is_file():
        raise DatasetError(f"{path} is missing: make install puts {package} in place (requirements-offline.txt)")
    return path


def materialize(out: Path) -> DetectionData:
    """Writes the set as a COCO split at ``out`` (``annotations.json`` + ``images/``) and returns it."""
    doc = json.loads(LABELS.read_text())
    boxes: dict[str, list[list[float]]] = {}
    for ann in doc["annotations"]:
        x, y, w, h = ann["bbox"]
        boxes.setdefault(ann["image"], []).append([x, y, x + w, y + h])
    records = []
    for package, relpath in PHOTOS:
        source = photo_path(package, relpath)
        width, height = upright_size(source)
        found = boxes.get(f"{package}:{relpath}", [])
        tensor = torch.tensor(found, dtype=torch.float64).reshape(-1, 4)
        records.append(ImageRecord(source, width, height, tensor, torch.zeros(len(found), dtype=torch.int64)))
    data = DetectionData(["face"], records, doc["info"]["description"])
    data.validate()
    write_coco(data, out, copy_images=True)
    shutil.copyfile(LABELS, out / "labels_source.json")
    return DetectionData(["face"], [ImageRecord(out / "images" / r.path.name, r.width, r.height, r.boxes, r.labels)
                                    for r in records], data.description)  # fmt: skip
