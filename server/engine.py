"""The Engine service: one call per detect request, no HTTP.

``Engine.detect(image bytes, task ids, options)`` decodes the image with limits (off the event
loop), leases every task from the tuner cache (cold ones load together, off the request path),
queues the work in the batcher (which runs the :class:`~server.executor.Executor` on its own
thread), releases the leases and records metrics. FastAPI routes and the Ray Serve replicas wrap
the same object.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from torch import Tensor

from models.postprocess import PostprocessConfig
from models.runtime.torch import BackboneRuntime
from models.types import Detections
from server.batcher import Batcher
from server.exceptions import InvalidRequest, TooManyTasks
from server.executor import Executor, WorkItem
from server.imaging import content_hash, decode_image
from server.metrics import Metrics
from server.schemas import BackboneInfo, Detection, DetectResponse, ImageSize, TaskResult
from server.store import check_task_id
from server.tuner_cache import Lease, TunerCache
from tuners.task_model import TaskModel


@dataclass(frozen=True)
class Limits:
    """Input limits a detect request is held to."""

    max_image_bytes: int
    max_image_pixels: int
    max_tasks: int


def parse_task_ids(raw: str | list[str] | None, limit: int) -> list[str]:
    """``"a,b"`` or ``["a", "b"]`` -> unique, validated ids in order.

    Raises:
        InvalidRequest: no task named. TooManyTasks: more than ``limit``. InvalidTaskId: a bad id.
    """
    parts = raw.split(",") if isinstance(raw, str) else list(raw or [])
    ids = [t.strip() for t in parts if t.strip()]
    if not ids:
        raise InvalidRequest("name one or more tasks: form field or query parameter 'tasks'")
    if len(ids) > limit:
        raise TooManyTasks(f"{len(ids)} tasks in one request; the limit is {limit}")
    return list(dict.fromkeys(check_task_id(t) for t in ids))


class Engine:
    """Detect requests over one backbone: decode, lease, batch, release, metrics."""

    def __init__(
        self,
        executor: Executor,
        batcher: Batcher,
        tuner_cache: TunerCache,
        metrics: Metrics,
        limits: Limits,
        runtime_name: str,
    ) -> None:
        self.executor, self.batcher, self.cache, self.metrics = executor, batcher, tuner_cache, metrics
        self.limits, self.runtime_name = limits, runtime_name

    @property
    def runtime(self) -> BackboneRuntime:
        return self.executor.runtime

    async def detect(self, data: bytes, task_ids: str | list[str], post: PostprocessConfig) -> DetectResponse:
        """Detections of every named task on one image; side tasks share one backbone pass.

        Raises:
            InvalidRequest, TooManyTasks, InvalidTaskId, UnknownTask, TooLarge, NotAnImage,
            UnreadableImage, Overloaded, CacheBudget.
        """
        start = time.perf_counter()
        ids = parse_task_ids(task_ids, self.limits.max_tasks)
        keyed = self.executor.feature_cache is not None
        image, key = await asyncio.to_thread(self._decode, data, keyed)
        leases = await self.cache.acquire_many(ids)
        try:
            item = WorkItem(
                image,
                key,
                {t: lease.model for t, lease in zip(ids, leases)},
                post,
                {t: lease.compiled for t, lease in zip(ids, leases) if lease.compiled is not None},
            )
            detections, passes = await self.batcher.submit(item)
            # Built before release: a released model object may be refilled with another task's weights.
            results = [self._result(t, lease, detections[t]) for t, lease in zip(ids, leases)]
        finally:
            for lease in leases:
                self.cache.release(lease)
        elapsed = time.perf_counter() - start
        for task_id in ids:
            self.metrics.request_seconds.labels(task=task_id).observe(elapsed)
        self.metrics.images_served.inc()
        self.metrics.task_results.inc(len(ids))
        size = ImageSize(width=int(image.shape[2]), height=int(image.shape[1]))
        return DetectResponse(image=size, results=results, backbone_passes=passes, timing_ms={"total": elapsed * 1e3})

    def _decode(self, data: bytes, keyed: bool) -> tuple[Tensor, str]:
        """The uint8 ``[3, H, W]`` image, and its feature-cache key when ``keyed`` (hashing is CPU work
        too, so it runs here, off the event loop, and only when a feature cache needs it)."""
        image = decode_image(data, self.limits.max_image_bytes, self.limits.max_image_pixels)
        return image, content_hash(data) if keyed else ""

    @staticmethod
    def _result(task_id: str, lease: Lease, det: Detections) -> TaskResult:
        model: TaskModel = lease.model
        return TaskResult(
            task=task_id,
            version=lease.version,
            method=model.method,
            kind=model.kind,
            backbone_depth=det.depth,
            detections=[
                Detection(box=[round(v, 2) for v in box], label=model.labels[c], class_id=c, score=round(s, 4))
                for box, s, c in zip(det.boxes.tolist(), det.scores.tolist(), det.labels.tolist())
            ],
        )

    def backbone_info(self) -> BackboneInfo:
        backbone = self.executor.backbone
        return BackboneInfo(
            name=backbone.name,
            fingerprint=backbone.fingerprint,
            weights_source=backbone.weights_source,
            taps=backbone.feature_spec.to_dict(),
            preprocess=backbone.preprocess.to_dict(),
            runtime=self.runtime_name,
            provider=self.runtime.provider,
            device=str(self.executor.device),
            shared_image_passes=self.executor.backbone_image_passes,
        )
