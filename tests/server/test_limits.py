"""Limits hold while the body streams: a 2 GiB chunked upload against a 1 MiB limit is cut off early,
and the server's memory and temp disk stay within the limit plus a small margin."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from clients import SidecarClient
from server.config import Settings
from server.main import create_app
from server.schemas import TaskInfo
from server.tasks import Tasks
from tests.server.conftest import LiveServer, settings, spawn_server

GiB, MiB = 1 << 30, 1 << 20
JPEG = {"content-type": "image/jpeg"}


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _temp_bytes(pid: int, folder: Path) -> int:
    """Bytes of the files the process holds open under ``folder`` (spooled parts are unlinked: read them by fd)."""
    total = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if os.readlink(fd).startswith(str(folder)):
                total += os.stat(fd).st_size
        except OSError:
            continue
    return total


def _chunked_upload(port: int, path: str, total: int, content_type: str) -> tuple[bytes, int, float]:
    """Streams ``total`` bytes chunked; returns (response head, bytes sent, seconds) once the server answers."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = f"PUT {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Type: {content_type}\r\n\r\n"
    sock.sendall(head.encode())
    part = b'--XyZ\r\nContent-Disposition: form-data; name="weights"; filename="w"\r\n\r\n'
    chunk, sent, start = b"\0" * MiB, 0, time.perf_counter()
    try:
        sock.sendall(b"%x\r\n%s\r\n" % (len(part), part))
        while sent < total:
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            sent += len(chunk)
            sock.setblocking(False)
            try:
                if sock.recv(1, socket.MSG_PEEK):
                    break  # the server has answered
            except BlockingIOError:
                pass
            finally:
                sock.setblocking(True)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server closed the connection after answering
    sock.settimeout(30)
    answer = sock.recv(4096)
    sock.close()
    return answer, sent, time.perf_counter() - start


def test_a_2_gib_chunked_upload_stops_at_the_limit_in_memory_and_on_disk(tmp_path: Path):
    temp = tmp_path / "tmp"
    temp.mkdir()
    server, url = spawn_server(tmp_path, "--max-upload-bytes", str(MiB), env={"TMPDIR": str(temp)})
    port = int(url.rsplit(":", 1)[1])
    try:
        rss_before, peaks, done = _rss(server.pid), {"rss": 0, "temp": 0}, threading.Event()
        temp_before = sorted(temp.iterdir())  # what the libraries left at start-up

        def watch() -> None:
            while not done.is_set():
                peaks["rss"] = max(peaks["rss"], _rss(server.pid))
                peaks["temp"] = max(peaks["temp"], _temp_bytes(server.pid, temp))
                time.sleep(0.01)

        watcher = threading.Thread(target=watch)
        watcher.start()
        answer, sent, seconds = _chunked_upload(port, "/v1/tasks/t", 2 * GiB, "multipart/form-data; boundary=XyZ")
        done.set()
        watcher.join()
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        assert sent < 64 * MiB and seconds < 20  # cut off at the limit, not after reading 2 GiB
        assert peaks["temp"] <= MiB + 64 * 1024  # spooled parts never exceed the limit
        assert peaks["rss"] - rss_before < 48 * MiB, (peaks["rss"] - rss_before) / MiB
        assert _temp_bytes(server.pid, temp) == 0 and sorted(temp.iterdir()) == temp_before  # gone afterwards
        r = httpx.put(f"{url}/v1/tasks/t", content=b"x" * (2 * MiB),
                      headers={"content-type": "multipart/form-data; boundary=XyZ"})  # fmt: skip
        assert r.status_code == 413  # a declared Content-Length over the limit: refused before reading
        assert httpx.get(f"{url}/healthz").status_code == 200
    finally:
        server.terminate()
        server.wait(30)


@pytest.mark.parametrize("turns", [1, 2])
def test_uploads_sent_at_once_are_validated_upload_concurrency_at_a_time(
    tmp_path: Path, backbone, artifacts, monkeypatch: pytest.MonkeyPatch, turns: int
):
    """Each upload holds about twice its size in memory while it is validated: uploads sent together
    take turns (``upload_concurrency`` at a time), and every one of them is published."""
    in_flight, most, publish = [0], [0], Tasks.publish

    async def counted(self: Tasks, task_id: str, weights: bytes, config: bytes) -> TaskInfo:
        in_flight[0] += 1
        most[0] = max(most[0], in_flight[0])
        try:
            await asyncio.sleep(0.2)  # the other uploads arrive meanwhile
            return await publish(self, task_id, weights, config)
        finally:
            in_flight[0] -= 1

    monkeypatch.setattr(Tasks, "publish", counted)

    def upload(url: str, i: int) -> int:
        with SidecarClient(url) as client:
            return client.upload_task(f"t{i}", artifacts[f"side{i}"]).version

    app = create_app(settings(tmp_path / "s", upload_concurrency=turns), backbone=backbone)
    with LiveServer(app) as live, ThreadPoolExecutor(4) as pool:
        versions = list(pool.map(lambda i: upload(live.url, i), range(4)))
        listed = {t.id for t in SidecarClient(live.url).list_tasks()}
    assert versions == [1, 1, 1, 1] and listed == {"t0", "t1", "t2", "t3"} and most[0] == turns


def gauge(metrics: str, name: str) -> float:
    return next(float(line.split()[-1]) for line in metrics.splitlines() if line.startswith(f"{name} "))


def test_request_bodies_in_memory_stay_within_the_budget_and_are_given_back(tmp_path: Path, backbone):
    """Three 1 MiB bodies being read fill a 3 MiB budget: a fourth, raw or multipart, is answered 503 (and
    its connection closed); once the three are answered, their bytes are given back. A body is counted as it arrives,
    so one declared at 1 MiB that trickles holds only what it sent."""
    limits = {"max_request_bytes": MiB, "max_body_memory_bytes": 3 * MiB}
    app = create_app(settings(tmp_path / "s", **limits), backbone=backbone)
    head = b"POST /v1/detect?tasks=t HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n"
    kib, budget = 1024, app.state.body_budget
    with LiveServer(app) as live:
        with socket.create_connection(("127.0.0.1", live.port), timeout=30) as trickle:
            trickle.sendall(head % MiB + b"x" * 10)
            time.sleep(0.5)
            trickled = budget.held
        socks = [socket.create_connection(("127.0.0.1", live.port), timeout=30) for _ in range(3)]
        for sock in socks:
            sock.sendall(head % MiB + b"x" * (MiB - kib))
        deadline = time.monotonic() + 10
        while budget.held < 3 * (MiB - kib) and time.monotonic() < deadline:
            time.sleep(0.05)
        metric = httpx.get(f"{live.url}/metrics").text
        refused = httpx.post(f"{live.url}/v1/detect?tasks=t", content=b"x" * (8 * kib), headers=JPEG)
        form = httpx.post(f"{live.url}/v1/detect", data={"tasks": "t"}, files={"image": ("a.jpg", b"x" * 8 * kib)})
        for sock in socks:
            sock.sendall(b"x" * kib)
        answers = [sock.recv(30) for sock in socks]
        for sock in socks:
            sock.close()
        after = httpx.post(f"{live.url}/v1/detect?tasks=t", content=b"x" * 1000, headers=JPEG)
        held, metric_after = budget.held, httpx.get(f"{live.url}/metrics").text
    assert trickled <= 10
    assert gauge(metric, "sidecar_request_body_bytes") >= 3 * (MiB - kib)  # exported to /metrics
    assert gauge(metric_after, "sidecar_request_body_bytes") == 0
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "overloaded"
    assert refused.headers["retry-after"] == "1" and refused.headers["connection"] == "close"
    assert form.status_code == 503  # a multipart body too, spooled to disk or not
    assert answers == [b"HTTP/1.1 415 Unsupported Media"] * 3 and after.status_code == 415 and held == 0


def test_a_body_budget_smaller_than_one_request_is_refused():
    with pytest.raises(ValueError, match="max_body_memory_bytes must be at least max_request_bytes"):
        Settings(max_request_bytes=2 * MiB, max_body_memory_bytes=MiB)
