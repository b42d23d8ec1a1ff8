"""Task management: list, detail, upload (validated, atomic), delete, pin and unpin.

Each route reads its input and calls one method of the ``Tasks`` service.
"""

from __future__ import annotations

import asyncio
import hashlib

from fastapi import APIRouter, Depends, Query, Request

from server.api.bodies import BINARY, body_limits, multipart_body, upload_parts
from server.deps import SettingsDep, TaskId, TasksDep, UploadTurnsDep, ensure_ready, require_admin
from server.schemas import ERRORS, TaskInfo, TaskList, TaskVersions

router = APIRouter(tags=["tasks"], dependencies=[Depends(ensure_ready)])
ADMIN = [Depends(require_admin)]
UPLOAD_BODY = multipart_body(
    ["weights", "config"],
    {"weights": {**BINARY, "description": "tuner.safetensors"}, "config": {**BINARY, "description": "tuner.json"}},
)


def audited(request: Request, info: TaskInfo) -> TaskInfo:
    """Notes the version a management call acted on, for its audit line (``server/middleware.py``)."""
    request.state.audit_version = info.version
    request.state.audit_sha256 = info.sha256
    return info


@router.get("/v1/tasks", response_model=TaskList)
async def list_tasks(tasks: TasksDep) -> TaskList:
    return await tasks.list()


@router.get("/v1/tasks/{task_id}", response_model=TaskInfo, responses=ERRORS)
async def get_task(tasks: TasksDep, task_id: TaskId) -> TaskInfo:
    return await tasks.get(task_id)


@router.put(
    "/v1/tasks/{task_id}", response_model=TaskInfo, responses=ERRORS, openapi_extra=UPLOAD_BODY, dependencies=ADMIN
)
async def upload_task(
    request: Request, tasks: TasksDep, settings: SettingsDep, turns: UploadTurnsDep, task_id: TaskId
) -> TaskInfo:
    """Publishes a new version after full validation; a failed upload changes nothing."""
    limits = body_limits(settings, settings.max_upload_bytes, budgeted=False)  # uploads take turns instead
    async with upload_parts(request, limits, turns) as (weights, config):
        request.state.audit_sha256 = await asyncio.to_thread(lambda: hashlib.sha256(weights).hexdigest())
        return audited(request, await tasks.publish(task_id, weights, config))


@router.get("/v1/tasks/{task_id}/versions", response_model=TaskVersions, responses=ERRORS)
async def list_versions(tasks: TasksDep, task_id: TaskId) -> TaskVersions:
    """The kept versions, oldest first, with metrics and dates; which one is current."""
    return await tasks.versions(task_id)


@router.post("/v1/tasks/{task_id}/rollback", response_model=TaskInfo, responses=ERRORS, dependencies=ADMIN)
async def rollback_task(
    request: Request, tasks: TasksDep, task_id: TaskId, version: int = Query(..., ge=1, description="a kept version")
) -> TaskInfo:
    """Makes an earlier kept version current, atomically (also lifts a quarantine)."""
    return audited(request, await tasks.rollback(task_id, version))


@router.delete("/v1/tasks/{task_id}", status_code=204, responses=ERRORS, dependencies=ADMIN)
async def delete_task(tasks: TasksDep, task_id: TaskId) -> None:
    """Removes the task; requests already holding it finish with the version they hold."""
    await tasks.delete(task_id)


@router.post("/v1/tasks/{task_id}/pin", response_model=TaskInfo, responses=ERRORS, dependencies=ADMIN)
async def pin_task(request: Request, tasks: TasksDep, task_id: TaskId) -> TaskInfo:
    """Loads the task and keeps it resident until unpinned."""
    return audited(request, await tasks.pin(task_id))


@router.post("/v1/tasks/{task_id}/unpin", response_model=TaskInfo, responses=ERRORS, dependencies=ADMIN)
async def unpin_task(request: Request, tasks: TasksDep, task_id: TaskId) -> TaskInfo:
    return audited(request, await tasks.unpin(task_id))
