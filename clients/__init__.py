"""Python client for a Sidecar server (httpx, sync and async). Never imports ``server``.

with SidecarClient("http://localhost:8000") as client:
    result = client.detect("photo.jpg", tasks=["digits", "faces"])
    for task in result["results"]:
        print(task["task"], task["version"], task["detections"])
"""

from __future__ import annotations

import asyncio
import itertools
import ssl
import time
from dataclasses import dataclass, field
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


def _tls(verify: bool | str) -> bool | ssl.SSLContext:
    """httpx's ``verify``: a path becomes an SSL context that trusts that certificate or bundle."""
    return verify if isinstance(verify, bool) else ssl.create_default_context(cafile=str(verify))


def _image_bytes(image: str | Path | bytes) -> bytes:
    return image if isinstance(image, bytes) else Path(image).read_bytes()


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


@dataclass(frozen=True)
class Call:
    """One API call: HTTP method, path and httpx request arguments. Both clients send the same calls."""

    method: str
    path: str
    options: dict[str, Any] = field(default_factory=dict)


def detect_call(
    image: str | Path | bytes, tasks: str | list[str], score_threshold: float | None, max_detections: int | None
) -> Call:
    params = {
        k: v for k, v in (("score_threshold", score_threshold), ("max_detections", max_detections)) if v is not None
    }
    files = {"image": ("image", _image_bytes(image), "application/octet-stream")}
    names = tasks if isinstance(tasks, str) else ",".join(tasks)  # "a,b" or ["a", "b"]
    return Call("POST", "/v1/detect", {"files": files, "data": {"tasks": names}, "params": params})


def upload_call(task_id: str, artifact: str | Path) -> Call:
    folder = Path(artifact)
    files = {
        "weights": (WEIGHTS, (folder / WEIGHTS).read_bytes(), "application/octet-stream"),
        "config": (MANIFEST, (folder / MANIFEST).read_bytes(), "application/json"),
    }
    return Call("PUT", f"/v1/tasks/{task_id}", {"files": files})


def pin_call(task_id: str, pinned: bool) -> Call:
    return Call("POST", f"/v1/tasks/{task_id}/{'pin' if pinned else 'unpin'}")


def rollback_call(task_id: str, version: int) -> Call:
    return Call("POST", f"/v1/tasks/{task_id}/rollback", {"params": {"version": version}})


