"""Requests and management calls racing each other: a request that goes away, a version removed
while it loads or while it is described. Each case once ended in a wrong status or a wedged task."""

from __future__ import annotations

import asyncio
import shutil
import threading
from pathlib import Path

import pytest
import torch

from models.postprocess import PostprocessConfig
from server.exceptions import UnknownTask
from server.services import build_services
from tests.server.conftest import copies_cache, lease_counts, make_artifact, settings
from tuners.artifact import MANIFEST, WEIGHTS, load_artifact
from tuners.compiled import CompiledTask


def _files(artifact: Path) -> tuple[bytes, bytes]:
    return (artifact / WEIGHTS).read_bytes(), (artifact / MANIFEST).read_bytes()


def test_a_cancelled_request_leaves_the_load_it_waited_for_to_others(tmp_path: Path, backbone, artifacts, monkeypatch):
    """A request cancelled while its task's load is queued (Ray Serve cancels the requests of clients
    that go away) must not cancel that load for everyone: before, every later request for the task
    raised ``CancelledError``."""
    cache = copies_cache(tmp_path, backbone, artifacts["side1"], tasks=2, room=2, wait_s=0)
    gate, read = threading.Event(), cache._read
    monkeypatch.setattr(cache, "_read", lambda v, k: (gate.wait(30) if v.task_id == "t0" else None, read(v, k))[1])

    async def run() -> None:
        first = asyncio.create_task(cache.acquire("t0"))  # holds the loader
        await asyncio.sleep(0.05)
        doomed = asyncio.create_task(cache.acquire("t1"))  # its load waits in the loader's queue
        await asyncio.sleep(0.05)
        doomed.cancel()
        with pytest.raises(asyncio.CancelledError):
            await doomed
        gate.set()
        cache.release(await first)
        lease = await asyncio.wait_for(cache.acquire("t1"), 30)
        assert lease.entry.key == ("t1", 1)
        cache.release(lease)

    asyncio.run(run())
    cache.close()


def test_a_cancelled_request_keeps_its_tasks_until_its_batch_is_done(
    tmp_path: Path, backbone, artifacts, photo_bytes, monkeypatch
):
    """Released early, a model its batch still runs could be evicted and refilled with another task's
    weights (or moved off the GPU) under the batch."""

    async def run() -> None:
        services = build_services(settings(tmp_path / "store"), backbone)
        services.start()
        try:
            await services.tasks.publish("a", (artifacts["side1"] / WEIGHTS).read_bytes(),
                                         (artifacts["side1"] / MANIFEST).read_bytes())  # fmt: skip
            entered, leave, finish = threading.Event(), threading.Event(), services.executor.finish
            monkeypatch.setattr(services.executor, "finish", lambda p: (entered.set(), leave.wait(30), finish(p))[2])
            request = asyncio.create_task(services.engine.detect(photo_bytes, "a", PostprocessConfig()))
            assert await asyncio.to_thread(entered.wait, 30)
            request.cancel()
            with pytest.raises(asyncio.CancelledError):
                await request
            assert lease_counts(services.tuner_cache) == {"a": 1}  # the running batch still holds it
            leave.set()
            for _ in range(300):
                if lease_counts(services.tuner_cache) == {"a": 0}:
                    break
                await asyncio.sleep(0.01)
            assert lease_counts(services.tuner_cache) == {"a": 0}
            monkeypatch.setattr(services.executor, "finish", finish)
            answer = await services.engine.detect(photo_bytes, "a", PostprocessConfig())
            assert answer.results[0].task == "a" and answer.results[0].error is None
        finally:
            await services.stop()

    asyncio.run(run())


def test_a_version_removed_while_it_loads_is_looked_up_again(tmp_path: Path, backbone, artifacts, monkeypatch):
    """A rollback's version pruned by the next upload, or a task deleted, while a request loads it: the
    request gets the new current version, or 404 (before: 422 "tuner.json is missing" for a good request)."""
    cache = copies_cache(tmp_path, backbone, artifacts["side1"], tasks=2, room=2, wait_s=0)
    store, read, files = cache.store, cache._read, [(artifacts["side2"] / n).read_bytes() for n in (WEIGHTS, MANIFEST)]

    def racing_read(version, key):  # noqa: ANN001, ANN202
        if version.task_id == "t0" and version.version == 1:
            store.publish("t0", *files, lambda _: None)
            shutil.rmtree(version.path)  # what _prune does to a version that is no longer current
        if version.task_id == "t1":
            store.delete("t1")
        return read(version, key)

    monkeypatch.setattr(cache, "_read", racing_read)

    async def run() -> None:
        lease = await cache.acquire("t0")
        assert lease.entry.key == ("t0", 2) and lease.entry.manifest["method"] == "e3va"  # side2's method
        cache.release(lease)
        with pytest.raises(UnknownTask):
            await cache.acquire("t1")

    asyncio.run(run())
    cache.close()


