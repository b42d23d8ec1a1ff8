"""The pictures and tables a training run leaves in its folder, written as training goes.

- ``results.csv``: one row per epoch (losses, lr, AP, AP50, AP75, seconds, memory);
- ``curves.png``: losses, lr and mAP per epoch;
- ``pr_curve.png``: precision against recall at IoU 0.5 per class, from COCOeval's precision array;
- ``confusion_matrix.png``: detections against truth at IoU 0.5 and score >= 0.25, with background;
- ``val_predictions.jpg``: validation images with predicted (class colour) and true (white) boxes.

matplotlib runs on its Agg backend: no display is needed. Every file is written atomically.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torchvision.ops import box_iou  # noqa: E402
from torchvision.transforms.v2 import functional as F  # noqa: E402
from torchvision.utils import draw_bounding_boxes, make_grid  # noqa: E402

from models.files import write_atomic  # noqa: E402
from models.imaging import read_image  # noqa: E402
from models.types import Detections  # noqa: E402
from tuners.data.records import DetectionData  # noqa: E402

NOT_LOSSES = {"seconds", "images", "AP", "AP50", "AP75", "epoch", "lr", "peak_memory_bytes"}
CONFIDENCE = 0.25  # score from which a detection counts in the confusion matrix and the picture grid
PALETTE = plt.get_cmap("tab20")


def _save(figure: plt.Figure, path: Path) -> None:
    out = io.BytesIO()
    figure.savefig(out, format="png", dpi=100)
    plt.close(figure)
    write_atomic(path, out.getvalue())


def write_results(path: Path, history: list[dict[str, Any]]) -> None:
    """``results.csv``: one row per epoch, columns from the first epoch's keys."""
    columns = [k for k in history[0] if not isinstance(history[0][k], dict | list)]
    out = io.StringIO()
    writer = csv.DictWriter(out, columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(history)
    write_atomic(path, out.getvalue().encode())


def plot_curves(path: Path, history: list[dict[str, Any]]) -> None:
    """``curves.png``: the loss terms, the learning rate and AP/AP50/AP75 per epoch."""
    epochs = [h["epoch"] for h in history]
    losses = [k for k, v in history[0].items() if k not in NOT_LOSSES and isinstance(v, float)]  # total, then terms
    figure, axes = plt.subplots(1, 3, figsize=(15, 4))
    for key in losses:
        axes[0].plot(epochs, [h[key] for h in history], marker=".", label=key)
    axes[1].plot(epochs, [h["lr"] for h in history], marker=".", color="tab:purple")
    for key in ("AP", "AP50", "AP75"):
        axes[2].plot(epochs, [h[key] for h in history], marker=".", label=key)
    for ax, title in zip(axes, ("training loss", "learning rate (end of epoch)", "validation mAP")):
        ax.set(title=title, xlabel="epoch")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[2].legend(fontsize=8)
    axes[2].set_ylim(0, 1)
    figure.tight_layout()
    _save(figure, path)


def plot_pr(path: Path, pr: dict[str, Any]) -> None:
    """``pr_curve.png``: ``pr = {"recall": [R], "precision": {class: [R]}}`` at IoU 0.5."""
    figure, ax = plt.subplots(figsize=(7, 6))
    recall = np.asarray(pr["recall"])
    curves = {c: np.asarray(p) for c, p in pr["precision"].items()}
    for i, (name, precision) in enumerate(curves.items()):
        valid = precision > -1
        ap = precision[valid].mean() if valid.any() else 0.0
        ax.plot(recall[valid], precision[valid], color=PALETTE(i % 20), lw=1, label=f"{name} {ap:.3f}")
    if curves:
        stacked = np.stack([np.where(p > -1, p, np.nan) for p in curves.values()])
        mean = np.nanmean(stacked, axis=0) if not np.isnan(stacked).all() else np.zeros_like(recall)
        ax.plot(recall, mean, color="black", lw=3, label=f"all classes {np.nanmean(mean):.3f} AP50")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.01), title="precision-recall at IoU 0.5")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left", ncol=2 if len(curves) > 10 else 1)
    figure.tight_layout()
    _save(figure, path)


def confusion_matrix(
    data: DetectionData, predictions: list[Detections], iou: float = 0.5, confidence: float = CONFIDENCE
) -> np.ndarray:
    """``[C + 1, C + 1]`` counts, rows predicted class, columns true class; index ``C`` is background.

    Per image, detections with score >= ``confidence`` are matched to true boxes at IoU >= ``iou``,
    each used once, highest IoU first: first to boxes of their own class (the diagonal: what AP50
    counts), then what is left to boxes of another class (a confusion). Crowd boxes are left out.
    """
    n = len(data.classes)
    matrix = np.zeros((n + 1, n + 1), dtype=np.int64)
    for record, det in zip(data.records, predictions):
        keep = det.scores >= confidence
        boxes, labels = det.boxes[keep].double(), det.labels[keep]
        truth = ~record.crowd
        gt_boxes, gt_labels = record.boxes[truth], record.labels[truth]
        overlaps = box_iou(boxes, gt_boxes) if len(boxes) and len(gt_boxes) else torch.zeros(len(boxes), len(gt_boxes))
        same = labels[:, None] == gt_labels[None, :]
        used_det: set[int] = set()
        used_gt: set[int] = set()
        for allowed in (same, ~same):
            candidates = torch.where(allowed, overlaps, torch.zeros_like(overlaps))
            for flat in torch.argsort(candidates.flatten(), descending=True).tolist():
                d, g = divmod(flat, len(gt_boxes))
                if candidates[d, g] < iou:
                    break
                if d not in used_det and g not in used_gt:
                    used_det.add(d)
                    used_gt.add(g)
                    matrix[labels[d], gt_labels[g]] += 1
        for g in set(range(len(gt_boxes))) - used_gt:
            matrix[n, gt_labels[g]] += 1
        for d in set(range(len(boxes))) - used_det:
            matrix[labels[d], n] += 1
    return matrix


