"""Secure by default: management needs a key off loopback, keys rotate and never leak, every change
is audited, browsers get strict headers, and TLS works end to end. All on live servers."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import subprocess
from pathlib import Path

import httpx
import pytest

from clients import SidecarClient, SidecarError
from server.main import create_app
from tests.server.conftest import LiveServer, self_signed_certificate, settings
from tuners.artifact import WEIGHTS

KEY_A, KEY_B = "k-alpha-7f3c9e1d2b", "k-bravo-0a8b6c4d2e"


class Captured(logging.Handler):
    """Every log record of the process, formatted, while a test runs."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def logs():  # noqa: ANN201
    handler, root = Captured(), logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield handler.lines
    root.removeHandler(handler)
    root.setLevel(old_level)


def test_off_loopback_management_is_refused_without_a_key_and_detect_stays_open(
    tmp_path: Path, backbone, artifacts, photo_bytes, logs
):
    app = create_app(settings(tmp_path / "store", host="0.0.0.0"), backbone=backbone)
    with LiveServer(app) as live, SidecarClient(live.url) as client:
        with pytest.raises(SidecarError) as e:
            client.upload_task("t", artifacts["side0"])
        assert (e.value.status, e.value.code) == (403, "management_disabled")
        assert "SIDECAR_ADMIN_KEY_FILE" in e.value.message
        for call in (lambda: client.delete_task("t"), lambda: client.pin("t")):
            with pytest.raises(SidecarError, match="management_disabled"):
                call()
        ready = httpx.get(f"{live.url}/readyz").json()
        assert ready["details"]["management"] == "disabled"
        assert client.list_tasks() == []  # reading stays open
        with pytest.raises(SidecarError) as e:
            client.detect(photo_bytes, ["t"])
        assert e.value.code == "unknown_task"  # detect is open: it got as far as the task
    assert any("management is disabled" in line for line in logs)


def test_behind_serve_proxies_management_needs_a_key_even_with_a_loopback_host(tmp_path: Path, backbone, artifacts):
    """Under ``serve run`` or KubeRay the proxies choose the address (KubeRay's listen on 0.0.0.0), so the
    default host, 127.0.0.1, said nothing about who could reach management: it was open to all."""
    app = create_app(settings(tmp_path / "store").behind_serve_proxies(), backbone=backbone)
    with LiveServer(app) as live, SidecarClient(live.url) as client:
        with pytest.raises(SidecarError) as e:
            client.upload_task("t", artifacts["side0"])
        assert httpx.get(f"{live.url}/readyz").json()["details"]["management"] == "disabled"
    assert (e.value.status, e.value.code) == (403, "management_disabled")
    assert "Serve's proxies choose the address" in e.value.message and "SIDECAR_ADMIN_KEY_FILE" in e.value.message
    keyed = settings(tmp_path / "store", admin_key=KEY_A).behind_serve_proxies()
    assert keyed.management == "key" and keyed.model_copy(update={"port": 1}).management == "key"


def test_open_management_is_explicit_and_warned_at_start(tmp_path: Path, backbone, artifacts, logs):
    app = create_app(settings(tmp_path / "store", host="0.0.0.0", allow_open_management=True), backbone=backbone)
    with LiveServer(app) as live, SidecarClient(live.url) as client:
        assert client.upload_task("t", artifacts["side0"]).version == 1
    assert any("management is OPEN" in line for line in logs)


def test_two_keys_from_a_file_both_work_and_never_leak(tmp_path: Path, backbone, artifacts, photo_bytes, logs):
    keys = tmp_path / "admin.keys"
    keys.write_text(f"{KEY_A}\n\n{KEY_B}\n")
    app = create_app(settings(tmp_path / "store", host="0.0.0.0", admin_key_file=keys), backbone=backbone)
    seen: list[str] = []
    with LiveServer(app) as live:
        with SidecarClient(live.url, api_key=KEY_A) as a, SidecarClient(live.url, api_key=KEY_B) as b:
            assert a.upload_task("t", artifacts["side0"]).version == 1
            assert b.upload_task("t", artifacts["side1"]).version == 2
            seen.append(b.detect(photo_bytes, ["t"]).model_dump_json())
        for headers in ({}, {"Authorization": "Bearer wrong-key"}):
            r = httpx.delete(f"{live.url}/v1/tasks/t", headers=headers)
            assert r.status_code == (401 if not headers else 403)
            seen += [r.text, json.dumps(dict(r.headers))]
        for path in ("/v1/backbone", "/v1/tasks", "/readyz", "/metrics", "/openapi.json"):
            r = httpx.get(f"{live.url}{path}", headers={"Authorization": f"Bearer {KEY_A}"})
            seen += [r.text, json.dumps(dict(r.headers))]
    text = "\n".join(seen + logs)
    assert KEY_A not in text and KEY_B not in text
    assert "kalpha" not in text.replace("-", "")  # not even with its dashes removed


