"""Labels faces with MTCNN: the real-photo faces set (``tuners/data/real_faces.py``) into
``tuners/data/real_faces.json``, and scikit-image's 100 LFW face crops into
``tuners/data/lfw_face_boxes.json`` (the box each crop's face gets in ``synth``'s ``faces-photo``,
so that composited faces are boxed the way the real-photo set is). The boxes are a pretrained
detector's output, not human ground truth.

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
from tuners.data.synth import LFW_BOXES, lfw_subset

# An LFW crop is 25 px: MTCNN reads it upscaled to CROP px, in the middle of an edge-padded canvas.
CROP, PAD = 100, 100


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


def label_lfw_crops() -> dict:
    """MTCNN's most probable box on each LFW face crop, as fractions of the crop (x1, y1, x2, y2;
    they may leave ``[0, 1]``: the forehead can run above the crop)."""
    import numpy as np
    from facenet_pytorch import MTCNN

    torch.manual_seed(0)
    detector = MTCNN(keep_all=True, device="cpu")
    boxes = []
    for i, crop in enumerate(lfw_subset()[:100]):
        grey = Image.fromarray((crop * 255).astype(np.uint8)).resize((CROP, CROP), Image.BICUBIC).convert("RGB")
        canvas = np.pad(np.asarray(grey), ((PAD, PAD), (PAD, PAD), (0, 0)), mode="edge")
        found, probs = detector.detect(Image.fromarray(canvas))
        if found is None or float(probs.max()) < MIN_PROB:
            raise RuntimeError(f"MTCNN finds no face in LFW crop {i}")
        best = (found[int(np.argmax(probs))] - PAD) / CROP
        boxes.append([round(float(v), 3) for v in best])
    description = (
        f"MTCNN (facenet-pytorch {version('facenet-pytorch')}) on scikit-image's lfw_subset.npy face crops "
        f"0-99, each upscaled to {CROP} px on an edge-padded canvas; x1, y1, x2, y2 as fractions of the crop"
    )
    return {"info": {"description": description, "command": ".venv/bin/python -m bench.label_real_faces"},
            "boxes": boxes}  # fmt: skip


def main() -> None:
    LFW_BOXES.write_text(json.dumps(label_lfw_crops()) + "\n")
    doc = label()
    LABELS.write_text(json.dumps(doc, indent=1) + "\n")
    faces = len(doc["annotations"])
    empty = sum(1 for i in doc["images"] if not any(a["image"] == i["image"] for a in doc["annotations"]))
    print(f"{len(doc['images'])} photos, {faces} faces, {empty} photos without a face -> {LABELS}")


if __name__ == "__main__":
    main()
