"""The store behind an fsspec URL: the local store's guarantees on ``memory://`` (an object store with
no rename) and ``file://`` (a shared filesystem), read by other processes through their own mirrors,
and a whole server run on a URL."""

from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import fsspec
import pytest

from clients import SidecarClient, SidecarError
from server.exceptions import TaskQuarantined, UnknownTask, UnknownVersion
from server.main import create_app
from server.object_store import ObjectTaskStore
from tests.server.conftest import LiveServer, settings
from tuners.artifact import MANIFEST, WEIGHTS
from tuners.errors import ArtifactError


def _files(artifact: Path) -> tuple[bytes, bytes]:
    return (artifact / WEIGHTS).read_bytes(), (artifact / MANIFEST).read_bytes()


def _memory_url() -> str:
    return f"memory://sidecar-{uuid.uuid4().hex[:8]}"


def _objects(url: str) -> dict[str, str]:
    """Every object under ``url`` -> sha256 of its bytes."""
    fs, root = fsspec.core.url_to_fs(url)
    return {p[len(root) :]: hashlib.sha256(fs.cat_file(p)).hexdigest() for p in fs.find(root)}


def test_publish_read_rollback_prune_and_delete_on_an_object_store(tmp_path: Path, artifacts):
    url = _memory_url()
    store = ObjectTaskStore(url, tmp_path / "mirror", keep_versions=2)
    for name in ("side0", "side1", "side2"):
        store.publish("t", *_files(artifacts[name]), lambda _: None)
    assert store.versions("t") == [2, 3] and store.get("t").version == 3  # v1 pruned by retention
    layout = sorted(_objects(url))
    assert layout == ["/t/CURRENT", f"/t/v2/{MANIFEST}", f"/t/v2/{WEIGHTS}", f"/t/v3/{MANIFEST}", f"/t/v3/{WEIGHTS}"]
    old = store.get("t", 2)
    assert (old.path / WEIGHTS).read_bytes() == _files(artifacts["side1"])[0]  # downloaded into the mirror
    assert store.rollback("t", 2).version == 2 and store.get("t").version == 2
    rows = store.version_info("t")
    assert [(r["version"], r["current"], r["method"]) for r in rows] == [(2, True, "cst"), (3, False, "e3va")]
    assert all(r["sha256"] and r["published_at"] for r in rows)
    with pytest.raises(UnknownVersion):
        store.get("t", 1)
    store.delete("t")
    assert not store.is_task("t") and _objects(url) == {} and not (tmp_path / "mirror" / "t").exists()
    with pytest.raises(UnknownTask):
        store.get("t")


def test_a_pin_is_an_object_of_its_own_and_delete_takes_it_first(tmp_path: Path, artifacts, monkeypatch):
    url = _memory_url()
    store = ObjectTaskStore(url, tmp_path / "mirror")
    store.publish("t", *_files(artifacts["side0"]), lambda _: None)
    store.set_pinned("t", True)
    assert "/t/PINNED" in _objects(url) and ObjectTaskStore(url, tmp_path / "other").pinned() == ["t"]
    store.set_pinned("t", False)
    store.set_pinned("t", False)  # twice is once
    assert "/t/PINNED" not in _objects(url) and store.pinned() == []
    store.set_pinned("t", True)
    removed: list[str] = []
    rm = store.fs.rm
    monkeypatch.setattr(store.fs, "rm", lambda path, **kw: (removed.append(path.rsplit("/t/", 1)[-1]), rm(path, **kw)))
    store.delete("t")
    assert _objects(url) == {} and removed[:2] == ["PINNED", "CURRENT"]  # a crash after either: not pinned
    store.publish("t", *_files(artifacts["side1"]), lambda _: None)
    assert store.pinned() == [] and store.versions("t") == [1]
    with pytest.raises(UnknownTask):
        store.set_pinned("nobody", True)


def test_another_process_sees_each_new_version_and_never_a_stale_copy(tmp_path: Path, artifacts):
    url = _memory_url()
    writer = ObjectTaskStore(url, tmp_path / "writer")
    reader = ObjectTaskStore(url, tmp_path / "reader")  # a replica: its own mirror
    writer.publish("t", *_files(artifacts["side0"]), lambda _: None)
    assert reader.get("t").version == 1
    writer.delete("t")
    writer.publish("t", *_files(artifacts["side3"]), lambda _: None)  # v1 again, other weights
    reader.refresh("t")
    current = reader.get("t")
    assert current.version == 1 and (current.path / WEIGHTS).read_bytes() == _files(artifacts["side3"])[0]
    assert [t.task_id for t in reader.list()] == ["t"]


