"""The training loop: one readable pass over data, model, optimizer, evaluation and artifacts.

Run folder ``OUT/``: ``best/`` (the artifact with the best validation AP), ``state/`` (resume
without pickle, see :mod:`tuners.trainer.state`), ``report.json`` (see :meth:`Trainer.report`),
and what people look at, written as training goes (:mod:`tuners.trainer.plots`): ``results.csv``
and ``curves.png`` every epoch; ``pr_curve.png``, ``confusion_matrix.png`` and
``val_predictions.jpg`` for the best epoch so far.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from models import PostprocessConfig, build_backbone
from models.backbones.base import FrozenBackbone
from models.files import write_atomic
from models.runtime.torch import build_runtime, default_runtime, resolve_device
from models.transform import ImageTransform, PreprocessSpec
from models.types import Detections
from tuners.artifact import UPLOAD_LIMIT_BYTES, WEIGHTS, save_artifact
from tuners.data.layouts import read_splits
from tuners.data.records import DatasetError, DetectionData
from tuners.data.transforms import DetectionDataset, RememberedSamples, Sample, collate
from tuners.errors import TunerError
from tuners.task_model import build_task_model
from tuners.trainer.config import ConfigError, TrainConfig
from tuners.trainer.evaluate import coco_map
from tuners.trainer.features_cache import FeatureCache, TapFn
from tuners.trainer.loggers import build_logger
from tuners.trainer.plots import plot_curves, write_pictures, write_results
from tuners.trainer.report import TrainingMemory, count_parameters, task_cost
from tuners.trainer.state import load_state, save_state

log = logging.getLogger(__name__)


class TrainingError(TunerError):
    """Training cannot go on (a non-finite loss, for example)."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def check_task_size(config: TrainConfig, backbone: FrozenBackbone, classes: list[str]) -> None:
    """Refuses options whose task (the tensors its artifact holds) is larger than a server accepts by
    default. The task is built on the meta device, which allocates nothing, so a width or rank typed
    with a few zeros too many is an error here rather than memory exhausted in training."""
    with torch.device("meta"):
        probe = build_task_model(config.method, config.tuner, backbone, classes, config.head)
    size = sum(t.numel() * t.element_size() for t in probe.state_dict().values())
    if size > UPLOAD_LIMIT_BYTES:
        raise ConfigError(
            f"these {config.method} options make a task of {size / 2**20:,.0f} MiB, more than the "
            f"{UPLOAD_LIMIT_BYTES >> 20} MiB a server accepts; use smaller widths or ranks (see --list-methods)"
        )


def load_splits(config: TrainConfig) -> tuple[DetectionData, DetectionData]:
    """(train, val) of ``--data`` in any layout :func:`read_splits` reads (``--format auto`` detects
    it); ``--val-data`` replaces the validation split."""
    splits, fmt = read_splits(config.data, config.format)
    log.info("dataset %s: format %s%s, splits %s", config.data, fmt, " (detected)" if config.format == "auto" else "",
             {k: len(v.records) for k, v in splits.items()})  # fmt: skip
    if config.val_data is not None:
        val_splits, _ = read_splits(config.val_data, config.format)
        splits["val"] = val_splits.get("val") or val_splits["train"]
    if "val" not in splits:
        where = "val/, valid/, data.yaml 'val', annotations/instances_val*.json or ImageSets/Main/val.txt"
        raise DatasetError(f"{config.data} has no validation split ({where}); pass --val-data")
    train, val = splits["train"], splits["val"]
    if train.classes != val.classes:
        raise DatasetError(f"train classes {train.classes} differ from val classes {val.classes}")
    if not train.records or not val.records:
        raise DatasetError("train and val splits need at least one image each")
    return train, val


def lr_at(config: TrainConfig, step: int, total: int) -> float:
    """Linear warm-up to ``lr`` over ``warmup_iters``, then cosine decay to ``lr / 100``."""
    if step < config.warmup_iters:
        return config.lr * (0.001 + 0.999 * step / config.warmup_iters)
    progress = (step - config.warmup_iters) / max(1, total - config.warmup_iters)
    return config.lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def write_json(path: Path, data: dict[str, Any]) -> None:
    """``data`` as indented JSON, written atomically (:func:`models.files.write_atomic`)."""
    write_atomic(path, json.dumps(data, indent=2).encode())


