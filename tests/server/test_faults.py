"""Faults survived: a task that raises or gives NaN at inference fails alone and is quarantined
after repeated failures; a stored version damaged on disk quarantines its task alone; SIGTERM lets
in-flight requests finish and exits 0."""

from __future__ import annotations

import io
import math
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image

from clients import SidecarClient, SidecarError
from models.runtime import build_runtime
from server.executor import Executor, TaskFailure, WorkItem, all_finite
from server.imaging import decode_image
from server.main import create_app
from server.metrics import Metrics
from server.store import TaskStore
from tests.server.conftest import LiveServer, make_artifact, settings, spawn_server
from tuners.artifact import MANIFEST, WEIGHTS, load_artifact, save_artifact
from tuners.compiled import CompiledTask


def overflowing_artifact(backbone, out: Path) -> Path:  # noqa: ANN001
    """Finite weights whose head overflows to Inf on real images (the upload's dry run would refuse it)."""
    model, _ = load_artifact(make_artifact(backbone, out, "cst", seed=5), backbone)
    with torch.no_grad():
        model.head.predictor.weight.fill_(3e38)
    return save_artifact(model, backbone, out / "overflow")


def test_a_failing_task_fails_alone_in_its_batch(tmp_path: Path, backbone, artifacts, photos):
    good = load_artifact(artifacts["side1"], backbone)[0]
    raising = load_artifact(artifacts["side0"], backbone)[0]
    raising.head_outputs = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("bad kernel"))  # type: ignore[method-assign]
    nan = load_artifact(overflowing_artifact(backbone, tmp_path), backbone)[0]
    inline = load_artifact(artifacts["inline0"], backbone)[0]
    executor = Executor(backbone, build_runtime(backbone, "torch", "cpu"), Metrics())
    image = decode_image(photos[0], 1 << 24, 1 << 26)
    tasks = {"good": good, "raising": raising, "nan": nan, "inline": inline}
    out = executor.run([WorkItem(image, "x", tasks)]).detections[0]
    assert isinstance(out["raising"], TaskFailure) and "bad kernel" in out["raising"].message
    assert isinstance(out["nan"], TaskFailure) and "NaN or Inf" in out["nan"].message
    alone = executor.run([WorkItem(image, "x", {"good": good, "inline": inline})]).detections[0]
    for name in ("good", "inline"):
        assert torch.equal(out[name].labels, alone[name].labels) and len(out[name]) > 0


