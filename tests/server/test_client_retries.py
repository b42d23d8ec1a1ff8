"""The Python clients retry what is safe to retry (a request that never reached the server, a 503,
after its Retry-After) within bounds, never a 4xx; ready() is a bool even with no server."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from clients import AsyncSidecarClient, Retry, SidecarClient, SidecarError
from clients.cli import main as cli
from tests.server.conftest import free_port

OVERLOADED = {"error": {"code": "overloaded", "message": "busy", "details": []}}


def _script(*answers: int):  # noqa: ANN202
    """A transport handler answering ``answers`` in turn (then 200), recording when each request came."""
    seen: list[float] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(time.monotonic())
        status = answers[len(seen) - 1] if len(seen) <= len(answers) else 200
        if status == 503:
            return httpx.Response(503, json=OVERLOADED, headers={"Retry-After": "1"})
        if status == 404:
            return httpx.Response(404, json={"error": {"code": "unknown_task", "message": "no", "details": []}})
        return httpx.Response(200, json={"tasks": []})

    return handle, seen


def test_503_is_retried_after_its_retry_after_and_a_4xx_never():
    handle, seen = _script(503, 503)
    with SidecarClient("http://sidecar", transport=httpx.MockTransport(handle)) as client:
        assert client.list_tasks() == []
    assert len(seen) == 3 and seen[1] - seen[0] >= 0.95 and seen[2] - seen[1] >= 0.95  # waited Retry-After: 1
    handle, seen = _script(404)
    with SidecarClient("http://sidecar", transport=httpx.MockTransport(handle)) as client, pytest.raises(SidecarError):
        client.get_task("nope")
    assert len(seen) == 1


def test_retries_are_bounded_in_attempts_and_time():
    handle, seen = _script(*[503] * 10)
    retry = Retry(attempts=3, total_s=30)
    with SidecarClient("http://sidecar", retry=retry, transport=httpx.MockTransport(handle)) as client:
        with pytest.raises(SidecarError) as e:
            client.list_tasks()
    assert e.value.status == 503 and len(seen) == 3
    handle, seen = _script(*[503] * 10)
    with SidecarClient("http://sidecar", retry=Retry(attempts=10, total_s=1.5),
                       transport=httpx.MockTransport(handle)) as client, pytest.raises(SidecarError):  # fmt: skip
        client.list_tasks()
    assert len(seen) == 2  # a third try would have waited past the 1.5 s budget


def test_the_async_client_retries_the_same_way():
    handle, seen = _script(503)

    async def run() -> list:
        async with AsyncSidecarClient("http://sidecar", transport=httpx.MockTransport(handle)) as client:
            return await client.list_tasks()

    assert asyncio.run(run()) == [] and len(seen) == 2


def test_a_server_that_is_not_there():
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens here
    retry = Retry(attempts=2, backoff_s=0.05)
    with SidecarClient(url, retry=retry) as client:
        assert client.ready() is False
        start = time.monotonic()
        with pytest.raises(httpx.ConnectError):
            client.list_tasks()  # tried twice (it never reached a server), then reported
        assert time.monotonic() - start >= 0.05

    async def run() -> bool:
        async with AsyncSidecarClient(url) as client:
            return await client.ready()

    assert asyncio.run(run()) is False


@pytest.mark.parametrize(
    ("flags", "words"),
    [(["--url", "http://[::1"], "is not a URL"), (["--url", "localhost:8000"], "write http(s)://host[:port]"),
     (["--timeout", "0"], "above 0"), (["--timeout", "nan"], "above 0"), (["--timeout", "1e309"], "above 0")],
)  # fmt: skip
def test_the_cli_refuses_a_bad_url_or_timeout_before_any_request(flags: list[str], words: str, capsys):
    with pytest.raises(SystemExit) as stop:  # each was a traceback, or a request that failed oddly
        cli([*flags, "tasks"])
    assert stop.value.code == 2 and words in capsys.readouterr().err
