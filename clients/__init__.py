"""Python client for a Sidecar server (httpx, sync and async). Never imports ``server``.

with SidecarClient("http://localhost:8000") as client:
    result = client.detect("photo.jpg", tasks=["digits", "faces"])
    for task in result["results"]:
        print(task["task"], task["version"], task["detections"])
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

WEIGHTS, MANIFEST = "tuner.safetensors", "tuner.json"


class SidecarError(RuntimeError):
    """A JSON error from the server: ``status``, stable ``code``, ``message`` and ``details``."""

    def __init__(self, status: int, code: str, message: str, details: list | None = None) -> None:
        self.status, self.code, self.message, self.details = status, code, message, details or []
        super().__init__(f"{status} {code}: {message}" + (f" {self.details}" if self.details else ""))


def _raise_for_error(response: httpx.Response) -> None:
    if response.is_success:
        return
    try:
        error = response.json()["error"]
        raise SidecarError(response.status_code, error["code"], error["message"], error.get("details"))
    except (ValueError, KeyError, TypeError):
        raise SidecarError(response.status_code, "http_error", response.text[:500]) from None


def _image_bytes(image: str | Path | bytes) -> bytes:
    return image if isinstance(image, bytes) else Path(image).read_bytes()


def _detect_request(
    image: str | Path | bytes, tasks: list[str], score_threshold: float | None, max_detections: int | None
) -> dict[str, Any]:
    params = {
        k: v for k, v in (("score_threshold", score_threshold), ("max_detections", max_detections)) if v is not None
    }
    return {
        "files": {"image": ("image", _image_bytes(image), "application/octet-stream")},
        "data": {"tasks": ",".join(tasks)},
        "params": params,
    }


def _upload_files(artifact: Path) -> dict[str, tuple[str, bytes, str]]:
    return {
        "weights": (WEIGHTS, (artifact / WEIGHTS).read_bytes(), "application/octet-stream"),
        "config": (MANIFEST, (artifact / MANIFEST).read_bytes(), "application/json"),
    }


class SidecarClient:
    """Blocking client. ``api_key`` is sent as ``Authorization: Bearer``."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 60.0) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout)

    def __enter__(self) -> SidecarClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._http.request(method, path, **kwargs)
        _raise_for_error(response)
        return response.json() if response.content else None

    def detect(
        self,
        image: str | Path | bytes,
        tasks: list[str],
        score_threshold: float | None = None,
        max_detections: int | None = None,
    ) -> dict[str, Any]:
        """Detections of every task in ``tasks`` on one image (one backbone pass for the side tasks)."""
        return self._call("POST", "/v1/detect", **_detect_request(image, tasks, score_threshold, max_detections))

    def upload_task(self, task_id: str, artifact: str | Path) -> dict[str, Any]:
        """Publishes an artifact folder (``tuner.safetensors`` + ``tuner.json``) as a new version."""
        return self._call("PUT", f"/v1/tasks/{task_id}", files=_upload_files(Path(artifact)))

    def list_tasks(self) -> list[dict[str, Any]]:
        return self._call("GET", "/v1/tasks")["tasks"]

    def get_task(self, task_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/tasks/{task_id}")

    def delete_task(self, task_id: str) -> None:
        self._call("DELETE", f"/v1/tasks/{task_id}")

    def pin(self, task_id: str, pinned: bool = True) -> dict[str, Any]:
        return self._call("POST", f"/v1/tasks/{task_id}/{'pin' if pinned else 'unpin'}")

    def backbone(self) -> dict[str, Any]:
        return self._call("GET", "/v1/backbone")

    def ready(self) -> bool:
        return self._http.get("/readyz").status_code == 200


class AsyncSidecarClient:
    """The same calls for asyncio code."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 60.0) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout)

    async def __aenter__(self) -> AsyncSidecarClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._http.aclose()

    async def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = await self._http.request(method, path, **kwargs)
        _raise_for_error(response)
        return response.json() if response.content else None

    async def detect(
        self,
        image: str | Path | bytes,
        tasks: list[str],
        score_threshold: float | None = None,
        max_detections: int | None = None,
    ) -> dict[str, Any]:
        return await self._call("POST", "/v1/detect", **_detect_request(image, tasks, score_threshold, max_detections))

    async def upload_task(self, task_id: str, artifact: str | Path) -> dict[str, Any]:
        return await self._call("PUT", f"/v1/tasks/{task_id}", files=_upload_files(Path(artifact)))

    async def list_tasks(self) -> list[dict[str, Any]]:
        return (await self._call("GET", "/v1/tasks"))["tasks"]


__all__ = ["AsyncSidecarClient", "SidecarClient", "SidecarError"]