def plot_confusion(path: Path, matrix: np.ndarray, classes: list[str]) -> None:
    """``confusion_matrix.png``: counts, coloured by each true class's share (column-normalised)."""
    names = [*classes, "background"]
    share = matrix / np.maximum(matrix.sum(axis=0, keepdims=True), 1)
    size = max(6, 0.45 * len(names) + 3)
    figure, ax = plt.subplots(figsize=(size, size * 0.85))
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=90 if len(names) > 8 else 0)
    ax.set_yticks(range(len(names)), names)
    if len(names) <= 25:
        for (row, col), count in np.ndenumerate(matrix):
            if count:
                ax.text(col, row, str(count), ha="center", va="center", fontsize=7,
                        color="white" if share[row, col] > 0.5 else "black")  # fmt: skip
    ax.set(xlabel="true", ylabel="predicted", title=f"confusion at IoU 0.5, score >= {CONFIDENCE}")
    figure.colorbar(image, ax=ax, fraction=0.046)
    figure.tight_layout()
    _save(figure, path)


def draw_detections(image: torch.Tensor, det: Detections, classes: list[str], width: int = 2) -> torch.Tensor:
    """``image`` (uint8 ``[3, H, W]``) with the boxes of ``det`` (original pixels) in their class colour."""
    if not len(det.scores):
        return image
    labels = [f"{classes[k]} {s:.2f}" for k, s in zip(det.labels.tolist(), det.scores.tolist())]
    colors = [tuple(int(255 * c) for c in PALETTE(k % 20)[:3]) for k in det.labels.tolist()]
    return draw_bounding_boxes(image, det.boxes.float(), labels, colors, width=width)


def write_image(path: Path, image: torch.Tensor) -> None:
    """A uint8 ``[3, H, W]`` image as JPEG (or PNG, by suffix), atomically."""
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(out, format="PNG" if path.suffix == ".png" else "JPEG")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, out.getvalue())


def save_predictions(
    path: Path, data: DetectionData, predictions: list[Detections], count: int = 16, tile: int = 320
) -> None:
    """``val_predictions.jpg``: the first ``count`` validation images, true boxes in white, predicted
    boxes (score >= :data:`CONFIDENCE`) in their class colour with label and score; letterboxed tiles."""
    tiles = []
    for record, det in list(zip(data.records, predictions))[:count]:
        image = read_image(record.path)
        if len(record.boxes):
            image = draw_bounding_boxes(image, record.boxes.float(), colors="white", width=1)
        keep = det.scores >= CONFIDENCE
        if keep.any():
            labels = [
                f"{data.classes[k]} {s:.2f}" for k, s in zip(det.labels[keep].tolist(), det.scores[keep].tolist())
            ]
            colors = [tuple(int(255 * c) for c in PALETTE(k % 20)[:3]) for k in det.labels[keep].tolist()]
            image = draw_bounding_boxes(image, det.boxes[keep].float(), labels, colors, width=2)
        h, w = image.shape[-2:]
        side = max(h, w)
        square = F.pad(image, [0, 0, side - w, side - h], fill=114)
        tiles.append(F.resize(square, [tile, tile], antialias=True))
    write_image(path, make_grid(tiles, nrow=int(np.ceil(np.sqrt(len(tiles)))), padding=4, pad_value=255))


def recall_and_false_positives(matrix: np.ndarray) -> dict[str, float | int]:
    """From a :func:`confusion_matrix`: the share of true boxes found with their class, and the
    detections that match no true box of their class."""
    found = int(np.trace(matrix[:-1, :-1]))
    truth, detections = int(matrix[:, :-1].sum()), int(matrix[:-1, :].sum())
    return {"recall": found / truth if truth else 0.0, "false_positives": detections - found, "true_boxes": truth}


def detections_on_empty(data: DetectionData, predictions: list[Detections], confidence: float) -> int:
    """Detections scoring >= ``confidence`` on the images that hold no true box: false positives
    where nothing at all should be found."""
    return sum(
        int((det.scores >= confidence).sum()) for r, det in zip(data.records, predictions) if not (~r.crowd).any()
    )


def write_pictures(folder: Path, data: DetectionData, predictions: list[Detections], pr: dict[str, Any]) -> None:
    """The three pictures of one evaluation: PR curve, confusion matrix, predictions grid."""
    plot_pr(folder / "pr_curve.png", pr)
    plot_confusion(folder / "confusion_matrix.png", confusion_matrix(data, predictions), data.classes)
    save_predictions(folder / "val_predictions.jpg", data, predictions)
