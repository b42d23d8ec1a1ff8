"""A server with many tasks: management reads run off the event loop, a listing reads each version's
manifest once, a deleted task's series leave ``/metrics``, and compiled graphs on disk keep to a budget."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import httpx
import pytest

import server.tasks
from clients import SidecarClient
from models.postprocess import PostprocessConfig
from server.main import create_app
from server.services import build_services, task_compiler
from tests.server.conftest import LiveServer, make_artifact, settings
from tuners.artifact import MANIFEST, WEIGHTS, load_artifact
from tuners.compiled import graph_key


def _files(artifact: Path) -> tuple[bytes, bytes]:
    return (artifact / WEIGHTS).read_bytes(), (artifact / MANIFEST).read_bytes()


def test_a_listing_reads_each_version_once_off_the_event_loop_and_sees_files_changed_since(
    tmp_path: Path, backbone, artifacts, monkeypatch
):
    """With 2,000 tasks (1,000 resident), a listing took about a second on the event loop, and every
    detect request waited for it (``bench.listing``): each task's manifest was read and parsed
    again, and its residency looked up over every cache entry. Now a listing runs on a worker
    thread and reads a version's manifest once; a manifest changed on disk since (damaged, here)
    is read again and quarantines its task, and a task deleted and published again under its id
    lists its new files."""
    root, reads, threads = tmp_path / "store", [], set()
    real = server.tasks.read_manifest

    def counted(folder: Path) -> dict:
        reads.append(folder.parent.name)
        threads.add(threading.get_ident())
        return real(folder)

    monkeypatch.setattr(server.tasks, "read_manifest", counted)

    async def run() -> None:
        services = build_services(settings(root), backbone)
        for name in ("a", "b"):
            await services.tasks.publish(name, *_files(artifacts["side1"]))
        assert reads == []  # an upload has its manifest at hand
        first = await services.tasks.list()
        assert sorted(reads) == ["a", "b"] and threading.get_ident() not in threads
        assert await services.tasks.list() == first and len(reads) == 2
        await services.tasks.delete("b")
        await services.tasks.publish("b", *_files(artifacts["side2"]))  # v1 again, in the same folder
        manifest = root / "a" / "v1" / MANIFEST
        manifest.write_bytes(manifest.read_bytes()[:40])
        listing = await services.tasks.list()
        assert [(t.id, t.version, t.method) for t in listing.tasks] == [("b", 1, "e3va")]
        assert [q.id for q in listing.quarantined] == ["a"] and manifest.is_file()
        services.tuner_cache.close()

    asyncio.run(run())


def test_metrics_render_off_the_event_loop(tmp_path: Path, backbone):
    """Each task that has served requests adds a latency histogram to ``/metrics``, whose rendering
    ran on the event loop (about 0.13 s for 1,000 such tasks, ``bench.listing``)."""

    async def run() -> None:
        services, rendered = build_services(settings(tmp_path / "store"), backbone), []
        real = services.metrics.render
        services.metrics.render = lambda: rendered.append(threading.get_ident()) or real()  # type: ignore[method-assign]
        text = await services.metrics_text()
        assert b"sidecar_images_served_total" in text and rendered and threading.get_ident() not in rendered
        services.tuner_cache.close()

    asyncio.run(run())


def test_a_deleted_task_leaves_metrics(tmp_path: Path, backbone, artifacts, photo_bytes):
    """Tasks published and deleted over time (one per customer, per experiment) grew ``/metrics`` for good."""
    app = create_app(settings(tmp_path / "store"), backbone=backbone)
    with LiveServer(app) as live, SidecarClient(live.url) as client:
        for task_id in ("kept", "gone"):
            client.upload_task(task_id, artifacts["side0"])
        client.detect(photo_bytes, ["kept", "gone"])
        assert 'task="gone"' in httpx.get(f"{live.url}/metrics").text
        client.delete_task("gone")
        metrics = httpx.get(f"{live.url}/metrics").text
        assert 'task="gone"' not in metrics and 'sidecar_request_seconds_count{task="kept"} 1.0' in metrics


@pytest.mark.parametrize("histograms, series", [(True, 16), (False, 3)])
def test_task_latency_series_per_task(tmp_path: Path, backbone, artifacts, photo_bytes, histograms: bool, series: int):
    """A latency histogram per task is 16 series for each task that served requests, too many for a
    server of thousands of tasks: ``task_latency_histograms`` off keeps a count and a sum per task,
    and the histogram over every request stays."""

    async def run() -> str:
        services = build_services(settings(tmp_path / "store", task_latency_histograms=histograms), backbone)
        services.start()
        try:
            await services.tasks.publish("t", *_files(artifacts["side0"]))
            for _ in range(2):
                await services.engine.detect(photo_bytes, ["t"], PostprocessConfig())
            return services.metrics.render().decode()
        finally:
            await services.stop()

    text = asyncio.run(run())
    assert sum('task="t"' in line for line in text.splitlines() if not line.startswith("#")) == series
    assert 'sidecar_request_seconds_count{task="t"} 2.0' in text and "sidecar_detect_seconds_count 2.0" in text
    assert ('sidecar_request_seconds_bucket{le="0.005",task="t"}' in text) is histograms
    assert 'sidecar_detect_seconds_bucket{le="0.005"}' in text


def test_compiled_graphs_on_disk_keep_to_their_budget(tmp_path: Path, backbone):
    """Graphs are named by their content, so every version ever compiled left one in ``cache_dir`` for
    good. Now, past ``compiled_cache_bytes``, the least recently compiled or reloaded go."""
    versions = [load_artifact(make_artifact(backbone, tmp_path / "art", "cst", seed), backbone) for seed in (1, 2, 3)]
    folder = tmp_path / "onnx"
    paths = [folder / "tasks" / f"cst-{graph_key(manifest, backbone)}.onnx" for _, manifest in versions]
    task_compiler(backbone, folder, "cpu", 1, keep_bytes=1 << 40)(*versions[0])
    budget = int(2.5 * paths[0].stat().st_size)  # the three graphs are the same size: two fit
    compile_task = task_compiler(backbone, folder, "cpu", 1, keep_bytes=budget)
    compile_task(*versions[1])
    compile_task(*versions[0])  # reloaded: now more recently used than the second
    compiled = compile_task(*versions[2])
    assert [p.is_file() for p in paths] == [True, False, True] and compiled.provider == "CPUExecutionProvider"
