"""The Engine service: one call per detect request, no HTTP.

``Engine.detect(image bytes, task ids, options)`` takes a place in the batcher's bounded queue (or is
turned away at once, before any work), decodes the image onto the canvas with limits (off the event
loop and the executor's threads), leases every task from the tuner cache (cold ones load together,
off the request path), queues the work in the batcher (which runs the
:class:`~server.executor.Executor`'s two stages on two threads of its own), releases the leases and
records metrics.
FastAPI routes and the Ray Serve replicas wrap the same object.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass

from torch import Tensor

from models.postprocess import PostprocessConfig
from models.runtime.torch import BackboneRuntime
from models.transform import ImageMeta
from models.types import Detections
from server.batcher import Batcher
from server.cache_entries import Lease
from server.exceptions import InvalidRequest, SidecarError, TaskFailed, TooManyTasks
from server.executor import Executor, TaskFailure, WorkItem
from server.imaging import content_hash, load_image
from server.metrics import Metrics
from server.schemas import BackboneInfo, DetectResponse, ErrorDetail, ImageSize, TaskResult
from server.store import check_task_id
from server.tuner_cache import TunerCache
from tuners.task_model import TaskModel


@dataclass(frozen=True)
class Limits:
    """Input limits a detect request is held to."""

    max_image_bytes: int
    max_image_pixels: int
    max_tasks: int


TASK_SPEC = re.compile(r"^(?P<task>[^@]+)(?:@(?P<version>[1-9][0-9]{0,8}))?$")


def parse_task_ids(raw: str | list[str] | None, limit: int) -> list[tuple[str, int | None]]:
    """``"a,b@3"`` or ``["a", "b@3"]`` -> unique (task id, version or ``None`` for current), in order.

    Raises:
        InvalidRequest: no task named, or a malformed ``@version``. TooManyTasks: more than ``limit``.
        InvalidTaskId: a bad id.
    """
    parts = raw.split(",") if isinstance(raw, str) else list(raw or [])
    specs = list(dict.fromkeys(t.strip() for t in parts if t.strip()))
    if not specs:
        raise InvalidRequest("name one or more tasks: form field or query parameter 'tasks'")
    if len(specs) > limit:
        raise TooManyTasks(f"{len(specs)} tasks in one request; the limit is {limit}")
    out = []
    for spec in specs:
        found = TASK_SPEC.fullmatch(spec)
        if found is None:
            raise InvalidRequest(f"{spec!r} is not a task id, or a task id and a version such as digits@3")
        version = found["version"]
        out.append((check_task_id(found["task"]), int(version) if version else None))
    return out


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
        quarantine_after: int = 3,
    ) -> None:
        self.executor, self.batcher, self.cache, self.metrics = executor, batcher, tuner_cache, metrics
        self.limits, self.runtime_name, self.quarantine_after = limits, runtime_name, quarantine_after
        self._failures: dict[str, int] = {}  # task id -> consecutive failures

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
        specs = parse_task_ids(task_ids, self.limits.max_tasks)
        keys = [f"{t}@{v}" if v else t for t, v in specs]
        keyed = self.executor.feature_cache is not None
        with self.batcher.admitted():  # a place in the queue from here: when it is full, no work is spent
            image, meta, key = await asyncio.to_thread(self._decode, data, keyed)
            leases = await self.cache.acquire_many(specs)
        pending: asyncio.Future | None = None  # queued with no await since the place was left: it passes on
        try:
            models = {k: lease.model for k, lease in zip(keys, leases)}
            compiled = {k: lease.compiled for k, lease in zip(keys, leases) if lease.compiled is not None}
            pending = self.batcher.enqueue(WorkItem(image, key, models, post, compiled, meta))
            detections, passes = await asyncio.shield(pending)
            # Built before release: a released model object may be refilled with another task's weights.
            results = [self._result(t, lease, detections[k]) for (t, _), k, lease in zip(specs, keys, leases)]
        finally:
            if pending is None or pending.done():
                self._release(leases)
            else:  # the caller went away (cancelled); its batch may still be running these models
                pending.add_done_callback(lambda _: self._release(leases))
        if all(r.error is not None for r in results):
            raise TaskFailed("every task named failed at inference", [f"{r.task}: {r.error.message}" for r in results])  # type: ignore[union-attr]
        elapsed = time.perf_counter() - start
        self.metrics.detect_seconds.observe(elapsed)
        for task_id, _ in specs:
            self.metrics.request_seconds.labels(task=task_id).observe(elapsed)
        self.metrics.images_served.inc()
        self.metrics.task_results.inc(len(specs))
        size = ImageSize(width=meta.original_size[1], height=meta.original_size[0])
        return DetectResponse(image=size, results=results, backbone_passes=passes, timing_ms={"total": elapsed * 1e3})

    def _decode(self, data: bytes, keyed: bool) -> tuple[Tensor, ImageMeta, str]:
        """The image's float ``[3, S, S]`` canvas, its meta, and its feature-cache key when ``keyed``.
        Decoding, resizing, normalising and hashing are CPU work, so they run here, on a thread of
        their own per request: off the event loop and off the executor's threads."""
        limits, transform = self.limits, self.executor.transform
        image, meta = load_image(data, transform, limits.max_image_bytes, limits.max_image_pixels)
        return transform.canvas(image), meta, content_hash(data) if keyed else ""

    def _release(self, leases: list[Lease]) -> None:
        for lease in leases:
            self.cache.release(lease)

    def _result(self, task_id: str, lease: Lease, det: Detections | TaskFailure) -> TaskResult:
        model: TaskModel = lease.model
        if isinstance(det, TaskFailure):
            self._failed(task_id, lease.version, det)
            error = ErrorDetail(code=TaskFailed.code, message=f"task {task_id} failed: {det.message}", details=[])
            return TaskResult(task=task_id, version=lease.version, method=model.method, kind=model.kind,
                              detections=[], error=error)  # fmt: skip
        self._failures.pop(task_id, None)
        # Constructed, not validated: the fields are the engine's own, and checking each of up to
        # 32,000 detections made an answer of 21,000 take 450 ms instead of 330 (bench.large_answers,
        # docs/BENCHMARKS.md).
        return TaskResult.model_construct(
            task=task_id,
            version=lease.version,
            method=model.method,
            kind=model.kind,
            backbone_depth=det.depth,
            detections=det.rows(model.labels),
            error=None,
        )

    def _failed(self, task_id: str, version: int, failure: TaskFailure) -> None:
        """Counts consecutive failures; quarantines the task's current version after ``quarantine_after``."""
        self.metrics.errors.labels(code=TaskFailed.code).inc()
        count = self._failures[task_id] = self._failures.get(task_id, 0) + 1
        store = self.cache.store
        if count >= self.quarantine_after and task_id not in store.quarantined:
            try:
                current = store.get(task_id).version
            except SidecarError:
                return
            if current == version:
                store.quarantine(task_id, f"version {version} failed {count} times in a row: {failure.message}")
                self.cache.forget(task_id)

    async def backbone_info(self) -> BackboneInfo:
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
