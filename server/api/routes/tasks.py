"""Task management: list, detail, upload (validated, atomic), delete, pin and unpin."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from fastapi import APIRouter, Depends, Request
from starlette.datastructures import UploadFile

from server.deps import ensure_ready, require_admin
from server.errors import ServerError, to_server_error
from server.schemas import ERRORS, TaskInfo, TaskList
from server.store import TaskVersion, check_task_id
from tuners.artifact import MANIFEST, load_artifact, read_manifest
from tuners.errors import ArtifactError

router = APIRouter(tags=["tasks"], dependencies=[Depends(ensure_ready)])
UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["weights", "config"],
                    "properties": {
                        "weights": {"type": "string", "format": "binary", "description": "tuner.safetensors"},
                        "config": {"type": "string", "format": "binary", "description": "tuner.json"},
                    },
                }
            }
        },
    }
}


def task_info(request: Request, found: TaskVersion) -> TaskInfo:
    manifest = read_manifest(found.path)
    state = request.app.state
    return TaskInfo(
        id=found.task_id,
        version=found.version,
        versions=state.store.versions(found.task_id),
        method=manifest["method"],
        kind=manifest.get("kind", "side"),
        labels=manifest["labels"],
        metrics={k: v for k, v in manifest.get("metrics", {}).items() if k != "per_class"},
        bytes=sum(p.stat().st_size for p in found.path.iterdir()),
        residency=state.tuner_cache.residency(found.task_id),
        pinned=found.task_id in state.tuner_cache.pinned,
        backbone=manifest["backbone"],
        created_at=manifest.get("provenance", {}).get("created_at"),
    )


@router.get("/v1/tasks", response_model=TaskList)
async def list_tasks(request: Request) -> TaskList:
    found = await asyncio.to_thread(request.app.state.store.list)
    return TaskList(tasks=[task_info(request, t) for t in found])


@router.get("/v1/tasks/{task_id}", response_model=TaskInfo, responses=ERRORS)
async def get_task(request: Request, task_id: str) -> TaskInfo:
    return task_info(request, await asyncio.to_thread(request.app.state.store.get, task_id))


def validate_artifact(request: Request, folder: Path) -> None:
    """Strict keys, shapes, NaN/Inf and fingerprint (``load_artifact``), then a dry-run forward."""
    state = request.app.state
    model, _ = load_artifact(folder, state.backbone)
    state.engine.dry_run(model.to(state.engine.device))


async def _read_upload(request: Request) -> tuple[bytes, bytes]:
    limit = request.app.state.settings.max_upload_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ServerError(413, "too_large", f"the upload has {declared} bytes; the limit is {limit}")
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise ServerError(415, "invalid_request", "upload multipart/form-data with files 'weights' and 'config'")
    form = await request.form(max_files=2, max_fields=2)
    parts = {name: form.get(name) for name in ("weights", "config")}
    missing = [n for n, p in parts.items() if not isinstance(p, UploadFile)]
    if missing:
        raise ServerError(
            422, "invalid_artifact", "the upload lacks files", details=[f"missing part {n}" for n in missing]
        )
    weights, config = [await p.read(limit + 1) for p in parts.values()]  # type: ignore[union-attr]
    if len(weights) + len(config) > limit:
        raise ServerError(413, "too_large", f"the upload is over the limit of {limit} bytes")
    try:
        json.loads(config)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ServerError(422, "invalid_artifact", f"{MANIFEST} is not valid JSON", details=[str(e)]) from e
    return weights, config


@router.put(
    "/v1/tasks/{task_id}",
    response_model=TaskInfo,
    responses=ERRORS,
    openapi_extra=UPLOAD_BODY,
    dependencies=[Depends(require_admin)],
)
async def upload_task(request: Request, task_id: str) -> TaskInfo:
    """Publishes a new version after full validation; a failed upload changes nothing."""
    check_task_id(task_id)
    weights, config = await _read_upload(request)
    store = request.app.state.store
    try:
        published = await asyncio.to_thread(
            store.publish, task_id, weights, config, lambda folder: validate_artifact(request, folder)
        )
    except (ArtifactError, ValueError) as e:
        raise (to_server_error(e) or ServerError(422, "invalid_artifact", str(e))) from e
    request.app.state.tuner_cache.forget(task_id, keep_version=published.version)
    return task_info(request, published)


@router.delete("/v1/tasks/{task_id}", status_code=204, responses=ERRORS, dependencies=[Depends(require_admin)])
async def delete_task(request: Request, task_id: str) -> None:
    """Removes the task; requests already holding it finish with the version they hold."""
    await asyncio.to_thread(request.app.state.store.delete, task_id)
    request.app.state.tuner_cache.pinned.discard(task_id)
    request.app.state.tuner_cache.forget(task_id)


@router.post(
    "/v1/tasks/{task_id}/pin", response_model=TaskInfo, responses=ERRORS, dependencies=[Depends(require_admin)]
)
async def pin_task(request: Request, task_id: str) -> TaskInfo:
    """Loads the task and keeps it resident until unpinned."""
    cache = request.app.state.tuner_cache
    cache.pinned.add(check_task_id(task_id))
    try:
        cache.release(await cache.acquire(task_id))
    except Exception:
        cache.pinned.discard(task_id)
        raise
    return task_info(request, request.app.state.store.get(task_id))


@router.post(
    "/v1/tasks/{task_id}/unpin", response_model=TaskInfo, responses=ERRORS, dependencies=[Depends(require_admin)]
)
async def unpin_task(request: Request, task_id: str) -> TaskInfo:
    found = request.app.state.store.get(check_task_id(task_id))
    request.app.state.tuner_cache.pinned.discard(task_id)
    return task_info(request, found)
