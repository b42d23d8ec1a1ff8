"""End to end through a real uvicorn server on loopback, with the Python client."""

from __future__ import annotations

import io
import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image
from pydantic import BaseModel

from clients import SidecarClient, SidecarError
from server.main import create_app
from tests.server.conftest import LiveServer, settings


def _boxes(result: dict) -> list[tuple]:
    return [(d["label"], d["score"], *d["box"]) for d in result["detections"]]


def _assert_same(a: dict | BaseModel, b: dict | BaseModel, tol: float = 1e-3) -> None:
    """Same labels, scores and boxes, matched as sets: the API rounds boxes to 0.01 px and scores to
    1e-4, and boxes of equal score may come in either order (the test tasks score many boxes alike)."""
    a, b = (x.model_dump() if isinstance(x, BaseModel) else x for x in (a, b))
    assert len(a["detections"]) == len(b["detections"])
    for x in _boxes(a):
        assert any(x[0] == y[0] and x[1:] == pytest.approx(y[1:], abs=tol + 0.01) for y in _boxes(b)), x


def test_fan_out_runs_one_backbone_pass_and_equals_single_calls(live: LiveServer, artifacts, photo_bytes):
    side = [f"side{i}" for i in range(8)]
    with SidecarClient(live.url) as client:
        for task in side:
            client.upload_task(task, artifacts[task])
        singles = {t: client.detect(photo_bytes, [t]).results[0] for t in side}
        before = client.backbone().shared_image_passes
        fan = client.detect(photo_bytes, side)
        assert client.backbone().shared_image_passes - before == 1
        assert fan.backbone_passes == 1
        metrics = httpx.get(f"{live.url}/metrics").text
    assert "sidecar_backbone_image_passes_total" in metrics
    assert [r.task for r in fan.results] == side
    assert sum(len(r.detections) for r in fan.results) > 0
    for result in fan.results:
        _assert_same(result, singles[result.task])


def test_lifecycle_upload_detect_replace_delete_restart(tmp_path: Path, backbone, artifacts, photo_bytes):
    store = tmp_path / "store"
    with LiveServer(create_app(settings(store), backbone=backbone)) as live, SidecarClient(live.url) as client:
        assert client.upload_task("digits", artifacts["side1"]).version == 1
        first = client.detect(photo_bytes, ["digits"]).results[0]
        assert first.version == 1 and first.method == "cst"
        client.upload_task("digits", artifacts["side2"])
        second = client.detect(photo_bytes, ["digits"]).results[0]
        assert second.version == 2 and second.method == "e3va"
        client.upload_task("faces", artifacts["inline0"])
        client.delete_task("faces")
        with pytest.raises(SidecarError) as e:
            client.detect(photo_bytes, ["faces"])
        assert e.value.status == 404 and e.value.code == "unknown_task"
    with LiveServer(create_app(settings(store), backbone=backbone)) as live, SidecarClient(live.url) as client:
        tasks = {t.id: t for t in client.list_tasks()}
        assert set(tasks) == {"digits"} and tasks["digits"].version == 2
        again = client.detect(photo_bytes, ["digits"]).results[0]
        _assert_same(again, second)


