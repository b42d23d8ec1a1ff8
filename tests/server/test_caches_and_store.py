"""Tuner cache budgets, pins and frees; store atomicity and crash safety; engine batch invariance."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import weakref
from pathlib import Path

import pytest
import torch

from models.postprocess import PostprocessConfig
from models.runtime import build_runtime
from server.exceptions import Overloaded, SidecarError, TaskQuarantined, UnknownTask
from server.executor import Executor, WorkItem
from server.imaging import decode_image
from server.metrics import Metrics
from server.store import TaskStore
from server.tuner_cache import TunerCache, model_bytes
from tests.conftest import on_device
from tuners.artifact import MANIFEST, WEIGHTS, load_artifact


def _publish(store: TaskStore, task_id: str, artifact: Path) -> None:
    store.publish(task_id, (artifact / WEIGHTS).read_bytes(), (artifact / MANIFEST).read_bytes(), lambda _: None)


def _cache(store: TaskStore, backbone, budget: int, host: int = 0) -> TunerCache:  # noqa: ANN001
    """A cache that answers at once when in-use tasks leave no room (``tests/server/test_admission.py`` waits)."""
    return TunerCache(store, backbone, torch.device("cpu"), {"device": budget, "host": host}, Metrics(), wait_s=0)


def test_budget_holds_with_20_tasks_cycled_and_pins_stay(tmp_path: Path, backbone, artifacts):
    store = TaskStore(tmp_path)
    for i in range(20):
        _publish(store, f"t{i}", artifacts["side1"])  # cst: every task the same size
    size = model_bytes(load_artifact(artifacts["side1"], backbone)[0])
    cache = _cache(store, backbone, budget=3 * size, host=size)

    async def cycle() -> None:
        await cache.pin("t0")
        for round_ in range(3):
            for i in range(20):
                lease = await cache.acquire(f"t{i}")
                assert lease.model is not None
                cache.release(lease)
                assert cache.resident_bytes("device") <= 3 * size and cache.resident_bytes("host") <= size
                assert cache.residency("t0") == "device", (round_, i)

    asyncio.run(cycle())
    cache.close()


def test_evicted_models_are_freed_over_many_cycles(tmp_path: Path, backbone, artifacts):
    store = TaskStore(tmp_path)
    for i in range(4):
        _publish(store, f"t{i}", artifacts["side0"])
    size = model_bytes(load_artifact(artifacts["side0"], backbone)[0])
    cache = _cache(store, backbone, budget=size)
    refs = []

    async def cycle() -> None:
        for i in range(40):
            lease = await cache.acquire(f"t{i % 4}")
            refs.append(weakref.ref(lease.model))
            cache.release(lease)

    asyncio.run(cycle())
    gc.collect()
    alive = {id(m) for m in (r() for r in refs) if m is not None}
    assert len(alive) == 1  # only the resident model object is alive (evicted ones are reused or freed)
    cache.close()


def test_host_tier_parks_evicted_models_and_returns_them_unchanged(tmp_path: Path, backbone, artifacts, device):
    """Evicted from the device tier, a model waits in host memory (page-locked on CUDA, so it comes
    back with a non-blocking copy), and it returns as the same object with the same tensors."""
    backbone, store = on_device(backbone, device), TaskStore(tmp_path)
    for task_id in ("a", "b"):
        _publish(store, task_id, artifacts["side1"])
    size = model_bytes(load_artifact(artifacts["side1"], backbone)[0])
    cache = TunerCache(store, backbone, torch.device(device), {"device": size, "host": size}, Metrics())

    async def run() -> None:
        lease = await cache.acquire("a")
        model, weights = lease.model, {k: v.clone() for k, v in lease.model.state_dict().items()}
        cache.release(lease)
        cache.release(await cache.acquire("b"))  # a moves to the host tier
        assert cache.residency("a") == "host" and cache.states() == {"a": ("host", False), "b": ("device", False)}
        parked = [*model.parameters(), *model.buffers()]
        assert all(t.device.type == "cpu" and t.is_pinned() == (device == "cuda") for t in parked)
        lease = await cache.acquire("a")
        assert lease.model is model and cache.residency("a") == "device" and cache.residency("b") == "host"
        for k, v in model.state_dict().items():
            assert v.device.type == device and torch.equal(v, weights[k]), k
        cache.release(lease)

    asyncio.run(run())
    cache.close()


def test_in_use_models_are_never_evicted(tmp_path: Path, backbone, artifacts):
    store = TaskStore(tmp_path)
    for i in range(2):
        _publish(store, f"t{i}", artifacts["side0"])
    cache = _cache(store, backbone, budget=model_bytes(load_artifact(artifacts["side0"], backbone)[0]))

    async def run() -> None:
        held = await cache.acquire("t0")
        with pytest.raises(SidecarError) as e:
            await cache.acquire("t1")
        assert isinstance(e.value, Overloaded)
        assert cache.residency("t0") == "device"
        cache.release(held)
        cache.release(await cache.acquire("t1"))

    asyncio.run(run())
    cache.close()


@pytest.mark.parametrize("damage", ["altered", "nan_with_its_sha256"])
def test_a_first_load_into_a_spare_model_is_verified_in_full(tmp_path: Path, backbone, artifacts, damage, monkeypatch):
    """After a start, a version's first load checks its sha256 and looks for NaN or Inf even when it
    refills another task's model instead of building one; the task is quarantined (its files were
    damaged on disk), the other still loads."""
    import server.task_reader as module

    loads: list[tuple[str, bool]] = []
    real = module.load_artifact
    monkeypatch.setattr(
        module, "load_artifact", lambda f, b, **k: loads.append((f.parent.name, "into" in k)) or real(f, b, **k)
    )
    store = TaskStore(tmp_path)
    _publish(store, "good", artifacts["side1"])
    _publish(store, "bad", artifacts["side1"])
    folder = store.get("bad").path
    weights = bytearray((folder / WEIGHTS).read_bytes())
    if damage == "altered":
        weights[-4:] = b"\x00\x00\x80\x7f"  # the last float becomes +Inf; the sha256 no longer matches
    else:
        weights[-4:] = b"\x00\x00\xc0\x7f"  # NaN, with the manifest's sha256 made to match
        manifest = json.loads((folder / MANIFEST).read_text())
        manifest["weights_sha256"] = hashlib.sha256(weights).hexdigest()
        (folder / MANIFEST).write_text(json.dumps(manifest))
    (folder / WEIGHTS).write_bytes(bytes(weights))
    size = model_bytes(load_artifact(artifacts["side1"], backbone)[0])
    cache = _cache(store, backbone, budget=size)

    async def run() -> None:
        cache.release(await cache.acquire("good"))  # built; then the tier is full, so it is the spare
        with pytest.raises(TaskQuarantined, match="sha256 does not match" if damage == "altered" else "NaN or Inf"):
            await cache.acquire("bad")
        assert "bad" in store.quarantined
        assert loads[:2] == [("good", False), ("bad", True)]  # bad's first load read into good's model
        lease = await cache.acquire("good")
        fresh = load_artifact(artifacts["side1"], backbone)[0].state_dict()
        assert all(torch.equal(v, fresh[k]) for k, v in lease.model.state_dict().items())
        cache.release(lease)

    asyncio.run(run())
    cache.close()


def test_cold_load_does_not_block_resident_tasks(tmp_path: Path, backbone, artifacts, monkeypatch):
    store = TaskStore(tmp_path)
    _publish(store, "hot", artifacts["side0"])
    _publish(store, "cold", artifacts["side1"])
    cache = _cache(store, backbone, budget=1 << 30)
    import server.task_reader as module

    slow = module.load_artifact

    def slow_load(folder, bb, **kwargs):  # noqa: ANN001, ANN003, ANN202
        if "cold" in str(folder):
            time.sleep(1.0)
        return slow(folder, bb, **kwargs)

    monkeypatch.setattr(module, "load_artifact", slow_load)

    async def run() -> float:
        cache.release(await cache.acquire("hot"))
        cold = asyncio.create_task(cache.acquire("cold"))
        await asyncio.sleep(0.05)
        start = time.perf_counter()
        cache.release(await cache.acquire("hot"))
        took = time.perf_counter() - start
        cache.release(await cold)
        return took

    assert asyncio.run(run()) < 0.5
    cache.close()


def test_failed_upload_changes_nothing_and_concurrent_uploads_serialise(tmp_path: Path, artifacts):
    store = TaskStore(tmp_path)
    _publish(store, "t", artifacts["side0"])

    def refuse(_: Path) -> None:
        raise ValueError("bad")

    with pytest.raises(ValueError):
        store.publish("t", b"x", b"{}", refuse)
    assert store.get("t").version == 1 and store.versions("t") == [1]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        versions = list(pool.map(lambda _: _publish(store, "t", artifacts["side0"]) or 0, range(8)))
    assert len(versions) == 8 and store.versions("t") == [5, 6, 7, 8, 9] and store.get("t").version == 9  # keeps 5
    with pytest.raises(SidecarError):
        store.get("Bad!")


def test_sigkill_during_publish_leaves_no_partial_task(tmp_path: Path, artifacts):
    """A process killed while an upload is being written and validated restarts with the old state."""
    root = tmp_path / "store"
    _publish(TaskStore(root), "t", artifacts["side0"])
    script = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from server.store import TaskStore
        store = TaskStore(Path({str(root)!r}))
        def validate(folder):
            print("validating", flush=True)
            time.sleep(60)
        store.publish("t", b"w" * 1000, b"{{}}", validate)
        store.publish("new", b"w", b"{{}}", validate)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=os.getcwd())
    assert proc.stdout is not None and proc.stdout.readline().strip() == "validating"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert any(p.name.startswith(".upload-") for p in root.iterdir())  # the kill left a temp folder
    store = TaskStore(root)
    store.recover()
    assert [t.task_id for t in store.list()] == ["t"] and store.get("t").version == 1
    assert not any(p.name.startswith(".") for p in root.iterdir())


def test_task_results_do_not_depend_on_the_batch(backbone, artifacts, photos, device):
    """Alone, in a fan-out, or in a mixed batch with other images and tasks: the same detections.

    Within 1e-4: scores (in [0, 1]) absolutely, boxes relatively. Boxes are in original pixels (up to
    640 here), where a float32 ulp is 6e-5 px, and CPU kernels sum in another order for another
    batch size; measured on the CPU, the worst box differs by 4e-7 of the image side.
    """
    backbone, metrics = on_device(backbone, device), Metrics()
    engine = Executor(backbone, build_runtime(backbone, "torch", device), metrics)
    models = {t: load_artifact(artifacts[t], backbone)[0].to(device) for t in ("side0", "side4", "inline0", "inline1")}
    images = [decode_image(p, 1 << 24, 1 << 26) for p in photos]
    post = PostprocessConfig()
    alone = {
        (i, t): engine.run([WorkItem(img, str(i), {t: m}, post)]).detections[0][t]
        for i, img in enumerate(images)
        for t, m in models.items()
    }
    mixed = engine.run([WorkItem(img, str(i), dict(models), post) for i, img in enumerate(images)])
    assert mixed.backbone_passes == len(images)
    for i in range(len(images)):
        for t in models:
            a, b = alone[(i, t)], mixed.detections[i][t]
            assert len(a) == len(b) and len(a) > 0
            torch.testing.assert_close(a.boxes, b.boxes, atol=1e-4, rtol=1e-4)
            assert torch.equal(a.labels, b.labels)
            torch.testing.assert_close(a.scores, b.scores, atol=1e-4, rtol=0)


def test_delete_while_in_use_lets_the_request_finish(tmp_path: Path, backbone, artifacts):
    store = TaskStore(tmp_path)
    _publish(store, "t", artifacts["side0"])
    cache = _cache(store, backbone, budget=1 << 30)

    async def run() -> None:
        lease = await cache.acquire("t")
        store.delete("t")
        cache.forget("t")
        assert cache.residency("t") == "device"  # still held by the request
        with torch.no_grad():
            lease.model(backbone, torch.zeros(1, 3, 64, 64))
        cache.release(lease)
        assert cache.residency("t") is None
        with pytest.raises(SidecarError) as e:
            await cache.acquire("t")
        assert isinstance(e.value, UnknownTask)

    asyncio.run(run())
    cache.close()


def test_settings_come_from_env_and_flags(monkeypatch):
    from server.config import Settings
    from server.main import setting_flags

    monkeypatch.setenv("SIDECAR_MAX_QUEUE", "3")
    monkeypatch.setenv("SIDECAR_ADMIN_KEY", "s3cr3t-admin")
    settings = Settings()
    assert settings.max_queue == 3 and settings.admin_key is not None and "s3cr3t" not in repr(settings)
    flags, verbose = setting_flags(["--max-queue", "5", "--runtime", "onnx"])
    assert not verbose
    assert Settings(**flags).max_queue == 5 and Settings(**flags).runtime == "onnx"


def test_the_pixel_limit_cannot_be_set_above_what_pillow_decodes():
    from PIL import Image
    from pydantic import ValidationError

    from server.config import Settings

    assert Settings(max_image_pixels=Image.MAX_IMAGE_PIXELS).max_image_pixels == Image.MAX_IMAGE_PIXELS
    with pytest.raises(ValidationError, match="max_image_pixels"):
        Settings(max_image_pixels=Image.MAX_IMAGE_PIXELS + 1)


def test_feature_cache_never_exceeds_its_budget():
    from server.feature_cache import FeatureCache

    one = {"c3": torch.zeros(1, 8, 16, 16), "c4": torch.zeros(1, 16, 8, 8)}  # 12 KiB
    cache = FeatureCache(budget_bytes=30_000)
    for i in range(10):
        cache.put(str(i), one)
        assert cache.bytes <= 30_000
    assert cache.get("9", ["c3", "c4"]) is not None and cache.get("0", ["c3"]) is None
    assert cache.get("9", ["c5"]) is None  # a tap it does not hold is a miss
    cache.put("big", {"c3": torch.zeros(1, 64, 64, 64)})
    assert cache.get("big", ["c3"]) is None and cache.bytes <= 30_000
    batch = torch.zeros(8, 8, 16, 16)  # a row of a batch's taps is stored alone, not the batch behind it
    cache.put("row", {"c3": batch[3:4]})
    assert cache.get("row", ["c3"])["c3"].untyped_storage().nbytes() == 8 * 16 * 16 * 4
