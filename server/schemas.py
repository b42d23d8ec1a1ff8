"""Response bodies (pydantic); they make the OpenAPI document."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, Field
from typing_extensions import TypedDict  # pydantic needs typing_extensions' TypedDict before Python 3.12


class ErrorDetail(BaseModel):
    code: str
    message: str
    details: list[Any]
    request_id: str | None = Field(None, description="the X-Request-ID of the request, for logs and support")


class ErrorBody(BaseModel):
    error: ErrorDetail


Box = Annotated[list[float], Field(description="x1, y1, x2, y2 in original-image pixels", min_length=4, max_length=4)]


# A dict, not a model: an answer can hold tens of thousands of detections (32 tasks of up to 1,000
# each), which the engine builds as plain dicts (models.types.Detections.rows) and pydantic writes
# as JSON in Rust, without a Python object and a validation per detection.
class Detection(TypedDict):
    """One object a task found in the image."""

    box: Box
    label: str
    class_id: int
    score: float


class TaskResult(BaseModel):
    task: str
    version: int = Field(description="the task version that produced these detections")
    method: str
    kind: str = Field(description="side (shares the backbone pass) or inline (own pass)")
    detections: list[Detection]
    backbone_depth: int | None = Field(None, description="blocks run when the method can exit early")
    error: ErrorDetail | None = Field(
        None, description="set (code task_failed) when this task's model failed; the other tasks still answer"
    )


class ImageSize(BaseModel):
    width: int
    height: int


class DetectResponse(BaseModel):
    image: ImageSize
    results: list[TaskResult]
    backbone_passes: int = Field(description="images the shared backbone pass ran on, in this request's batch")
    timing_ms: dict[str, float]


class TaskInfo(BaseModel):
    id: str
    version: int
    versions: list[int]
    method: str
    kind: str
    labels: list[str]
    metrics: dict[str, Any]
    bytes: int = Field(description="bytes of the artifact on disk")
    residency: str | None = Field(description="device, host, or null when only in the store")
    pinned: bool
    compiled: bool = Field(False, description="served by a compiled ONNX Runtime graph of its tuner and head")
    backbone: dict[str, Any]
    sha256: str | None = Field(None, description="sha256 of the version's tuner.safetensors")
    created_at: str | None = None


class QuarantinedTask(BaseModel):
    id: str
    reason: str = Field(description="why it is not served; roll back to a kept version, or upload a new one")
    versions: list[int] = Field(description="complete versions kept on disk")


class TaskList(BaseModel):
    tasks: list[TaskInfo]
    quarantined: list[QuarantinedTask] = Field(default_factory=list)


class VersionInfo(BaseModel):
    version: int
    current: bool
    method: str | None
    metrics: dict[str, Any]
    created_at: str | None = Field(None, description="when the artifact was trained (its manifest's provenance)")
    published_at: str = Field(description="when this server stored the version")
    sha256: str | None = Field(None, description="sha256 of the version's tuner.safetensors")


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


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in {
        400: "a request that is not valid HTTP/1.1 (server-serve, before the app)",
        401: "missing key",
        403: "wrong key",
        404: "unknown task or version",
        409: "incompatible backbone, or the task is quarantined",
        413: "too many bytes or pixels",
        414: "a request target over 8 KiB (server-serve, before the app)",
        415: "not an image",
        422: "invalid request, unreadable image or invalid artifact (every problem listed)",
        431: "a request head over 64 KiB or 100 header fields (server-serve, before the app)",
        500: "every task named failed at inference (task_failed), or an internal error",
        503: "overloaded (Retry-After)",
        507: "the store's disk is full, or a task exceeds a cache budget",
    }.items()
}
