"""The benchmarks' own HTTP client (``bench.load.KeepAlive``) reads what httpx reads, on one connection."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

from bench.load import KeepAlive, closed_loop
from tests.server.conftest import LiveServer
from tuners.artifact import MANIFEST, WEIGHTS


def test_keep_alive_answers_as_httpx_does(live: LiveServer, artifacts: dict[str, Path], photo_bytes: bytes):
    folder = artifacts["side0"]
    files = {
        "weights": (WEIGHTS, (folder / WEIGHTS).read_bytes()),
        "config": (MANIFEST, (folder / MANIFEST).read_bytes()),
    }
    httpx.put(f"{live.url}/v1/tasks/t", files=files, timeout=60).raise_for_status()
    params, jpeg = {"tasks": "t", "score_threshold": "0.0"}, {"content-type": "image/jpeg"}
    expected = httpx.post(f"{live.url}/v1/detect", params=params, content=photo_bytes, headers=jpeg).json()
    with KeepAlive(live.url) as http:
        for _ in range(3):  # on one connection
            answer = http.post("/v1/detect", params=params, content=photo_bytes, headers=jpeg)
            assert answer.status_code == 200 and answer.json()["results"] == expected["results"]
        first = http.sock
        missing = http.get("/v1/tasks/nope")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "unknown_task"
        assert http.sock is first
    result = closed_loop(live.url, 2, 1.0, lambda http, rng: http.post("/v1/detect", params, photo_bytes, jpeg))
    assert result.requests > 0 and result.statuses == {200: result.requests}


class Chunked(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802
        self.send_response(200)
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        for part in (b'{"a": ', b"[1, 2]}"):
            self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
        self.wfile.write(b"0\r\n\r\n")

    def log_message(self, *args: object) -> None:
        pass


def test_keep_alive_reads_a_chunked_body_and_reconnects_when_the_server_closes():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Chunked)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with KeepAlive(f"http://127.0.0.1:{server.server_address[1]}") as http:
            assert http.get("/").json() == {"a": [1, 2]}
            assert http.sock is not None
            http.sock.shutdown(2)  # as a server's keep-alive timeout leaves it: closed under the client
            assert http.get("/").json() == {"a": [1, 2]}
    finally:
        server.shutdown()