class Trainer:
    """Trains one task model on a frozen backbone. ``fit()`` returns the report it also writes."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        seed_everything(config.seed)
        self.train_data, self.val_data = load_splits(config)  # a bad data folder fails before any weights load
        self.device = resolve_device(config.device)
        self.backbone = build_backbone(
            config.backbone,
            weights=config.weights,
            allow_download=config.allow_download,
            preprocess=PreprocessSpec(size=config.image_size),
        ).to(self.device)
        transform = ImageTransform(self.backbone.preprocess)
        self.train_set = DetectionDataset(self.train_data, transform, config.augmentation)
        self.val_set = DetectionDataset(self.val_data, transform, "none")
        check_task_size(config, self.backbone, self.train_data.classes)
        self.model = build_task_model(
            config.method, config.tuner, self.backbone, self.train_data.classes, config.head
        ).to(self.device)
        self.optimizer = torch.optim.AdamW(
            self.model.trainable_parameters(), lr=config.lr, weight_decay=config.weight_decay
        )
        self.memory = TrainingMemory(self.model, self.backbone)
        self.cache: FeatureCache | None = None
        self.extractor: TapFn = self.backbone  # what fills the cache (see _feature_extractor)
        # labels kept as batches pass, for the epochs that need no pixels (see _samples); empty when none can
        self.remembered: dict[str, RememberedSamples] = {}
        if config.cache_features != "none":
            self.cache = FeatureCache(config.cache_features, config.cache_bytes, config.out / "feature-cache")
            self.extractor = self._feature_extractor()
            if not self.model.tuner.needs_images:
                self.remembered = {"train": RememberedSamples(len(self.train_set)),
                                   "val": RememberedSamples(len(self.val_set))}  # fmt: skip
        self.epoch, self.step, self.best_ap, self.history = 0, 0, -1.0, []
        self.logger = build_logger(config.logger, config.out)
        self.total_steps = config.epochs * math.ceil(len(self.train_set) / config.batch_size)

    def _samples(self, split: str) -> Dataset[Sample]:
        """The split's dataset, or its :class:`RememberedSamples` once the feature cache holds the
        taps of every image in it and the tuner reads no pixels: later epochs then decode nothing.
        Both give the same batches in the same order, so losses and predictions do not change."""
        dataset = self.train_set if split == "train" else self.val_set
        remembered, first = self.remembered.get(split), 0 if split == "train" else len(self.train_set)
        if self.cache is None or remembered is None or not remembered.complete:
            return dataset
        return remembered if self.cache.holds(range(first, first + len(dataset))) else dataset

    def _remember(self, split: str, images: torch.Tensor, targets: list, metas: list, indices: list[int]) -> None:
        """Keeps a batch's labels for :meth:`_samples` until every image of ``split`` has passed once."""
        remembered = self.remembered.get(split)
        if remembered is not None and not remembered.complete:
            remembered.remember(images, targets, metas, indices)

    def _loader(self, split: str, shuffle: bool, epoch: int = 0) -> DataLoader:
        generator = torch.Generator().manual_seed(self.config.seed * 1000 + epoch)
        return DataLoader(
            self._samples(split),
            batch_size=self.config.batch_size,
            shuffle=shuffle,
            collate_fn=collate,
            num_workers=self.config.workers,
            generator=generator,
        )

    def train_epoch(self) -> dict[str, float]:
        """One pass over the training set; returns the mean of each loss term and the timing."""
        self.model.train()
        sums: dict[str, float] = {}
        start, images_seen = time.perf_counter(), 0
        loader = self._loader("train", shuffle=True, epoch=self.epoch)
        bar = tqdm(loader, desc=f"epoch {self.epoch + 1}/{self.config.epochs}", disable=not self.config.progress)
        for images, targets, metas, indices in bar:
            self._remember("train", images, targets, metas, indices)
            lr = lr_at(self.config, self.step, self.total_steps)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            losses = self._step(images.to(self.device), [t.to(self.device) for t in targets], indices)
            for name, value in losses.items():
                sums[name] = sums.get(name, 0.0) + value * len(indices)
            images_seen += len(indices)
            self.step += 1
            bar.set_postfix(loss=f"{losses['loss']:.3f}", lr=f"{lr:.2e}")
        seconds = time.perf_counter() - start
        return {**{k: v / images_seen for k, v in sums.items()}, "seconds": seconds, "images": images_seen}

    def _feature_extractor(self) -> TapFn:
        """What computes the taps the feature cache keeps: the backbone in ONNX Runtime on the CPU
        (``--feature-runtime auto``: what the server runs there, about 5x faster than eager torch;
        taps within 1e-4 of torch's), else the torch backbone itself."""
        runtime = self.config.feature_runtime
        if runtime == "auto":
            runtime = default_runtime(self.device)
        if runtime == "torch":
            return self.backbone
        return build_runtime(self.backbone, "onnx", str(self.device), taps=self.model.required_taps())

    def _cached_taps(self, images: torch.Tensor, keys: list[int]) -> dict[str, torch.Tensor] | None:
        """Taps from the feature cache with ``--cache-features`` (side tuners), else ``None``: the
        model then runs the backbone itself. Keys: training indices, then validation ones after them."""
        if self.cache is None:
            return None
        return self.cache.taps(self.extractor, images, keys, self.model.required_taps())

    def _step(self, images: torch.Tensor, targets: list, indices: list[int]) -> dict[str, float]:
        shared = self._cached_taps(images, indices)
        progress = self.step / max(1, self.total_steps)
        with self.memory.step():
            terms = self.model.training_loss(self.backbone, images, targets, progress, shared)
            loss = sum(terms.values())
            if not torch.isfinite(loss):
                raise TrainingError(f"loss is {float(loss)} at epoch {self.epoch + 1}, step {self.step}; lower --lr")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        if self.config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.trainable_parameters(), self.config.grad_clip)
        self.optimizer.step()
        return {"loss": float(loss.detach()), **{k: float(v.detach()) for k, v in terms.items()}}

    def evaluate(self) -> tuple[dict[str, Any], list[Detections]]:
        """COCO mAP on the validation split, and the predictions (original pixels, xyxy) it scored."""
        self.model.eval()
        post = PostprocessConfig(score_thresh=self.config.eval_score_thresh)
        predictions = []
        for images, targets, metas, indices in self._loader("val", shuffle=False):
            self._remember("val", images, targets, metas, indices)
            images = images.to(self.device)
            shared = self._cached_taps(images, [len(self.train_set) + i for i in indices])
            predictions += [d.to("cpu") for d in self.model.predict(self.backbone, images, metas, post, shared)]
        return coco_map(self.val_data, predictions), predictions

    def provenance(self) -> dict[str, Any]:
        try:
            package = version("sidecar")
        except PackageNotFoundError:
            package = "unknown"
        return {
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "package_version": package,
            "train_config": self.config.model_dump(mode="json", exclude={"api_key"}),
            "dataset": {
                "train": self.train_data.stats(),
                "val": self.val_data.stats(),
                "description": self.train_data.description,
            },
            "epoch": self.epoch + 1,
        }

    def _resume(self) -> None:
        info = load_state(self.config.out / "state", self.model, self.optimizer)
        self.epoch, self.step = info["epoch"] + 1, info["step"]
        self.best_ap, self.history = info["best_ap"], info["history"]
        log.info("resumed from %s at epoch %d", self.config.out / "state", self.epoch + 1)

    def fit(self) -> dict[str, Any]:
        """Trains for ``epochs``, keeps the best artifact in ``OUT/best``, writes ``OUT/report.json``."""
        self.config.out.mkdir(parents=True, exist_ok=True)
        if self.config.resume:
            self._resume()
        while self.epoch < self.config.epochs:
            stats = self.train_epoch()
            metrics, predictions = self.evaluate()
            pr = metrics.pop("pr")
            stats.update({k: metrics[k] for k in ("AP", "AP50", "AP75")}, epoch=self.epoch + 1)
            stats.update(lr=lr_at(self.config, self.step, self.total_steps))
            stats.update(peak_memory_bytes=self.memory.report(self.optimizer)["peak_memory_bytes"])
            self.history.append(stats)
            write_results(self.config.out / "results.csv", self.history)
            plot_curves(self.config.out / "curves.png", self.history)
            self.logger.log(self.epoch + 1, stats)
            log.info(
                "epoch %d: loss %.4f AP %.4f AP50 %.4f (%.1f s)",
                self.epoch + 1,
                stats["loss"],
                metrics["AP"],
                metrics["AP50"],
                stats["seconds"],
            )
            if metrics["AP"] > self.best_ap or not (self.config.out / "best").exists():
                self.best_ap = metrics["AP"]
                save_artifact(self.model, self.backbone, self.config.out / "best", metrics, self.provenance())
                write_pictures(self.config.out, self.val_data, predictions, pr)
            info = {"epoch": self.epoch, "step": self.step, "best_ap": self.best_ap, "history": self.history}
            save_state(self.config.out / "state", self.model, self.optimizer, info)
            self.epoch += 1
        self.logger.close()
        report = self.report()
        write_json(self.config.out / "report.json", report)
        return report

    def report(self) -> dict[str, Any]:
        """Best epoch's metrics plus the costs users choose methods by."""
        best_dir = self.config.out / "best"
        manifest = json.loads((best_dir / "tuner.json").read_text())
        seconds = [h["seconds"] for h in self.history]
        images = sum(h["images"] for h in self.history)
        return {
            "method": self.config.method,
            "kind": self.model.kind,
            "backbone": self.backbone.name,
            "best_epoch": manifest["provenance"]["epoch"],
            **{k: manifest["metrics"][k] for k in ("AP", "AP50", "AP75", "per_class")},
            "trainable_params": count_parameters(self.model),
            "artifact_bytes": sum(f.stat().st_size for f in best_dir.iterdir()),
            "weights_bytes": (best_dir / WEIGHTS).stat().st_size,
            **self.memory.report(self.optimizer),
            "seconds_per_epoch": sum(seconds) / len(seconds),
            "epoch_seconds": seconds,
            "images_per_second": images / sum(seconds),
            **task_cost(self.model, self.backbone, self.device),
            "feature_cache": self.cache.stats() if self.cache is not None else None,
            "history": self.history,
            "artifact": str(best_dir),
        }