def test_every_management_call_is_audited_with_the_artifact_hash(tmp_path: Path, backbone, artifacts, logs):
    keys = tmp_path / "admin.keys"
    keys.write_text(KEY_A)
    app = create_app(settings(tmp_path / "store", admin_key_file=keys), backbone=backbone)
    with LiveServer(app) as live, SidecarClient(live.url, api_key=KEY_A) as client:
        client.upload_task("t", artifacts["side0"])
        client.pin("t")
        client.delete_task("t")
        httpx.put(f"{live.url}/v1/tasks/u", headers={"Authorization": "Bearer nope"}, files={"weights": b"x"})
    audit = [json.loads(line) for line in logs if line.startswith("{") and '"action"' in line]
    by_action = {a["action"]: a for a in audit}
    upload = next(a for a in audit if a["action"] == "upload" and a["status"] == 200)
    assert upload["sha256"] == hashlib.sha256((artifacts["side0"] / WEIGHTS).read_bytes()).hexdigest()
    assert upload["task"] == "t" and upload["version"] == 1 and upload["client"] == "127.0.0.1"
    assert upload["key"] == hashlib.sha256(KEY_A.encode()).hexdigest()[:12] and upload["request_id"]
    assert by_action["pin"]["status"] == 200 and by_action["delete"]["status"] == 204
    refused = next(a for a in audit if a["task"] == "u")
    assert (refused["status"], refused["code"], refused["key"]) == (403, "wrong_key", None)


def test_request_ids_are_echoed_and_in_error_bodies(live: LiveServer):
    r = httpx.get(f"{live.url}/v1/tasks/nope", headers={"X-Request-ID": "trace-42"})
    assert r.headers["x-request-id"] == "trace-42" and r.json()["error"]["request_id"] == "trace-42"
    generated = httpx.get(f"{live.url}/healthz").headers["x-request-id"]
    assert len(generated) == 32
    odd = httpx.get(f"{live.url}/healthz", headers={"X-Request-ID": "a b\\c"}).headers["x-request-id"]
    assert odd != "a b\\c" and len(odd) == 32  # not a sane token: replaced, never reflected


def test_browser_headers_and_a_console_that_works_under_its_csp(live: LiveServer):
    page = httpx.get(f"{live.url}/")
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
    assert page.headers["x-content-type-options"] == "nosniff"
    html = page.text
    assert '<script type="module" src="/app.js"></script>' in html and "<style" not in html  # no inline script, style
    assert not re.search(r"<script>|\son[a-z]+\s*=", html)  # nor inline handlers: the CSP would block them
    for asset, kind in (("/app.js", "text/javascript"), ("/app.css", "text/css")):
        r = httpx.get(f"{live.url}{asset}")
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind)
    assert "innerHTML" not in httpx.get(f"{live.url}/app.js").text
    preflight = httpx.options(
        f"{live.url}/v1/detect",
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
    )
    assert "access-control-allow-origin" not in preflight.headers  # CORS is off by default


def test_cors_allow_list(tmp_path: Path, backbone):
    app = create_app(settings(tmp_path / "store", cors_origins="https://console.example"), backbone=backbone)
    with LiveServer(app) as live:
        ok = {"Origin": "https://console.example", "Access-Control-Request-Method": "POST"}
        r = httpx.options(f"{live.url}/v1/detect", headers=ok)
        assert r.headers["access-control-allow-origin"] == "https://console.example"
        r = httpx.options(f"{live.url}/v1/detect", headers={**ok, "Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in r.headers


def test_tls_end_to_end_with_a_self_signed_certificate(tmp_path: Path, backbone, artifacts, photo_bytes):
    cert, key = self_signed_certificate(tmp_path)
    app = create_app(settings(tmp_path / "store", ssl_certfile=cert, ssl_keyfile=key), backbone=backbone)
    with LiveServer(app) as live:
        assert live.url.startswith("https://")
        with SidecarClient(live.url, verify=str(cert)) as client:
            client.upload_task("t", artifacts["side0"])
            assert client.detect(photo_bytes, ["t"]).results[0].task == "t"
        with pytest.raises(httpx.ConnectError), SidecarClient(live.url) as untrusting:
            untrusting.list_tasks()  # the system trust store does not know this certificate
        with pytest.raises(httpx.HTTPError):
            httpx.get(live.url.replace("https", "http") + "/healthz")


def test_tls_files_that_cannot_serve_are_one_clear_error_before_start_up(tmp_path: Path):
    """uvicorn failed only after the backbone loaded, with "[Errno 2] No such file or directory"."""
    from pydantic import ValidationError

    from server.config import Settings

    cert, key = self_signed_certificate(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    other_cert, other_key = self_signed_certificate(other)
    damaged = tmp_path / "damaged.pem"
    damaged.write_text(cert.read_text()[:200])
    locked = tmp_path / "locked.pem"
    subprocess.run(["openssl", "pkey", "-in", str(key), "-aes256", "-passout", "pass:secret", "-out", str(locked)],
                   check=True, capture_output=True)  # fmt: skip
    for certfile, keyfile, problem in [
        (tmp_path / "missing.pem", key, "ssl_certfile .*missing.pem is not a file"),
        (cert, tmp_path, "ssl_keyfile .* is not a file"),
        (damaged, key, "damaged.pem with ssl_keyfile .* cannot be loaded"),
        (cert, other_key, "cannot be loaded"),  # the key of another certificate
        (cert, locked, "cannot be loaded .*unencrypted"),
    ]:
        with pytest.raises(ValidationError, match=problem):
            Settings(ssl_certfile=certfile, ssl_keyfile=keyfile)
    assert Settings(ssl_certfile=other_cert, ssl_keyfile=other_key).ssl_certfile == other_cert


def test_key_files_that_cannot_be_read_are_one_clear_error(tmp_path: Path):
    from pydantic import ValidationError

    from server.config import Settings

    with pytest.raises(ValidationError, match="admin_key_file .* cannot be read"):
        Settings(admin_key_file=tmp_path / "missing")
    assert Settings(admin_key="a, b").admin_keys[1].get_secret_value() == "b"
    assert Settings(host="::1").management == "loopback" and Settings(host="0.0.0.0").management == "disabled"
    assert Settings(host="127.0.0.2").loopback_only and not Settings(host="example.com").loopback_only