def test_bad_input_gets_its_code(live: LiveServer, artifacts, photo_bytes, tmp_path: Path):
    with SidecarClient(live.url) as client:
        client.upload_task("ok", artifacts["side0"])

        def code(call) -> tuple[int, str]:  # noqa: ANN001
            with pytest.raises(SidecarError) as e:
                call()
            assert e.value.message
            return e.value.status, e.value.code

        assert code(lambda: client.detect(photo_bytes, ["nope"])) == (404, "unknown_task")
        assert code(lambda: client.detect(b"hello, not an image", ["ok"])) == (415, "not_an_image")
        assert code(lambda: client.detect(photo_bytes[: len(photo_bytes) // 3], ["ok"])) == (422, "unreadable_image")
        assert code(lambda: client.detect(photo_bytes, ["Bad Id!"])) == (422, "invalid_task_id")
        bomb = io.BytesIO()
        Image.new("L", (20_000, 20_000)).save(bomb, format="PNG")  # 400 MP of zeros, a few hundred KB
        assert code(lambda: client.detect(bomb.getvalue(), ["ok"])) == (413, "too_large")
        assert code(lambda: client.detect(b"x" * (21 << 20), ["ok"])) == (413, "too_large")
        gzipped = httpx.post(f"{live.url}/v1/detect", params={"tasks": "ok"}, content=photo_bytes,
                             headers={"content-type": "image/jpeg", "content-encoding": "gzip"})  # fmt: skip
        assert (gzipped.status_code, gzipped.json()["error"]["code"]) == (415, "unsupported_media_type")
        bad = tmp_path / "bad"
        shutil.copytree(artifacts["side0"], bad)
        manifest = json.loads((bad / "tuner.json").read_text())
        (bad / "tuner.json").write_text(json.dumps({**manifest, "backbone": {"name": "x", "fingerprint": "0" * 64}}))
        assert code(lambda: client.upload_task("other", bad)) == (409, "incompatible_backbone")
        (bad / "tuner.json").write_text(json.dumps(manifest))
        (bad / "tuner.safetensors").write_bytes((bad / "tuner.safetensors").read_bytes()[:1000])
        with pytest.raises(SidecarError) as e:
            client.upload_task("other", bad)
        assert e.value.code == "invalid_artifact" and len(e.value.details) >= 1
        (bad / "tuner.json").write_text("[" * 100_000 + "]" * 100_000)  # deeper than Python's parser recurses
        assert code(lambda: client.upload_task("other", bad)) == (422, "invalid_artifact")
        (bad / "tuner.json").write_text(json.dumps({**manifest, "head": {**manifest["head"], "width": -5}}))
        assert code(lambda: client.upload_task("other", bad)) == (422, "invalid_artifact")
        assert code(lambda: client.get_task("other")) == (404, "unknown_task")


def test_auth_on_management_and_inference(tmp_path: Path, backbone, artifacts, photo_bytes):
    app = create_app(settings(tmp_path / "s", admin_key="admin-secret", inference_key="infer"), backbone=backbone)
    with LiveServer(app) as live:
        with SidecarClient(live.url) as anonymous, pytest.raises(SidecarError) as e:
            anonymous.upload_task("t", artifacts["side0"])
        assert (e.value.status, e.value.code) == (401, "missing_key")
        with SidecarClient(live.url, api_key="wrong") as wrong, pytest.raises(SidecarError) as e:
            wrong.upload_task("t", artifacts["side0"])
        assert (e.value.status, e.value.code) == (403, "wrong_key")
        with SidecarClient(live.url, api_key="admin-secret") as admin:
            admin.upload_task("t", artifacts["side0"])
        with SidecarClient(live.url, api_key="infer") as user:
            assert user.detect(photo_bytes, ["t"]).results[0].task == "t"
            with pytest.raises(SidecarError) as e:
                user.delete_task("t")
            assert e.value.status == 403


def test_concurrent_clients_mixed_tasks(live: LiveServer, artifacts, photos):
    tasks = ["side0", "side1", "side2", "inline0", "inline1"]
    with SidecarClient(live.url) as client:
        for task in tasks:
            client.upload_task(task, artifacts[task])
        expected = {(i, t): client.detect(p, [t]).results[0] for i, p in enumerate(photos) for t in tasks}
    jobs = [(i % len(photos), [tasks[i % 5]] if i % 2 else tasks[: 2 + i % 4]) for i in range(64)]

    def call(job: tuple[int, list[str]]) -> tuple[int, dict]:
        with SidecarClient(live.url) as c:
            return job[0], c.detect(photos[job[0]], job[1])

    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(call, jobs))
    for image, answer in answers:
        for result in answer.results:
            _assert_same(result, expected[(image, result.task)])


def test_openapi_health_pins_and_raw_body(live: LiveServer, artifacts, photo_bytes):
    spec = httpx.get(f"{live.url}/openapi.json").json()
    for path in ("/v1/detect", "/v1/tasks", "/v1/tasks/{task_id}", "/v1/tasks/{task_id}/pin", "/v1/backbone"):
        assert path in spec["paths"]
    assert httpx.get(f"{live.url}/healthz").status_code == 200
    assert httpx.get(f"{live.url}/readyz").json()["ready"] is True
    for probe in ("/healthz", "/readyz"):  # monitors that probe with HEAD get the status, and no body
        answer = httpx.head(f"{live.url}{probe}")
        assert answer.status_code == 200 and answer.content == b""
    page = httpx.get(f"{live.url}/")
    assert page.status_code == 200 and 'id="threshold"' in page.text
    assert "innerHTML" not in page.text  # labels come from uploads: text nodes only
    with SidecarClient(live.url) as client:
        client.upload_task("p", artifacts["side3"])
        assert client.pin("p").pinned is True and client.get_task("p").residency == "device"
        assert client.pin("p", pinned=False).pinned is False
        via_form = client.detect(photo_bytes, ["p"], score_threshold=0.2, max_detections=3).results[0]
    raw = httpx.post(f"{live.url}/v1/tasks/p/detect?score_threshold=0.2&max_detections=3", content=photo_bytes)
    assert raw.status_code == 200 and len(via_form.detections) <= 3
    _assert_same(raw.json()["results"][0], via_form)
    assert all(d.score >= 0.2 for d in via_form.detections)


def test_feature_cache_skips_the_backbone_for_a_known_image(tmp_path: Path, backbone, artifacts, photo_bytes):
    app = create_app(settings(tmp_path / "s", feature_cache_bytes=64 << 20), backbone=backbone)
    with LiveServer(app) as live, SidecarClient(live.url) as client:
        for task in ("side0", "side1"):
            client.upload_task(task, artifacts[task])
        first = client.detect(photo_bytes, ["side0"])
        second = client.detect(photo_bytes, ["side1"])
        fresh = client.detect(photo_bytes[:-1] + b"\x00", ["side1"])  # other bytes: a miss
    assert (first.backbone_passes, second.backbone_passes) == (1, 0)
    assert fresh.backbone_passes == 1


def test_server_killed_during_an_upload_restarts_clean(tmp_path: Path, artifacts):
    """SIGKILL a real server process while an upload's body is still arriving; restart; nothing partial."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time

    from tests.server.conftest import free_port

    store = tmp_path / "store"

    def start() -> tuple[subprocess.Popen, str]:
        port = free_port()
        args = ["--weights", "random", "--image-size", "64", "--store-dir", str(store), "--port", str(port)]
        proc = subprocess.Popen([sys.executable, "-m", "server.main", *args], stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(f"{url}/readyz").status_code == 200:
                    return proc, url
            except httpx.TransportError:
                time.sleep(0.2)
        proc.kill()
        raise RuntimeError("server did not become ready")

    proc, url = start()
    with SidecarClient(url) as client:
        client.upload_task("kept", artifacts["side0"])
    body = (artifacts["side1"] / "tuner.safetensors").read_bytes()
    head = (
        f"PUT /v1/tasks/partial HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=B\r\n"
        f'Content-Length: {len(body) + 10_000}\r\n\r\n--B\r\nContent-Disposition: form-data; name="weights"; '
        f'filename="tuner.safetensors"\r\n\r\n'
    ).encode()
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(head + body[: len(body) // 2])
        time.sleep(0.5)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    proc, url = start()
    try:
        with SidecarClient(url) as client:
            assert [t.id for t in client.list_tasks()] == ["kept"]
        assert sorted(p.name for p in store.iterdir()) == ["kept"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_onnx_runtime_serves_the_same_detections(tmp_path: Path, backbone, artifacts, photo_bytes):
    results = {}
    for runtime in ("torch", "onnx"):
        app = create_app(settings(tmp_path / runtime, runtime=runtime), backbone=backbone)
        with LiveServer(app) as live, SidecarClient(live.url) as client:
            client.upload_task("t", artifacts["side1"])
            results[runtime] = client.detect(photo_bytes, ["t"]).results[0]
            info = client.backbone()
        assert info.runtime == runtime
    assert info.provider == "CPUExecutionProvider"
    _assert_same(results["onnx"], results["torch"], tol=2e-3)


def test_cache_budget_over_http_with_20_tasks_and_a_pin(tmp_path: Path, backbone, artifacts, photo_bytes):
    """On a CPU the host tier is the device's memory: one tier gets both budgets (server.services.cache_budgets)."""
    from server.tuner_cache import entry_bytes
    from tuners.artifact import load_artifact

    size = entry_bytes(load_artifact(artifacts["side0"], backbone)[0], compiles=True)  # the CPU default compiles
    app = create_app(settings(tmp_path / "s", device_cache_bytes=3 * size, host_cache_bytes=size), backbone=backbone)
    with LiveServer(app) as live, SidecarClient(live.url) as client:
        for i in range(20):
            client.upload_task(f"t{i}", artifacts["side0"])
        client.pin("t0")
        for i in list(range(20)) * 2:
            assert client.detect(photo_bytes, [f"t{i}"]).results[0].task == f"t{i}"
            resident = {
                line.split('"')[1]: float(line.split()[-1])
                for line in httpx.get(f"{live.url}/metrics").text.splitlines()
                if line.startswith("sidecar_tuner_cache_resident_bytes{")
            }
            assert resident["device"] <= 4 * size and resident["host"] == 0
        assert client.get_task("t0").residency == "device"


def test_async_client_has_every_call_and_matches_the_sync_one(live: LiveServer, artifacts, photos):
    import asyncio

    from clients import AsyncSidecarClient

    with SidecarClient(live.url) as client:
        for task in ("side0", "side1"):
            client.upload_task(task, artifacts[task])
        expected = [client.detect(p, ["side0", "side1"]) for p in photos]

    async def run() -> tuple[list[dict], dict, list[str]]:
        async with AsyncSidecarClient(live.url) as client:
            assert await client.ready() and (await client.backbone()).name == "mobilenet_v2"
            answers = await asyncio.gather(*(client.detect(p, ["side0", "side1"]) for p in photos))
            pinned = await client.pin("side0")
            assert (await client.get_task("side0")).pinned and not (await client.pin("side0", False)).pinned
            await client.delete_task("side1")
            with pytest.raises(SidecarError) as e:
                await client.get_task("side1")
            assert e.value.code == "unknown_task"
            return answers, pinned, [t.id for t in await client.list_tasks()]

    answers, pinned, left = asyncio.run(run())
    assert pinned.pinned and pinned.residency == "device" and left == ["side0"]
    for answer, want in zip(answers, expected):
        for got, ref in zip(answer.results, want.results):
            _assert_same(got, ref)