def test_a_refused_upload_writes_nothing_and_a_bad_current_quarantines(tmp_path: Path, artifacts):
    url = _memory_url()
    store = ObjectTaskStore(url, tmp_path / "mirror")

    def refuse(folder: Path) -> None:
        raise ArtifactError("a dry run failed")

    with pytest.raises(ArtifactError):
        store.publish("t", *_files(artifacts["side0"]), refuse)
    assert _objects(url) == {} and not store.is_task("t")
    store.publish("t", *_files(artifacts["side0"]), lambda _: None)
    fs, root = fsspec.core.url_to_fs(url)
    fs.pipe_file(f"{root}/t/CURRENT", b"v9")
    before = _objects(url)
    after = ObjectTaskStore(url, tmp_path / "other")
    after.recover()
    assert "t" in after.quarantined and _objects(url) == before  # kept, not served
    with pytest.raises(TaskQuarantined):
        after.get("t")
    assert after.rollback("t", 1).version == 1 and after.get("t").version == 1


CRASH = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from server.object_store import ObjectTaskStore
    url, mirror, op, step, weights, manifest = sys.argv[1:7]
    def die(name):
        if name == step:
            os.kill(os.getpid(), signal.SIGKILL)
    store = ObjectTaskStore(url, Path(mirror), keep_versions=2, on_step=die)
    if op == "publish":
        store.publish("t", Path(weights).read_bytes(), Path(manifest).read_bytes(), lambda _: None)
    elif op == "rollback":
        store.rollback("t", 1)
    else:
        store.delete("t")
    print("finished without reaching", step)
""")
STEPS = [("publish", s) for s in ("written", "validated", "renamed", "pointed", "pruned")]
STEPS += [("rollback", "pointed"), ("delete", "trashed")]


@pytest.mark.parametrize(("op", "step"), STEPS)
def test_sigkill_at_every_step_on_a_shared_filesystem(op: str, step: str, tmp_path: Path, artifacts):
    url, mirror = f"file://{tmp_path / 'shared'}", tmp_path / "mirror"
    store = ObjectTaskStore(url, mirror, keep_versions=2)
    for name in ("side0", "side1"):
        store.publish("t", *_files(artifacts[name]), lambda _: None)
    acknowledged = {k: v for k, v in _objects(url).items() if "/v" in k}
    new = artifacts["side2"]
    args = [sys.executable, "-c", CRASH, url, str(mirror), op, step, str(new / WEIGHTS), str(new / MANIFEST)]
    result = subprocess.run(args, capture_output=True, text=True, cwd=Path(__file__).parents[2])
    assert result.returncode == -signal.SIGKILL, result.stdout + result.stderr
    after = ObjectTaskStore(url, mirror, keep_versions=2)
    after.recover()
    assert not list(mirror.glob(".upload-*")) and not list(mirror.glob("*/.download-*"))
    if op == "delete":
        assert not after.is_task("t")  # gone for every reader from the first step
        return
    assert after.get("t").version in ((2, 3) if op == "publish" else (1, 2))  # the old state or the new
    now = _objects(url)
    for key, digest in acknowledged.items():
        if not (step == "pruned" and key.startswith("/t/v1/")):  # only retention removes v1
            assert now.get(key) == digest, key


def test_a_server_on_a_store_url_serves_uploads_and_keeps_them_over_a_restart(
    tmp_path: Path, backbone, artifacts, photo_bytes
):
    url = f"file://{tmp_path / 'shared'}"
    config = settings(tmp_path / "mirror", store_url=url)
    with LiveServer(create_app(config, backbone=backbone)) as live, SidecarClient(live.url) as client:
        client.upload_task("digits", artifacts["side1"])
        client.upload_task("digits", artifacts["side2"])
        assert client.detect(photo_bytes, ["digits"]).results[0].version == 2
    assert (tmp_path / "shared" / "digits" / "CURRENT").read_text() == "v2"
    config = settings(tmp_path / "fresh-mirror", store_url=url)  # another machine: nothing local yet
    with LiveServer(create_app(config, backbone=backbone)) as live, SidecarClient(live.url) as client:
        assert [v.version for v in client.versions("digits")] == [1, 2]
        assert client.detect(photo_bytes, "digits@1").results[0].method == "cst"
        client.delete_task("digits")
        with pytest.raises(SidecarError) as e:
            client.detect(photo_bytes, ["digits"])
        assert e.value.status == 404
    assert not (tmp_path / "shared" / "digits").exists()
