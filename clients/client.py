"""The blocking and the asyncio client. Each method sends one :mod:`clients.calls` call, so both
clients build every request and read every answer the same way; only the waiting differs."""

from __future__ import annotations

import asyncio
import itertools
import ssl
import time
from pathlib import Path
from typing import Any

import httpx

from clients import calls
from clients.calls import NOT_SENT, Call, Retry, raise_for_error
from clients.images import Image
from clients.models import BackboneInfo, DetectResponse, TaskInfo, VersionInfo


def _tls(verify: bool | str) -> bool | ssl.SSLContext:
    """httpx's ``verify``: a path becomes an SSL context that trusts that certificate or bundle."""
    return verify if isinstance(verify, bool) else ssl.create_default_context(cafile=str(verify))


def _options(api_key: str | None, base_url: str, timeout: float, verify: bool | str) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return {"base_url": base_url.rstrip("/"), "headers": headers, "timeout": timeout, "verify": _tls(verify)}


class SidecarClient:
    """Blocking client.

    Args:
        base_url: e.g. ``http://localhost:8000``.
        api_key: sent as ``Authorization: Bearer``.
        timeout: seconds per HTTP request.
        verify: check the server's TLS certificate (``True``), or trust this CA bundle or certificate path.
        retry: when a call is tried again; see :class:`Retry`.
        transport: an httpx transport (tests, proxies).
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        timeout: float = 60.0,
        verify: bool | str = True,
        retry: Retry = Retry(),
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.retry = retry
        self._http = httpx.Client(transport=transport, **_options(api_key, base_url, timeout, verify))

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
        raise_for_error(response)
        return call.parse(response.json() if response.content else None)

    def detect(
        self,
        image: Image,
        tasks: str | list[str],
        score_threshold: float | None = None,
        max_detections: int | None = None,
    ) -> DetectResponse:
        """Detections of every task in ``tasks`` on one image (one backbone pass for the side tasks).

        Args:
            image: a path, encoded bytes, a PIL image or an RGB ``uint8`` array.
            tasks: ``"digits"``, ``"digits,faces"`` or a list; ``"digits@3"`` names a kept version.
        """
        return self._send(calls.detect(image, tasks, score_threshold, max_detections))

    def detect_task(
        self, task_id: str, image: Image, score_threshold: float | None = None, max_detections: int | None = None
    ) -> DetectResponse:
        """One task's detections (``"digits"`` or ``"digits@3"``), the image sent as the raw body."""
        return self._send(calls.detect_task(image, task_id, score_threshold, max_detections))

    def upload_task(self, task_id: str, artifact: str | Path) -> TaskInfo:
        """Publishes an artifact folder (``tuner.safetensors`` + ``tuner.json``) as a new version."""
        return self._send(calls.upload(task_id, artifact))

    def list_tasks(self) -> list[TaskInfo]:
        return self._send(calls.list_tasks())

    def get_task(self, task_id: str) -> TaskInfo:
        return self._send(calls.get_task(task_id))

    def delete_task(self, task_id: str) -> None:
        self._send(calls.delete_task(task_id))

    def pin(self, task_id: str, pinned: bool = True) -> TaskInfo:
        """Keeps the task resident (``pinned=False`` lets it be evicted again)."""
        return self._send(calls.pin(task_id, pinned))

    def versions(self, task_id: str) -> list[VersionInfo]:
        """The kept versions of a task, oldest first."""
        return self._send(calls.versions(task_id))

    def rollback(self, task_id: str, version: int) -> TaskInfo:
        """Makes kept version ``version`` current again."""
        return self._send(calls.rollback(task_id, version))

    def backbone(self) -> BackboneInfo:
        return self._send(calls.backbone())

    def ready(self) -> bool:
        """Whether the server answers and is ready; ``False`` also when it cannot be reached."""
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False


class AsyncSidecarClient:
    """The same calls for asyncio code: ``async with AsyncSidecarClient(url) as client: await client.detect(...)``.
    Arguments as :class:`SidecarClient`."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        timeout: float = 60.0,
        verify: bool | str = True,
        retry: Retry = Retry(),
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.retry = retry
        self._http = httpx.AsyncClient(transport=transport, **_options(api_key, base_url, timeout, verify))

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
        raise_for_error(response)
        return call.parse(response.json() if response.content else None)

    async def detect(
        self,
        image: Image,
        tasks: str | list[str],
        score_threshold: float | None = None,
        max_detections: int | None = None,
    ) -> DetectResponse:
        return await self._send(calls.detect(image, tasks, score_threshold, max_detections))

    async def detect_task(
        self, task_id: str, image: Image, score_threshold: float | None = None, max_detections: int | None = None
    ) -> DetectResponse:
        return await self._send(calls.detect_task(image, task_id, score_threshold, max_detections))

    async def upload_task(self, task_id: str, artifact: str | Path) -> TaskInfo:
        return await self._send(calls.upload(task_id, artifact))

    async def list_tasks(self) -> list[TaskInfo]:
        return await self._send(calls.list_tasks())

    async def get_task(self, task_id: str) -> TaskInfo:
        return await self._send(calls.get_task(task_id))

    async def delete_task(self, task_id: str) -> None:
        await self._send(calls.delete_task(task_id))

    async def pin(self, task_id: str, pinned: bool = True) -> TaskInfo:
        return await self._send(calls.pin(task_id, pinned))

    async def versions(self, task_id: str) -> list[VersionInfo]:
        return await self._send(calls.versions(task_id))

    async def rollback(self, task_id: str, version: int) -> TaskInfo:
        return await self._send(calls.rollback(task_id, version))

    async def backbone(self) -> BackboneInfo:
        return await self._send(calls.backbone())

    async def ready(self) -> bool:
        try:
            return (await self._http.get("/readyz")).status_code == 200
        except httpx.TransportError:
            return False
