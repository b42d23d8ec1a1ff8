"""The engine: runs a batch of (image, tasks) requests with one shared backbone pass.

For a batch: each image is preprocessed once; the side tasks' taps are unioned and the backbone
runs once over the images that need them, stopping at the deepest tap (or the feature cache
answers); each side task's tuner and head run on its slice of those taps; inline tasks run
grouped by task, each on its own backbone pass. Boxes come back in original-image pixels.
Runs on the batcher's worker thread, never on the event loop.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import Tensor

from models.backbones.base import FrozenBackbone
from models.postprocess import PostprocessConfig
from models.runtime.torch import BackboneRuntime
from models.transform import ImageTransform
from models.types import Detections
from server.feature_cache import FeatureCache
from server.metrics import Metrics
from tuners.errors import ArtifactError
from tuners.task_model import TaskModel


@dataclass
class WorkItem:
    """One image and the task models asked about it (already leased from the tuner cache)."""

    image: Tensor  # uint8 [3, H, W]
    image_key: str  # content hash, for the feature cache ("" when the server has none)
    tasks: dict[str, TaskModel]  # task id -> model
    post: PostprocessConfig = field(default_factory=PostprocessConfig)


@dataclass
class BatchResult:
    detections: list[dict[str, Detections]]  # per item: task id -> detections (original pixels)
    backbone_passes: int  # images that went through the shared backbone pass in this batch


class Engine:
    def __init__(
        self,
        backbone: FrozenBackbone,
        runtime: BackboneRuntime,
        metrics: Metrics,
        feature_cache: FeatureCache | None = None,
    ) -> None:
        self.backbone, self.runtime, self.metrics, self.feature_cache = backbone, runtime, metrics, feature_cache
        self.transform = ImageTransform(backbone.preprocess)
        self.device = next(iter(backbone.parameters())).device
        self.backbone_image_passes = 0  # the counter behind invariant 4
        # Inline tuners swap per-task tensors into the shared backbone for their own pass
        # (functional_call), so every forward on it, the upload dry-run included, holds this lock.
        self.lock = threading.Lock()

    def run(self, items: list[WorkItem]) -> BatchResult:
        with self.lock, torch.inference_mode():
            return self._run(items)

    def dry_run(self, model: TaskModel) -> None:
        """Upload check: one forward pass of ``model`` (already on this device) on a blank canvas.

        Raises:
            ArtifactError: the forward pass fails, or its outputs hold NaN or Inf.
        """
        canvas = self.backbone.preprocess.canvas
        images = torch.zeros(1, 3, canvas, canvas, device=self.device)
        try:
            with self.lock, torch.inference_mode():
                outputs = model(self.backbone, images)
        except Exception as e:  # noqa: BLE001  (any failure of user weights is a bad artifact)
            raise ArtifactError([f"dry-run forward failed: {type(e).__name__}: {e}"]) from e
        bad = [k for k, v in outputs.tensors.items() if not torch.isfinite(v).all()]
        if bad:
            raise ArtifactError([f"dry-run forward gives NaN or Inf in {', '.join(bad)}"])

    def _run(self, items: list[WorkItem]) -> BatchResult:
        start = time.perf_counter()
        canvases, metas = self.transform([item.image for item in items])
        canvases = canvases.to(self.device)
        self.metrics.stage_seconds.labels(stage="preprocess").observe(time.perf_counter() - start)
        side_rows, passes = self._shared_taps(items, canvases)
        start = time.perf_counter()
        results: list[dict[str, Detections]] = [{} for _ in items]
        groups: dict[tuple[str, int, PostprocessConfig], list[int]] = defaultdict(list)
        for row, item in enumerate(items):
            for task_id, model in item.tasks.items():
                groups[(task_id, id(model), item.post)].append(row)
        for (task_id, _, post), rows in groups.items():
            model = items[rows[0]].tasks[task_id]
            shared = None
            if model.kind == "side":
                shared = {t: torch.cat([side_rows[r][t] for r in rows]) for t in model.required_taps()}
            else:
                self.metrics.inline_image_passes.inc(len(rows))
            dets = model.predict(self.backbone, canvases[rows], [metas[r] for r in rows], post, shared)
            for r, d in zip(rows, dets):
                results[r][task_id] = d.to("cpu")
        self.metrics.stage_seconds.labels(stage="tuner_head").observe(time.perf_counter() - start)
        return BatchResult(results, passes)

    def _shared_taps(self, items: list[WorkItem], canvases: Tensor) -> tuple[dict[int, dict[str, Tensor]], int]:
        """Per row that has side tasks: ``{tap: [1, C, h, w]}``, from the cache or one backbone pass."""
        needed = {
            row: sorted({t for m in item.tasks.values() if m.kind == "side" for t in m.required_taps()})
            for row, item in enumerate(items)
        }
        taps = sorted({t for names in needed.values() for t in names})
        if self.feature_cache is not None and taps:  # cache the common taps too, so other tasks hit later
            taps = sorted(set(taps) | set(self.backbone.stage_taps) | set(self.backbone.pyramid_taps))
        out: dict[int, dict[str, Tensor]] = {}
        missing = []
        for row, names in needed.items():
            if not names:
                continue
            cached = self.feature_cache.get(items[row].image_key, taps) if self.feature_cache else None
            if cached is not None:
                out[row] = {t: v.to(self.device) for t, v in cached.items()}
                self.metrics.feature_cache_events.labels(event="hit").inc()
            else:
                missing.append(row)
        if missing:
            start = time.perf_counter()
            computed = self.runtime(canvases[missing], taps)
            self.metrics.stage_seconds.labels(stage="backbone").observe(time.perf_counter() - start)
            self.backbone_image_passes += len(missing)
            self.metrics.backbone_image_passes.inc(len(missing))
            for i, row in enumerate(missing):
                out[row] = {t: computed[t][i : i + 1] for t in taps}
                if self.feature_cache is not None:
                    self.metrics.feature_cache_events.labels(event="miss").inc()
                    self.feature_cache.put(items[row].image_key, out[row])
                    self.metrics.feature_cache_bytes.set(self.feature_cache.bytes)
        return out, len(missing)
