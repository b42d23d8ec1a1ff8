"""Python client for a Sidecar server (httpx and pydantic; sync and async). Never imports ``server``.

with SidecarClient("http://localhost:8000") as client:
    result = client.detect("photo.jpg", tasks="digits,faces")
    for task in result.results:
        print(task.task, task.version, task.detections)
"""

from clients.calls import Retry, SidecarError
from clients.client import AsyncSidecarClient, SidecarClient
from clients.models import BackboneInfo, Detection, DetectResponse, TaskInfo, TaskResult, VersionInfo

__version__ = "0.3.0"
__all__ = [
    "AsyncSidecarClient",
    "BackboneInfo",
    "DetectResponse",
    "Detection",
    "Retry",
    "SidecarClient",
    "SidecarError",
    "TaskInfo",
    "TaskResult",
    "VersionInfo",
]
