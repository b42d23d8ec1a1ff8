"""``POST /v1/detect`` (one image, many tasks) and ``POST /v1/tasks/{task_id}/detect``."""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Depends, Query, Request
from starlette.datastructures import UploadFile
from torch import Tensor

from models.postprocess import PostprocessConfig
from server.deps import ensure_ready, require_inference
from server.engine import WorkItem
from server.errors import ServerError
from server.imaging import content_hash, decode_image
from server.schemas import ERRORS, Detection, DetectResponse, ImageSize, TaskResult
from server.store import check_task_id

router = APIRouter(tags=["detect"], dependencies=[Depends(ensure_ready), Depends(require_inference)])

BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image"],
                    "properties": {
                        "image": {"type": "string", "format": "binary"},
                        "tasks": {"type": "string", "description": "comma-separated task ids"},
                    },
                }
            },
            "image/*": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


async def read_limited(request: Request, limit: int) -> bytes:
    """The raw body, refused with 413 as soon as it passes ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ServerError(413, "too_large", f"the request has {declared} bytes; the limit is {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ServerError(413, "too_large", f"the request is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_image_and_tasks(request: Request, query_tasks: str | None) -> tuple[bytes, str | None]:
    settings = request.app.state.settings
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > settings.max_request_bytes:
            raise ServerError(
                413, "too_large", f"the request has {declared} bytes; limit {settings.max_request_bytes}"
            )
        form = await request.form(max_files=1, max_fields=4)
        image = form.get("image")
        if not isinstance(image, UploadFile):
            raise ServerError(422, "invalid_request", "multipart field 'image' (a file) is required")
        data = await image.read(settings.max_request_bytes + 1)
        tasks = form.get("tasks")
        return data, (tasks if isinstance(tasks, str) else None) or query_tasks
    return await read_limited(request, settings.max_request_bytes), query_tasks


def parse_tasks(raw: str | None, limit: int) -> list[str]:
    ids = [t.strip() for t in (raw or "").split(",") if t.strip()]
    if not ids:
        raise ServerError(422, "invalid_request", "name one or more tasks: form field or query parameter 'tasks'")
    if len(ids) > limit:
        raise ServerError(413, "too_many_tasks", f"{len(ids)} tasks in one request; the limit is {limit}")
    return list(dict.fromkeys(check_task_id(t) for t in ids))


def decode(data: bytes, max_bytes: int, max_pixels: int, keyed: bool) -> tuple[Tensor, str]:
    """The uint8 ``[3, H, W]`` image, and its feature-cache key when ``keyed`` (hashing is CPU work
    too, so it runs here, off the event loop, and only when a feature cache needs it)."""
    return decode_image(data, max_bytes, max_pixels), content_hash(data) if keyed else ""


async def run_detect(request: Request, task_ids: list[str], data: bytes, post: PostprocessConfig) -> DetectResponse:
    state, settings = request.app.state, request.app.state.settings
    start = time.perf_counter()
    keyed = state.engine.feature_cache is not None
    image, key = await asyncio.to_thread(decode, data, settings.max_request_bytes, settings.max_image_pixels, keyed)
    leases = []
    try:
        for task_id in task_ids:
            leases.append(await state.tuner_cache.acquire(task_id))
        models = {t: lease.model for t, lease in zip(task_ids, leases)}
        detections, passes = await state.batcher.submit(WorkItem(image, key, models, post))
    finally:
        for lease in leases:
            state.tuner_cache.release(lease)
    results = []
    for task_id, lease in zip(task_ids, leases):
        det, model = detections[task_id], lease.model
        results.append(
            TaskResult(
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
        )
    elapsed = time.perf_counter() - start
    for task_id in task_ids:
        state.metrics.request_seconds.labels(task=task_id).observe(elapsed)
    state.metrics.images_served.inc()
    state.metrics.task_results.inc(len(task_ids))
    size = ImageSize(width=int(image.shape[2]), height=int(image.shape[1]))
    return DetectResponse(image=size, results=results, backbone_passes=passes, timing_ms={"total": elapsed * 1e3})


def postprocess(score_threshold: float | None, max_detections: int | None) -> PostprocessConfig:
    default = PostprocessConfig()
    return PostprocessConfig(
        score_thresh=default.score_thresh if score_threshold is None else score_threshold,
        max_detections=max_detections or default.max_detections,
    )


@router.post("/v1/detect", response_model=DetectResponse, responses=ERRORS, openapi_extra=BODY)
async def detect(
    request: Request,
    tasks: str | None = Query(None, description="comma-separated task ids (or the multipart field 'tasks')"),
    score_threshold: float | None = Query(None, ge=0, le=1),
    max_detections: int | None = Query(None, ge=1, le=1000),
) -> DetectResponse:
    """Detections of every named task on one image; side tasks share one backbone pass."""
    data, raw_tasks = await read_image_and_tasks(request, tasks)
    task_ids = parse_tasks(raw_tasks, request.app.state.settings.max_tasks_per_request)
    return await run_detect(request, task_ids, data, postprocess(score_threshold, max_detections))


@router.post("/v1/tasks/{task_id}/detect", response_model=DetectResponse, responses=ERRORS, openapi_extra=BODY)
async def detect_one(
    request: Request,
    task_id: str,
    score_threshold: float | None = Query(None, ge=0, le=1),
    max_detections: int | None = Query(None, ge=1, le=1000),
) -> DetectResponse:
    """The single-task shortcut."""
    data, _ = await read_image_and_tasks(request, None)
    return await run_detect(request, [check_task_id(task_id)], data, postprocess(score_threshold, max_detections))