def test_an_upload_answers_with_what_it_published_when_a_delete_follows_at_once(tmp_path: Path, backbone, artifacts):
    """Before, the PUT's answer was read back from the folder a concurrent DELETE had just removed:
    422 "tuner.json is missing", or 404 or 500, for an upload that had succeeded."""

    async def run() -> None:
        services = build_services(settings(tmp_path / "store"), backbone)
        tasks, weights, config = services.tasks, *_files(artifacts["side1"])
        admit = services.tuner_cache.admit

        def admit_then_deleted(*args: object) -> None:
            admit(*args)
            services.store.delete("a")  # another client's DELETE, between the publish and the answer

        services.tuner_cache.admit = admit_then_deleted  # type: ignore[method-assign]
        info = await tasks.publish("a", weights, config)
        assert (info.id, info.version, info.method, info.bytes) == ("a", 1, "cst", len(weights) + len(config))
        assert info.versions == []  # gone since
        services.tuner_cache.close()

    asyncio.run(run())


def test_describing_a_task_deleted_meanwhile_is_404_and_a_listing_leaves_it_out(tmp_path: Path, backbone, artifacts):
    async def run() -> None:
        services = build_services(settings(tmp_path / "store"), backbone)
        for name in ("a", "b"):
            await services.tasks.publish(name, *_files(artifacts["side1"]))
        found, listing = services.store.get("b"), services.store.list
        services.store.delete("b")
        with pytest.raises(UnknownTask, match="deleted or pruned"):
            services.tasks.info(found)  # what GET /v1/tasks/b does once it has looked b up
        services.store.list = lambda: listing() + [found]  # type: ignore[method-assign]  # listed, then deleted
        assert [t.id for t in (await services.tasks.list()).tasks] == ["a"]
        services.tuner_cache.close()

    asyncio.run(run())


def test_a_compiled_graph_on_disk_from_other_weights_is_exported_again(tmp_path: Path, backbone):
    """Compiled graphs are kept on disk by name; one written from other weights (a compile that read a
    model while the cache refilled it) must not be served under that name."""
    first, second = (load_artifact(make_artifact(backbone, tmp_path, "cst", seed), backbone)[0] for seed in (1, 2))
    path = tmp_path / "task.onnx"
    CompiledTask(first, backbone, path, "cpu")
    compiled = CompiledTask(second, backbone, path, "cpu")  # the name is taken by the first task's graph
    taps = backbone(torch.rand(1, 3, 64, 64), compiled.taps)
    with torch.no_grad():
        want = second.head_outputs(taps, None)
    got = compiled(taps)
    for k in compiled.outputs:
        torch.testing.assert_close(got.tensors[k], want.tensors[k], rtol=1e-3, atol=1e-3)


def test_the_compiler_gets_a_snapshot_of_the_model(tmp_path: Path, backbone, artifacts):
    """Once evicted, an entry's model object is refilled with another task's weights by the loader,
    possibly while its compile runs: the compile reads a copy taken while the entry was resident."""
    cache = copies_cache(tmp_path, backbone, artifacts["side1"], tasks=1, room=2, wait_s=0)
    seen = []
    cache.compiling.compiler = lambda model, manifest: seen.append(model)  # type: ignore[assignment]

    async def run() -> None:
        lease = await cache.acquire("t0")
        cache.compiling.compile(lease.entry, cache.snapshot)
        cache.compiling.drain()  # the compile thread is done with it
        assert len(seen) == 1 and seen[0] is not lease.model
        assert all(torch.equal(a, b) for a, b in zip(seen[0].state_dict().values(), lease.model.state_dict().values()))
        cache.release(lease)

    asyncio.run(run())
    cache.close()
