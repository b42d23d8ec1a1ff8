"""Labels the real-photo faces set (``tuners/data/real_faces.py``) with MTCNN and writes
``tuners/data/real_faces.json``. The boxes are a pretrained detector's output, not human ground truth.

    .venv/bin/python -m bench.label_real_faces

MTCNN comes from facenet-pytorch (installed ``--no-deps`` by ``make install``; its pnet, rnet and
onet weights ship inside its wheel). Boxes with probability >= ``MIN_PROB`` are kept, clipped to
the image, rounded to 0.1 px.
"""

from __future__ import annotations

import json
from importlib.metadata import version

import torch
from PIL import Image

from tuners.data.real_faces import LABELS, MIN_PROB, PHOTOS, photo_path


def label() -> dict:
    from facenet_pytorch import MTCNN

    torch.manual_seed(0)
    detector = MTCNN(keep_all=True, device="cpu")
    images, annotations = [], []
    for package, relpath in PHOTOS:
        name = f"{package}:{relpath}"
        with Image.open(photo_path(package, relpath)) as photo:
            rgb = photo.convert("RGB")
        images.append({"image": name, "width": rgb.width, "height": rgb.height})
        boxes, probs = detector.detect(rgb)
        for box, prob in zip(boxes if boxes is not None else [], probs if probs is not None else []):
            if prob < MIN_PROB:
                continue
            x1, y1 = max(0.0, float(box[0])), max(0.0, float(box[1]))
            x2, y2 = min(float(rgb.width), float(box[2])), min(float(rgb.height), float(box[3]))
            annotations.append({"image": name, "bbox": [round(v, 1) for v in (x1, y1, x2 - x1, y2 - y1)],
                                "score": round(float(prob), 4)})  # fmt: skip
    description = (
        f"real photos shipped in installed packages; face boxes from MTCNN (facenet-pytorch "
        f"{version('facenet-pytorch')}), probability >= {MIN_PROB}: a pretrained model's output, "
        "not human ground truth"
    )
    return {"info": {"description": description, "command": ".venv/bin/python -m bench.label_real_faces"},
            "images": images, "annotations": annotations}  # fmt: skip


def main() -> None:
    doc = label()
    LABELS.write_text(json.dumps(doc, indent=1) + "\n")
    faces = len(doc["annotations"])
    empty = sum(1 for i in doc["images"] if not any(a["image"] == i["image"] for a in doc["annotations"]))
    print(f"{len(doc['images'])} photos, {faces} faces, {empty} photos without a face -> {LABELS}")


if __name__ == "__main__":
    main()
