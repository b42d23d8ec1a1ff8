"""``POST /v1/detect`` (one image, many tasks) and ``POST /v1/tasks/{task_id}/detect``.

The routes read the body within the request limit (``server/api/bodies.py``) and call
``Engine.detect``; nothing else.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request

from models.postprocess import PostprocessConfig
from server.api.bodies import BINARY, BodyLimits, body_limits, multipart_body, read_body, read_files, read_form
from server.deps import EngineDep, SettingsDep, TaskId, ensure_ready, require_inference
from server.exceptions import InvalidRequest
from server.schemas import ERRORS, DetectResponse

router = APIRouter(tags=["detect"], dependencies=[Depends(ensure_ready), Depends(require_inference)])

TASKS = {"type": "string", "minLength": 1, "description": "comma-separated task ids, each optionally @version"}
BODY = multipart_body(["image", "tasks"], {"image": BINARY, "tasks": TASKS}, raw_image=True)
ONE_BODY = multipart_body(["image"], {"image": BINARY}, raw_image=True)  # the single-task shortcut: task in the path


async def read_image_and_tasks(
    request: Request, limits: BodyLimits, query_tasks: str | None
) -> tuple[bytes, str | None]:
    """The image bytes and the raw ``tasks`` value, from a multipart form or a raw image body."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        return await read_body(request, limits), query_tasks
    form = await read_form(request, limits, max_files=1, max_fields=4)
    try:
        image = (await read_files(form, ("image",)))["image"]
        tasks = form.get("tasks")
    finally:
        await form.close()
    if image is None:
        raise InvalidRequest("multipart field 'image' (a file) is required")
    return image, (tasks if isinstance(tasks, str) else None) or query_tasks


def postprocess(score_threshold: float | None, max_detections: int | None) -> PostprocessConfig:
    default = PostprocessConfig()
    return PostprocessConfig(
        score_thresh=default.score_thresh if score_threshold is None else score_threshold,
        max_detections=max_detections or default.max_detections,
    )


@router.post("/v1/detect", response_model=DetectResponse, responses=ERRORS, openapi_extra=BODY)
async def detect(
    request: Request,
    engine: EngineDep,
    settings: SettingsDep,
    tasks: str | None = Query(None, description="comma-separated task ids (or the multipart field 'tasks')"),
    score_threshold: float | None = Query(None, ge=0, le=1),
    max_detections: int | None = Query(None, ge=1, le=1000),
) -> DetectResponse:
    """Detections of every named task on one image; side tasks share one backbone pass."""
    data, raw_tasks = await read_image_and_tasks(request, body_limits(settings, settings.max_request_bytes), tasks)
    return await engine.detect(data, raw_tasks or "", postprocess(score_threshold, max_detections))


@router.post("/v1/tasks/{task_id}/detect", response_model=DetectResponse, responses=ERRORS, openapi_extra=ONE_BODY)
async def detect_one(
    request: Request,
    engine: EngineDep,
    settings: SettingsDep,
    task_id: TaskId,
    score_threshold: float | None = Query(None, ge=0, le=1),
    max_detections: int | None = Query(None, ge=1, le=1000),
) -> DetectResponse:
    """The single-task shortcut."""
    data, _ = await read_image_and_tasks(request, body_limits(settings, settings.max_request_bytes), None)
    return await engine.detect(data, [task_id], postprocess(score_threshold, max_detections))