class SidecarClient:
    """Blocking client. ``api_key`` is sent as ``Authorization: Bearer``."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        timeout: float = 60.0,
        verify: bool | str = True,
        retry: Retry = Retry(),
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        """``verify``: check the server's TLS certificate (``True``), against a CA bundle or certificate path.
        ``retry``: see :class:`Retry`. ``transport``: an httpx transport (tests, proxies)."""
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.retry = retry
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"), headers=headers, timeout=timeout, verify=_tls(verify), transport=transport
        )

    def __enter__(self) -> SidecarClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, call: Call) -> Any:
        start = time.monotonic()
        for attempt in itertools.count():
            try:
                response = self._http.request(call.method, call.path, **call.options)
            except NOT_SENT:
                wait = self.retry.delay(attempt, time.monotonic() - start, None)
                if wait is None:
                    raise
            else:
                wait = self.retry.delay(attempt, time.monotonic() - start, response)
                if wait is None:
                    break
            time.sleep(wait)
        _raise_for_error(response)
        return response.json() if response.content else None

    def detect(
        self,
        image: str | Path | bytes,
        tasks: str | list[str],
        score_threshold: float | None = None,
        max_detections: int | None = None,
    ) -> dict[str, Any]:
        """Detections of every task in ``tasks`` on one image (one backbone pass for the side tasks).

        A task may name a version, ``"digits@3"``; otherwise its current version answers.
        """
        return self._send(detect_call(image, tasks, score_threshold, max_detections))

    def upload_task(self, task_id: str, artifact: str | Path) -> dict[str, Any]:
        """Publishes an artifact folder (``tuner.safetensors`` + ``tuner.json``) as a new version."""
        return self._send(upload_call(task_id, artifact))

    def list_tasks(self) -> list[dict[str, Any]]:
        return self._send(Call("GET", "/v1/tasks"))["tasks"]

    def get_task(self, task_id: str) -> dict[str, Any]:
        return self._send(Call("GET", f"/v1/tasks/{task_id}"))

    def delete_task(self, task_id: str) -> None:
        self._send(Call("DELETE", f"/v1/tasks/{task_id}"))

    def pin(self, task_id: str, pinned: bool = True) -> dict[str, Any]:
        return self._send(pin_call(task_id, pinned))

    def versions(self, task_id: str) -> list[dict[str, Any]]:
        """The kept versions of a task, oldest first (version, current, metrics, dates, sha256)."""
        return self._send(Call("GET", f"/v1/tasks/{task_id}/versions"))["versions"]

    def rollback(self, task_id: str, version: int) -> dict[str, Any]:
        """Makes kept version ``version`` current again."""
        return self._send(rollback_call(task_id, version))

    def backbone(self) -> dict[str, Any]:
        return self._send(Call("GET", "/v1/backbone"))

    def ready(self) -> bool:
        """Whether the server answers and is ready; ``False`` also when it cannot be reached."""
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False


class AsyncSidecarClient:
    """The same calls for asyncio code: ``async with AsyncSidecarClient(url) as client: await client.detect(...)``."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        timeout: float = 60.0,
        verify: bool | str = True,
        retry: Retry = Retry(),
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.retry = retry
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"), headers=headers, timeout=timeout, verify=_tls(verify), transport=transport
        )

    async def __aenter__(self) -> AsyncSidecarClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    async def _send(self, call: Call) -> Any:
        start = time.monotonic()
        for attempt in itertools.count():
            try:
                response = await self._http.request(call.method, call.path, **call.options)
            except NOT_SENT:
                wait = self.retry.delay(attempt, time.monotonic() - start, None)
                if wait is None:
                    raise
            else:
                wait = self.retry.delay(attempt, time.monotonic() - start, response)
                if wait is None:
                    break
            await asyncio.sleep(wait)
        _raise_for_error(response)
        return response.json() if response.content else None

    async def detect(
        self,
        image: str | Path | bytes,
        tasks: str | list[str],
        score_threshold: float | None = None,
        max_detections: int | None = None,
    ) -> dict[str, Any]:
        return await self._send(detect_call(image, tasks, score_threshold, max_detections))

    async def upload_task(self, task_id: str, artifact: str | Path) -> dict[str, Any]:
        return await self._send(upload_call(task_id, artifact))

    async def list_tasks(self) -> list[dict[str, Any]]:
        return (await self._send(Call("GET", "/v1/tasks")))["tasks"]

    async def get_task(self, task_id: str) -> dict[str, Any]:
        return await self._send(Call("GET", f"/v1/tasks/{task_id}"))

    async def delete_task(self, task_id: str) -> None:
        await self._send(Call("DELETE", f"/v1/tasks/{task_id}"))

    async def pin(self, task_id: str, pinned: bool = True) -> dict[str, Any]:
        return await self._send(pin_call(task_id, pinned))

    async def versions(self, task_id: str) -> list[dict[str, Any]]:
        return (await self._send(Call("GET", f"/v1/tasks/{task_id}/versions")))["versions"]

    async def rollback(self, task_id: str, version: int) -> dict[str, Any]:
        return await self._send(rollback_call(task_id, version))

    async def backbone(self) -> dict[str, Any]:
        return await self._send(Call("GET", "/v1/backbone"))

    async def ready(self) -> bool:
        try:
            return (await self._http.get("/readyz")).status_code == 200
        except httpx.TransportError:
            return False


__all__ = ["AsyncSidecarClient", "Retry", "SidecarClient", "SidecarError"]
