"""The store never loses a version: kept versions, rollback, quarantine instead of deletion, stray
files ignored, crashes at every step of every write survived, a full disk refused cleanly."""

from __future__ import annotations

import errno
import hashlib
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import pytest

from clients import SidecarClient, SidecarError
from server.exceptions import InsufficientStorage, TaskQuarantined, UnknownTask
from server.main import create_app
from server.store import TaskStore
from tests.server.conftest import LiveServer, settings
from tuners.artifact import MANIFEST, WEIGHTS


def _files(artifact: Path) -> tuple[bytes, bytes]:
    return (artifact / WEIGHTS).read_bytes(), (artifact / MANIFEST).read_bytes()


def _snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` -> sha256 of its bytes."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def test_a_restart_keeps_every_version_and_rollback_brings_one_back(tmp_path: Path, backbone, artifacts, photo_bytes):
    store = tmp_path / "store"
    with LiveServer(create_app(settings(store), backbone=backbone)) as live, SidecarClient(live.url) as client:
        client.upload_task("digits", artifacts["side1"])
        client.upload_task("digits", artifacts["side2"])
    with LiveServer(create_app(settings(store), backbone=backbone)) as live, SidecarClient(live.url) as client:
        versions = client.versions("digits")
        assert [(v.version, v.current, v.method) for v in versions] == [(1, False, "cst"), (2, True, "e3va")]
        assert all(v.sha256 and v.published_at for v in versions)
        pinned_old = client.detect(photo_bytes, "digits@1").results[0]
        assert (pinned_old.version, pinned_old.method) == (1, "cst")
        assert client.detect(photo_bytes, ["digits"]).results[0].version == 2
        assert client.rollback("digits", 1).version == 1
        assert client.detect(photo_bytes, ["digits"]).results[0].method == "cst"
        with pytest.raises(SidecarError) as e:
            client.rollback("digits", 7)
        assert (e.value.status, e.value.code) == (404, "unknown_version")
        with pytest.raises(SidecarError, match="unknown_version"):
            client.detect(photo_bytes, ["digits@7"])
    assert TaskStore(store).get("digits").version == 1  # the rollback is on disk


def test_pins_survive_a_restart_and_a_pinned_task_that_cannot_load_does_not_stop_it(
    tmp_path: Path, backbone, artifacts, caplog
):
    store = tmp_path / "store"
    with LiveServer(create_app(settings(store), backbone=backbone)) as live, SidecarClient(live.url) as client:
        for name in ("kept", "dropped", "broken", "gone"):
            client.upload_task(name, artifacts["side1"])
            assert client.pin(name).pinned
        assert not client.pin("dropped", pinned=False).pinned
        client.delete_task("gone")
        client.upload_task("gone", artifacts["side2"])  # the same id again: a new task, not pinned
    assert TaskStore(store).pinned() == ["broken", "kept"]
    (store / "broken" / "CURRENT").write_text("v9")  # quarantined at the next start
    with LiveServer(create_app(settings(store), backbone=backbone)) as live, SidecarClient(live.url) as client:
        kept = client.get_task("kept")
        assert kept.pinned and kept.residency == "device"  # loaded before the server said it was ready
        assert [client.get_task(t).pinned for t in ("dropped", "gone")] == [False, False]
        assert [q["id"] for q in httpx.get(f"{live.url}/v1/tasks").json()["quarantined"]] == ["broken"]
    assert any("broken is pinned in the store but was not loaded" in r.getMessage() for r in caplog.records)
    assert TaskStore(store).pinned() == ["broken", "kept"]  # a pin is only dropped when a user asks


def test_a_pin_is_refused_for_an_unknown_task_and_leaves_no_marker(tmp_path: Path, artifacts):
    store = TaskStore(tmp_path)
    with pytest.raises(UnknownTask):
        store.set_pinned("nobody", True)
    store.publish("t", *_files(artifacts["side0"]), lambda _: None)
    store.set_pinned("t", True)
    store.set_pinned("t", True)  # twice is once
    assert store.pinned() == ["t"] and store.versions("t") == [1] and store.recover() == []
    store.set_pinned("t", False)
    assert store.pinned() == [] and sorted(p.name for p in (tmp_path / "t").iterdir()) == ["CURRENT", "v1"]


def test_versions_beyond_the_retention_are_pruned_at_publish_only(tmp_path: Path, artifacts):
    store = TaskStore(tmp_path, keep_versions=2)
    for _ in range(4):
        store.publish("t", *_files(artifacts["side0"]), lambda _: None)
    assert store.versions("t") == [3, 4]
    store.rollback("t", 3)
    before = _snapshot(tmp_path)
    TaskStore(tmp_path, keep_versions=1).recover()  # starting never prunes, whatever the setting
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("damage", ["missing_version", "garbage_pointer", "no_pointer", "incomplete_version"])
def test_a_bad_current_quarantines_the_task_and_deletes_nothing(
    damage: str, tmp_path: Path, backbone, artifacts, photo_bytes
):
    root = tmp_path / "store"
    seed = TaskStore(root)
    seed.publish("t5", *_files(artifacts["side0"]), lambda _: None)
    seed.publish("ok", *_files(artifacts["side1"]), lambda _: None)
    if damage == "missing_version":
        (root / "t5" / "CURRENT").write_text("v9")
    elif damage == "garbage_pointer":
        (root / "t5" / "CURRENT").write_bytes(b"\xff\xfe\x00garbage")
    elif damage == "no_pointer":
        (root / "t5" / "CURRENT").unlink()
    else:
        (root / "t5" / "v1" / WEIGHTS).unlink()
    before = _snapshot(root)
    with LiveServer(create_app(settings(root), backbone=backbone)) as live, SidecarClient(live.url) as client:
        listing = httpx.get(f"{live.url}/v1/tasks").json()
        assert [t["id"] for t in listing["tasks"]] == ["ok"]
        assert [q["id"] for q in listing["quarantined"]] == ["t5"] and listing["quarantined"][0]["reason"]
        assert "t5" in httpx.get(f"{live.url}/readyz").json()["details"]["quarantined"]
        with pytest.raises(SidecarError) as e:
            client.detect(photo_bytes, ["t5"])
        assert (e.value.status, e.value.code) == (409, "task_quarantined")
        assert client.detect(photo_bytes, ["ok"]).results[0].task == "ok"  # the rest serves
        assert _snapshot(root) == before  # nothing deleted, nothing rewritten
        if damage != "incomplete_version":  # v1 is complete: the operator can roll back to it
            assert client.rollback("t5", 1).version == 1
            assert client.detect(photo_bytes, ["t5"]).results[0].version == 1
            assert httpx.get(f"{live.url}/v1/tasks").json()["quarantined"] == []


def test_stray_files_in_the_store_do_not_stop_the_start(tmp_path: Path, backbone, artifacts, caplog):
    root = tmp_path / "store"
    TaskStore(root).publish("t", *_files(artifacts["side0"]), lambda _: None)
    (root / "notes.txt").write_text("the operator's notes")
    (root / "notes").write_text("a file named as a task could be")
    (root / "Not A Task").mkdir()
    with LiveServer(create_app(settings(root), backbone=backbone)) as live, SidecarClient(live.url) as client:
        assert [t.id for t in client.list_tasks()] == ["t"]
        with pytest.raises(SidecarError) as e:
            client.get_task("notes")
        assert (e.value.status, e.value.code) == (404, "unknown_task")
    assert (root / "notes.txt").read_text() == "the operator's notes" and (root / "Not A Task").is_dir()
    assert any("notes.txt" in r.getMessage() for r in caplog.records)


CRASH = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from server.store import TaskStore
    root, op, step, weights, manifest = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
    def die(name):
        if name == step:
            os.kill(os.getpid(), signal.SIGKILL)
    store = TaskStore(root, keep_versions=2, on_step=die)
    if op == "publish":
        store.publish("t", Path(weights).read_bytes(), Path(manifest).read_bytes(), lambda _: None)
    elif op == "rollback":
        store.rollback("t", 2)
    else:
        store.delete("t")
    print("finished without reaching", step)
""")

STEPS = [("publish", s) for s in ("written", "validated", "renamed", "pointed", "pruned")]
STEPS += [("rollback", "pointed"), ("delete", "trashed")]


@pytest.mark.parametrize(("op", "step"), STEPS)
def test_sigkill_at_every_step_leaves_the_old_or_the_new_state(op: str, step: str, tmp_path: Path, artifacts):
    root = tmp_path / "store"
    store = TaskStore(root, keep_versions=2)
    for folder in ("side0", "side1"):
        store.publish("t", *_files(artifacts[folder]), lambda _: None)  # v1, v2; v2 current
    acknowledged = {v: _snapshot(root / "t" / f"v{v}") for v in store.versions("t")}
    new = artifacts["side2"]
    args = [sys.executable, "-c", CRASH, str(root), op, step, str(new / WEIGHTS), str(new / MANIFEST)]
    result = subprocess.run(args, capture_output=True, text=True, cwd=Path(__file__).parents[2])
    assert result.returncode == -signal.SIGKILL, result.stdout + result.stderr
    after = TaskStore(root, keep_versions=2)
    after.recover()
    assert not [p.name for p in root.iterdir() if p.name.startswith(".")]  # leftovers removed
    if op == "delete":
        assert not (root / "t").exists() or after.get("t").version == 2  # gone, as asked, or untouched
        return
    current = after.get("t").version
    assert current in ((2, 3) if op == "publish" else (1, 2))  # the old state or the new one
    kept = set(after.versions("t"))
    pruned_ok = {1} if step == "pruned" else set()  # only the deliberate retention step removes v1
    for version, files in acknowledged.items():
        if version not in pruned_ok:
            assert version in kept and _snapshot(root / "t" / f"v{version}") == files


def test_a_full_disk_during_upload_is_507_and_changes_nothing(tmp_path: Path, backbone, artifacts, monkeypatch):
    import server.store as module

    root = tmp_path / "store"
    with LiveServer(create_app(settings(root), backbone=backbone)) as live, SidecarClient(live.url) as client:
        client.upload_task("t", artifacts["side0"])
        before = _snapshot(root)

        def full(path: Path, data: bytes) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(module, "write_synced", full)
        with pytest.raises(SidecarError) as e:
            client.upload_task("t", artifacts["side1"])
        assert (e.value.status, e.value.code) == (507, "insufficient_storage")
        assert _snapshot(root) == before and client.get_task("t").version == 1
    with pytest.raises(InsufficientStorage):
        TaskStore(tmp_path / "other").publish("t", *_files(artifacts["side0"]), lambda _: None)


def test_a_quarantined_task_is_never_served_but_an_explicit_version_is(tmp_path: Path, artifacts):
    store = TaskStore(tmp_path)
    store.publish("t", *_files(artifacts["side0"]), lambda _: None)
    store.quarantine("t", "failed 3 times")
    with pytest.raises(TaskQuarantined):
        store.get("t")
    assert store.get("t", 1).version == 1 and store.list() == []


def test_make_serve_finds_its_demo_tasks_and_trains_nothing(tmp_path: Path, artifacts, monkeypatch):
    import server.demo as demo

    store = TaskStore(tmp_path / "store")
    for task in demo.DEMO_TASKS:
        store.publish(task, *_files(artifacts["side0"]), lambda _: None)
    monkeypatch.setattr(demo, "Trainer", lambda *a, **k: pytest.fail("a demo task present in the store was retrained"))
    assert demo.ensure_demo_tasks(tmp_path / "store", tmp_path / "work") == []
