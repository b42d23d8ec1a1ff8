"""Slow clients (slowloris) cannot hold a connection: a request's head and body each have a deadline,
and a body that keeps pace gets its time. Heads and pipelines have size limits. On a live server, over
raw sockets."""

from __future__ import annotations

import gc
import json
import socket
import time
import weakref
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from server import protocol
from server.main import create_app
from server.protocol import MAX_PIPELINED
from tests.server.conftest import LiveServer, settings

HEAD = b"POST /v1/detect?tasks=t HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"


@pytest.fixture
def server(tmp_path: Path, backbone) -> Iterator[LiveServer]:  # noqa: ANN001
    limits = {"head_timeout_s": 1.0, "body_timeout_s": 1.0, "body_min_rate": 2000}
    with LiveServer(create_app(settings(tmp_path / "store", **limits), backbone=backbone)) as live:
        yield live


def answer_within(sock: socket.socket, seconds: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and when it closed it."""
    start, received = time.monotonic(), b""
    sock.settimeout(seconds)
    while chunk := sock.recv(65536):
        received += chunk
    return received, time.monotonic() - start


@pytest.mark.parametrize("sent", [b"", b"POST /v1/detect HTTP/1.1\r\nHost: x\r\n"], ids=["idle", "half a head"])
def test_a_connection_whose_head_does_not_arrive_is_closed(server: LiveServer, sent: bytes):
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(sent)
        received, after = answer_within(sock, 10)
    assert received == b"" and after < 5  # uvicorn alone kept both open for good
    assert httpx.get(f"{server.url}/healthz").status_code == 200


@pytest.mark.parametrize(("declared", "sent"), [(100_000, 10), (200_000, 100_000)], ids=["trickle", "fast start"])
def test_a_body_that_falls_behind_is_answered_408(server: LiveServer, declared: int, sent: int):
    """10 bytes and then nothing, or 100 KB at once and then nothing: the pace is kept over each 1 s
    window, not over the whole body, so a fast start earns no time (over the whole body, at 2,000
    bytes/s, it earned 50 s)."""
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(HEAD + b"Content-Length: %d\r\n\r\n" % declared + b"x" * sent)
        received, after = answer_within(sock, 60)
    status, _, body = received.partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 408") and after < 5
    assert json.loads(body)["error"]["code"] == "request_timeout"


def test_a_body_that_keeps_pace_gets_its_time(server: LiveServer):
    """4,000 bytes over 1.6 s, longer than the 1 s window, but at 2,500 bytes/s against a minimum of
    2,000: each window brings its 2,000 bytes in 0.8 s, and the server reads it all."""
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(HEAD + b"Content-Length: 4000\r\n\r\n")
        for _ in range(8):
            time.sleep(0.2)
            sock.sendall(b"x" * 500)
        received, _ = answer_within(sock, 10)
    status, _, body = received.partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 415") and b"not_an_image" in body  # read whole: not a JPEG


def _headers(n: int, size: int = 8) -> bytes:
    return b"".join(b"X-%d: %s\r\n" % (i, b"v" * size) for i in range(n))


FLOOD = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + _headers(2_000_000)  # 25 MB of headers, never ended


@pytest.mark.parametrize(
    ("sent", "status", "code"),
    [
        (b"GET /healthz?x=" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "uri_too_long"),
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + _headers(150) + b"\r\n", 431, "headers_too_large"),
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n", 431, "headers_too_large"),
        (FLOOD, 431, "headers_too_large"),
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: ten\r\n\r\n", 400, "malformed_http"),
    ],
    ids=["long target", "150 fields", "one 70 KB field", "25 MB of fields", "not HTTP"],
)
def test_a_head_over_the_limits_is_answered_and_its_connection_closed(
    server: LiveServer, sent: bytes, status: int, code: str
):
    """uvicorn alone read a head of any size: 100 MB of fields left the server 1 GiB larger for good.
    Malformed HTTP gets the API's error body too (uvicorn's own is plain text)."""
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(sent)  # all of it: after the answer, the server drops what comes (a lingering close)
        received, after = answer_within(sock, 10)
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d" % status) and json.loads(body)["error"]["code"] == code and after < 5
    assert httpx.get(f"{server.url}/healthz").status_code == 200


def test_heads_within_the_limits_are_served_with_their_bodies_on_one_connection(server: LiveServer):
    """Two 60 KB heads, each with a body in the same write, pipelined: the limit counts each head alone,
    and a read that holds a head's end and a body is served."""
    body = b"x" * 300_000
    one = HEAD + _headers(90, 640) + b"Content-Length: %d\r\n\r\n" % len(body) + body
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(one + one)
        sock.settimeout(10)
        received = b""
        while received.count(b"HTTP/1.1 ") < 2 or not received.endswith(b"}}"):
            received += sock.recv(65536) or b"(closed)"
            assert not received.endswith(b"(closed)"), received
    assert received.count(b"HTTP/1.1 415 Unsupported Media Type\r\n") == 2, received  # read whole: not a JPEG