def test_a_compiled_task_whose_decoding_fails_fails_alone(tmp_path: Path, backbone, artifacts, photos):
    """Decoding a task's outputs into candidates can fail too; that stays the task's own, as its graph's would."""
    good, bad = (load_artifact(artifacts[name], backbone)[0] for name in ("side1", "side7"))  # two cst tasks
    graphs = {
        n: CompiledTask(m, backbone, tmp_path / f"{n}.onnx", "cpu", threads=1)
        for n, m in (("good", good), ("bad", bad))
    }
    bad.head.candidates = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("bad decode"))  # type: ignore[method-assign]
    executor = Executor(backbone, build_runtime(backbone, "torch", "cpu"), Metrics())
    images = [decode_image(p, 1 << 24, 1 << 26) for p in photos[:2]]
    both = executor.run(
        [WorkItem(img, str(i), {"good": good, "bad": bad}, compiled=graphs) for i, img in enumerate(images)]
    )
    alone = executor.run([WorkItem(img, str(i), {"good": good}, compiled=graphs) for i, img in enumerate(images)])
    for out, ref in zip(both.detections, alone.detections):
        assert isinstance(out["bad"], TaskFailure) and "bad decode" in out["bad"].message
        assert len(out["good"]) > 0 and torch.equal(out["good"].boxes, ref["good"].boxes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_all_finite_finds_every_nan_and_inf_and_nothing_else(dtype: torch.dtype) -> None:
    big = torch.finfo(dtype).max
    assert all_finite(torch.full((3, 2100, 10), big, dtype=dtype))  # a float64 sum does not overflow
    assert all_finite(torch.tensor([big, -big, 0.0], dtype=dtype)) and all_finite(torch.zeros(0, dtype=dtype))
    for bad in (math.nan, math.inf, -math.inf):
        x = torch.randn(2, 2100, 4).to(dtype)
        x[1, 1234, 2] = bad
        assert not all_finite(x)
    assert not all_finite(torch.tensor([math.inf, -math.inf], dtype=dtype))  # cancelling infinities


def test_a_task_failing_at_inference_gets_task_failed_and_is_quarantined(
    tmp_path: Path, backbone, artifacts, photo_bytes
):
    root = tmp_path / "store"
    store = TaskStore(root)
    for task, folder in (("bad", overflowing_artifact(backbone, tmp_path)), ("good", artifacts["side1"])):
        store.publish(task, (folder / WEIGHTS).read_bytes(), (folder / MANIFEST).read_bytes(), lambda _: None)
    app = create_app(settings(root, quarantine_after_failures=3), backbone=backbone)
    with LiveServer(app) as live, SidecarClient(live.url) as client:
        fan = client.detect(photo_bytes, ["bad", "good"])  # 200: the good task answers
        bad, good = fan.results
        assert bad.error.code == "task_failed" and bad.detections == [] and good.error is None
        with pytest.raises(SidecarError) as e:
            client.detect(photo_bytes, ["bad"])  # every task named failed: 500
        assert (e.value.status, e.value.code) == (500, "task_failed") and "NaN or Inf" in e.value.details[0]
        with pytest.raises(SidecarError):
            client.detect(photo_bytes, ["bad"])  # the third failure in a row
        with pytest.raises(SidecarError) as e:
            client.detect(photo_bytes, ["bad"])
        assert (e.value.status, e.value.code) == (409, "task_quarantined")
        assert httpx.get(f"{live.url}/healthz").status_code == 200
        assert [q["id"] for q in httpx.get(f"{live.url}/v1/tasks").json()["quarantined"]] == ["bad"]
        assert client.detect(photo_bytes, ["good"]).results[0].error is None
    assert (root / "bad" / "v1" / WEIGHTS).is_file()  # quarantined, not deleted


def test_a_version_damaged_on_disk_quarantines_its_task_and_the_others_still_list(
    tmp_path: Path, backbone, artifacts, photo_bytes
):
    """A stored manifest that no longer parses (a bad disk, a hand edit) once made every listing
    answer 422, and a detect request for a version whose weights were cut answered 422
    invalid_artifact, as if the client had sent a bad artifact; now each task is quarantined (409),
    listed with why, and kept on disk, and the other tasks serve."""
    root = tmp_path / "store"
    store = TaskStore(root)
    for task in ("damaged", "cut", "good"):
        folder = artifacts["side1"]
        store.publish(task, (folder / WEIGHTS).read_bytes(), (folder / MANIFEST).read_bytes(), lambda _: None)
    manifest, weights = root / "damaged" / "v1" / MANIFEST, root / "cut" / "v1" / WEIGHTS
    manifest.write_bytes(manifest.read_bytes()[:40])
    weights.write_bytes(weights.read_bytes()[:1000])
    with LiveServer(create_app(settings(root), backbone=backbone)) as live, SidecarClient(live.url) as client:
        with pytest.raises(SidecarError) as e:
            client.detect(photo_bytes, ["cut"])
        assert (e.value.status, e.value.code) == (409, "task_quarantined")
        listing = httpx.get(f"{live.url}/v1/tasks")
        assert listing.status_code == 200 and [t["id"] for t in listing.json()["tasks"]] == ["good"]
        reasons = {q["id"]: q["reason"] for q in listing.json()["quarantined"]}
        assert sorted(reasons) == ["cut", "damaged"] and all("v1 cannot be read" in r for r in reasons.values())
        assert httpx.get(f"{live.url}/v1/tasks/damaged").json()["error"]["code"] == "task_quarantined"
        assert client.detect(photo_bytes, ["good"]).results[0].error is None
    assert manifest.is_file() and weights.is_file()


def _big_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.effect_noise((3000, 2000), 64).convert("RGB").save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def test_sigterm_finishes_in_flight_requests_then_exits_0(tmp_path: Path, artifacts):
    server, url = spawn_server(tmp_path)
    try:
        with SidecarClient(url) as client:
            for i in range(4):
                client.upload_task(f"t{i}", artifacts[f"side{i}"])
        image, answers = _big_jpeg(), []

        def ask() -> None:
            answers.append(httpx.post(f"{url}/v1/detect", params={"tasks": "t0,t1,t2,t3"}, content=image,
                                      headers={"content-type": "image/jpeg"}, timeout=60).status_code)  # fmt: skip

        threads = [threading.Thread(target=ask) for _ in range(6)]
        for t in threads:
            t.start()
        time.sleep(1.0)  # the requests are connected and being decoded and run (each takes seconds)
        server.send_signal(signal.SIGTERM)
        for t in threads:
            t.join()
        assert server.wait(60) == 0
        assert answers == [200] * 6  # every request in flight when SIGTERM came was answered
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/healthz")  # and the server is gone
    finally:
        if server.poll() is None:
            server.kill()
