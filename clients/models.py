"""The server's response bodies, as the client reads them. Kept equal to the server's OpenAPI
document by ``tests/clients/test_models.py``; unknown fields from a newer server are ignored."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class ErrorDetail(BaseModel):
    code: str
    message: str
    details: list[Any]
    request_id: str | None = None


class Detection(BaseModel):
    """One box: ``box`` is ``[x1, y1, x2, y2]`` in the original image's pixels."""

    box: list[float]
    label: str
    class_id: int
    score: float


class TaskResult(BaseModel):
    """One task's answer: its detections, or ``error`` when its model failed (the others still answer)."""

    task: str
    version: int
    method: str
    kind: str
    detections: list[Detection]
    backbone_depth: int | None = None
    error: ErrorDetail | None = None


class ImageSize(BaseModel):
    width: int
    height: int


class DetectResponse(BaseModel):
    image: ImageSize
    results: list[TaskResult]
    backbone_passes: int
    timing_ms: dict[str, float]

    def task(self, task_id: str) -> TaskResult:
        """The result of ``task_id`` (``"digits"`` or ``"digits@3"`` as asked)."""
        name = task_id.split("@")[0]
        for result in self.results:
            if result.task == name:
                return result
        raise KeyError(task_id)


class TaskInfo(BaseModel):
    id: str
    version: int
    versions: list[int]
    method: str
    kind: str
    labels: list[str]
    metrics: dict[str, Any]
    bytes: int
    residency: str | None
    pinned: bool
    compiled: bool = False
    backbone: dict[str, Any]
    sha256: str | None = None
    created_at: str | None = None


class QuarantinedTask(BaseModel):
    id: str
    reason: str
    versions: list[int]


class TaskList(BaseModel):
    tasks: list[TaskInfo]
    quarantined: list[QuarantinedTask] = []


class VersionInfo(BaseModel):
    version: int
    current: bool
    method: str | None
    metrics: dict[str, Any]
    created_at: str | None = None
    published_at: str
    sha256: str | None = None


class TaskVersions(BaseModel):
    id: str
    versions: list[VersionInfo]


class BackboneInfo(BaseModel):
    name: str
    fingerprint: str
    weights_source: str
    taps: dict[str, dict[str, int]]
    preprocess: dict[str, Any]
    runtime: str
    provider: str
    device: str
    shared_image_passes: int


MODELS: tuple[type[BaseModel], ...] = (
    ErrorDetail,
    Detection,
    TaskResult,
    ImageSize,
    DetectResponse,
    TaskInfo,
    QuarantinedTask,
    TaskList,
    VersionInfo,
    TaskVersions,
    BackboneInfo,
)
