"""Every API call once: its HTTP request and how its answer is read. Both clients send these."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from clients.images import Image, image_bytes
from clients.models import BackboneInfo, DetectResponse, TaskInfo, TaskList, TaskVersions

WEIGHTS, MANIFEST = "tuner.safetensors", "tuner.json"


class SidecarError(RuntimeError):
    """A JSON error from the server: ``status``, stable ``code``, ``message`` and ``details``."""

    def __init__(self, status: int, code: str, message: str, details: list | None = None) -> None:
        self.status, self.code, self.message, self.details = status, code, message, details or []
        super().__init__(f"{status} {code}: {message}" + (f" {self.details}" if self.details else ""))


def raise_for_error(response: httpx.Response) -> None:
    if response.is_success:
        return
    try:
        error = response.json()["error"]
        raise SidecarError(response.status_code, error["code"], error["message"], error.get("details"))
    except (ValueError, KeyError, TypeError):
        raise SidecarError(response.status_code, "http_error", response.text[:500]) from None


@dataclass(frozen=True)
class Retry:
    """When a call is tried again: the request never reached the server (connection refused or
    timed out while connecting), or the server answered 503 (overloaded, still starting). It waits
    the 503's ``Retry-After``, else ``backoff_s`` doubling per attempt; at most ``attempts`` tries
    within ``total_s`` seconds. A 4xx, or a failure after the request was sent, is never retried."""

    attempts: int = 4
    total_s: float = 30.0
    backoff_s: float = 0.25

    def delay(self, attempt: int, elapsed: float, response: httpx.Response | None) -> float | None:
        """Seconds to wait before try ``attempt + 2``, or ``None`` to stop and report this outcome."""
        if attempt + 1 >= self.attempts or (response is not None and response.status_code != 503):
            return None
        given = response.headers.get("retry-after", "") if response is not None else ""
        wait = float(given) if given.isdigit() else self.backoff_s * 2**attempt
        return wait if elapsed + wait <= self.total_s else None


NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout)  # safe to retry for any method


def _nothing(body: Any) -> None:
    return None


@dataclass(frozen=True)
class Call:
    """One API call: HTTP method, path, httpx request arguments, and the reader of its JSON answer."""

    method: str
    path: str
    options: dict[str, Any] = field(default_factory=dict)
    parse: Callable[[Any], Any] = _nothing


def task_names(tasks: str | list[str]) -> str:
    """``"a,b"`` or ``["a", "b"]`` as the ``tasks`` field (a string is never split into letters)."""
    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else [str(t).strip() for t in tasks]
    if not names or not all(names):
        raise ValueError(f"tasks must name at least one task and no empty one, not {tasks!r}")
    return ",".join(names)


def _options(score_threshold: float | None, max_detections: int | None) -> dict[str, float | int]:
    given = (("score_threshold", score_threshold), ("max_detections", max_detections))
    return {k: v for k, v in given if v is not None}


def detect(image: Image, tasks: str | list[str], score_threshold: float | None, max_detections: int | None) -> Call:
    params = _options(score_threshold, max_detections)
    files = {"image": ("image", image_bytes(image), "application/octet-stream")}
    options = {"files": files, "data": {"tasks": task_names(tasks)}, "params": params}
    return Call("POST", "/v1/detect", options, DetectResponse.model_validate)


def detect_task(image: Image, task_id: str, score_threshold: float | None, max_detections: int | None) -> Call:
    """One task, the image as the raw body (``POST /v1/tasks/{id}/detect``)."""
    headers = {"content-type": "application/octet-stream"}
    options = {"content": image_bytes(image), "params": _options(score_threshold, max_detections), "headers": headers}
    return Call("POST", f"/v1/tasks/{task_id}/detect", options, DetectResponse.model_validate)


def upload(task_id: str, artifact: str | Path) -> Call:
    folder = Path(artifact)
    files = {
        "weights": (WEIGHTS, (folder / WEIGHTS).read_bytes(), "application/octet-stream"),
        "config": (MANIFEST, (folder / MANIFEST).read_bytes(), "application/json"),
    }
    return Call("PUT", f"/v1/tasks/{task_id}", {"files": files}, TaskInfo.model_validate)


def list_tasks() -> Call:
    return Call("GET", "/v1/tasks", parse=lambda body: TaskList.model_validate(body).tasks)


def get_task(task_id: str) -> Call:
    return Call("GET", f"/v1/tasks/{task_id}", parse=TaskInfo.model_validate)


def delete_task(task_id: str) -> Call:
    return Call("DELETE", f"/v1/tasks/{task_id}")


def pin(task_id: str, pinned: bool) -> Call:
    return Call("POST", f"/v1/tasks/{task_id}/{'pin' if pinned else 'unpin'}", parse=TaskInfo.model_validate)


def versions(task_id: str) -> Call:
    return Call("GET", f"/v1/tasks/{task_id}/versions", parse=lambda body: TaskVersions.model_validate(body).versions)


def rollback(task_id: str, version: int) -> Call:
    return Call("POST", f"/v1/tasks/{task_id}/rollback", {"params": {"version": version}}, TaskInfo.model_validate)


def backbone() -> Call:
    return Call("GET", "/v1/backbone", parse=BackboneInfo.model_validate)