def test_a_pipeline_deeper_than_the_limit_is_answered_up_to_it_then_closed(server: LiveServer):
    """uvicorn alone queued pipelined requests without a bound: 300,000 left the server 670 MiB larger.
    Ten pipelined requests are all answered on a connection that stays open."""
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(request * 10)
        sock.settimeout(10)
        received = b""
        while received.count(b"HTTP/1.1 200") < 10:
            received += sock.recv(65536)
        sock.sendall(request * 3000)
        received, _ = answer_within(sock, 10)
    assert received.count(b"HTTP/1.1 200") == MAX_PIPELINED + 1 and received.count(b"HTTP/1.1") == MAX_PIPELINED + 1


@pytest.mark.parametrize("framing", ["declared", "chunked"])
def test_a_client_still_sending_a_refused_body_reads_the_answer_and_is_not_reset(
    tmp_path: Path,
    backbone,
    framing: str,  # noqa: ANN001
):
    """A body over the limit is answered 413 before it is all sent, and the connection closes. Closed at
    once, with the body still arriving, the socket resets: a client still sending gets ECONNRESET, and
    on some systems loses the answer it has not read. The server lingers instead: it half-closes and
    drops what still comes, so the client sends all of it, then reads the answer and an orderly end."""
    limit, size = 64 * 1024, 8 * 1024 * 1024
    with LiveServer(create_app(settings(tmp_path / "store", max_request_bytes=limit), backbone=backbone)) as live:
        with socket.create_connection(("127.0.0.1", live.port)) as sock:
            if framing == "declared":
                sock.sendall(HEAD + b"Content-Length: %d\r\n\r\n" % size)
                sock.sendall(b"x" * size)
            else:
                sock.sendall(HEAD + b"Transfer-Encoding: chunked\r\n\r\n")
                chunk = b"%x\r\n%s\r\n" % (65536, b"x" * 65536)
                for _ in range(size // 65536):
                    sock.sendall(chunk)
            received, after = answer_within(sock, 10)
        head, _, body = received.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 413") and b"connection: close" in head.lower() and after < 5
        assert json.loads(body)["error"]["code"] == "too_large"
        assert httpx.get(f"{live.url}/healthz").status_code == 200


def test_a_lingering_close_ends_when_the_client_is_quiet_or_at_its_bound(
    tmp_path: Path,
    backbone,
    monkeypatch: pytest.MonkeyPatch,  # noqa: ANN001
):
    """Lingering holds a socket only while the client sends: a client that stays connected and quiet is
    closed ``LINGER_S`` after the answer, and one that never stops sending ``LINGER_MAX_S`` after it.
    A closed connection's protocol is freed at once, with the body bytes it read: a first version kept
    it in a reference cycle (through its fired timer) that the collector did not free."""
    monkeypatch.setattr(protocol, "LINGER_S", 0.5)
    monkeypatch.setattr(protocol, "LINGER_MAX_S", 1.5)
    refused = HEAD + b"Content-Length: %d\r\n\r\n" % (1 << 30)
    with LiveServer(create_app(settings(tmp_path / "store", max_request_bytes=1024), backbone=backbone)) as live:
        connections = live.server.server_state.connections
        gc.disable()  # freed by its references going, not by a collection
        try:
            with socket.create_connection(("127.0.0.1", live.port)) as quiet:
                quiet.sendall(refused + b"x" * 100_000)
                received, _ = answer_within(quiet, 10)  # the answer, then the half-close's end of stream
                assert received.startswith(b"HTTP/1.1 413")
                (held,) = [weakref.ref(c) for c in connections]
                deadline = time.monotonic() + 5
                while connections and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert not connections  # closed by the server while the client still held its end
                time.sleep(0.2)
                assert held() is None
        finally:
            gc.enable()
        with socket.create_connection(("127.0.0.1", live.port)) as sending:
            sending.sendall(refused)
            start = time.monotonic()
            with pytest.raises((ConnectionResetError, BrokenPipeError)):
                while time.monotonic() - start < 10:
                    sending.sendall(b"x" * 65536)
                    time.sleep(0.01)
            assert time.monotonic() - start < 5


def test_an_answer_before_an_expected_body_was_asked_for_closes_the_connection(server: LiveServer):
    """``Expect: 100-continue``, then a 415 decided from the head: the client has not sent the body and
    may never. Kept open, a client that reused the connection had its next request read as this one's
    body and waited for good; the answer now closes the connection. A body that was asked for (100
    Continue) and sent leaves the connection open for the next request."""
    head = HEAD + b"Expect: 100-continue\r\nContent-Length: 100\r\n"
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(head + b"Content-Encoding: gzip\r\n\r\n")
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")  # reusing the connection without the body
        received, after = answer_within(sock, 10)
    status, _, rest = received.partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 415") and b"connection: close" in status.lower() and after < 5
    assert b"HTTP/1.1" not in rest  # the GET is not answered: the client sends it again on a new connection
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.settimeout(10)
        sock.sendall(head + b"\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        sock.sendall(b"x" * 100 + b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        received = b""
        while b"HTTP/1.1 200" not in received:
            received += sock.recv(65536) or b"(closed)"
            assert not received.endswith(b"(closed)"), received
    assert received.startswith(b"HTTP/1.1 415") and b"connection: close" not in received.lower()


def test_a_request_asking_to_upgrade_is_served_as_http_1_1_with_its_body(server: LiveServer):
    """``curl --http2`` on ``http://`` (and Java's ``HttpClient``) asks to switch to h2c. llhttp stopped at
    the head, and uvicorn lost the body and the requests behind it: a posted photo was answered 415
    "the image is empty". The upgrade is ignored, as RFC 9110 allows, and the request served whole."""
    body = b"\xff\xd8 not a whole JPEG"
    upgrade = b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n"
    request = HEAD + upgrade + b"Content-Length: %d\r\n\r\n" % len(body) + body
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(request + b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.settimeout(10)
        received = b""
        while not received.endswith(b'"ok"}'):
            received += sock.recv(65536) or b"(closed)"
            assert not received.endswith(b"(closed)"), received
    first = json.loads(received.split(b"\r\n\r\n")[1].split(b"HTTP/1.1")[0])
    assert received.startswith(b"HTTP/1.1 415") and b"HTTP/1.1 200" in received
    assert first["error"]["code"] == "not_an_image" and "empty" not in first["error"]["message"]


def test_ignore_upgrade_renames_the_heads_field_and_leaves_the_body():
    head = b"POST / HTTP/1.1\r\nHost: x\r\nuPgRaDe: h2c\r\nContent-Length: 30\r\n\r\n"
    body = b"\r\nUpgrade: body bytes, kept\r\n"
    out = protocol.ignore_upgrade(head + body)
    assert out == head.replace(b"uPgRaDe:", b"Ignored:") + body and len(out) == len(head + body)
    assert protocol.ignore_upgrade(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n") == b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
