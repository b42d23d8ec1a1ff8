"""The task store: ``ROOT/<task id>/v<N>/`` artifact folders, a ``CURRENT`` pointer per task, and a
``PINNED`` marker on the tasks a user pinned (a restarted server pins them again).

The store never deletes what a user uploaded, except when they ask (delete) or by the documented
retention at publish time (the last ``keep_versions`` versions are kept). Like a database's
write-ahead discipline:

- Publishing writes a temp folder, validates it (the caller's check), fsyncs, renames it to the
  next version, then atomically replaces ``CURRENT``; only then does it prune old versions. A
  crash at any point leaves the previous state or the new one, and every uploaded version that
  was acknowledged is still on disk.
- Rollback atomically points ``CURRENT`` at an earlier complete version.
- Start-up recovery removes only this store's own leftovers (temp folders, trash, temp
  pointers). A task whose ``CURRENT`` is unreadable or names a missing or incomplete version is
  **quarantined**: left on disk untouched, logged, reported, and not served until an operator
  rolls it back or uploads a new version. Files and folders that are not task ids are ignored,
  with a warning.

Every step of a write calls ``on_step(name)`` (tests kill the process there).
"""

from __future__ import annotations

import datetime
import errno
import logging
import os
import re
import shutil
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.files import fsync_dir, write_atomic, write_synced
from server.exceptions import InsufficientStorage, InvalidTaskId, TaskQuarantined, UnknownTask, UnknownVersion
from tuners.artifact import MANIFEST, WEIGHTS, parse_json

log = logging.getLogger(__name__)
TASK_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
VERSION = re.compile(r"^v([1-9][0-9]{0,8})$")
CURRENT = "CURRENT"
PINNED = "PINNED"  # an empty marker in a task's folder: the task is pinned (kept resident)
OWN_LEFTOVERS = (".upload-", ".trash-")


def check_task_id(task_id: str) -> str:
    if not TASK_ID.fullmatch(task_id):
        raise InvalidTaskId(f"task id {task_id!r} must match {TASK_ID.pattern}")
    return task_id


@dataclass(frozen=True)
class TaskVersion:
    task_id: str
    version: int
    path: Path


def complete(folder: Path) -> bool:
    """A version folder holds both artifact files."""
    return os.path.isfile(os.path.join(folder, MANIFEST)) and os.path.isfile(os.path.join(folder, WEIGHTS))


class VersionedStore:
    """What every store backend shares: per-task write locks, the in-memory view of current
    versions, quarantine, and reads built on the backend's ``_read_current`` and ``_version``.

    Args:
        keep_versions: versions kept per task; older ones are pruned when a new one is published.
        on_step: called with the name of each step of a write (for crash tests).
    """

    def __init__(self, keep_versions: int = 5, on_step: Callable[[str], None] | None = None) -> None:
        if keep_versions < 1:
            raise ValueError("keep_versions must be at least 1")
        self.keep_versions, self.on_step = keep_versions, on_step or (lambda _: None)
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self._known: dict[str, TaskVersion] = {}  # current versions, so a request reads no file
        self.quarantined: dict[str, str] = {}  # task id -> why it is not served

    def _lock(self, task_id: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(task_id, threading.Lock())

    # The backend's part.
    def is_task(self, name: str) -> bool:
        raise NotImplementedError

    def task_ids(self) -> list[str]:
        raise NotImplementedError

    def _pointer(self, task_id: str) -> str | None:
        """What ``CURRENT`` says, stripped; ``None`` when the task does not exist.

        Raises:
            OSError, UnicodeDecodeError: the task exists but its pointer cannot be read.
        """
        raise NotImplementedError

    def _version(self, task_id: str, version: int) -> TaskVersion | None:
        """Kept version ``version``, or ``None`` when it is missing or incomplete."""
        raise NotImplementedError

    def versions(self, task_id: str) -> list[int]:
        raise NotImplementedError

    def _is_pinned(self, task_id: str) -> bool:
        raise NotImplementedError

    def _mark_pinned(self, task_id: str, pinned: bool) -> None:
        """Writes or removes the task's ``PINNED`` marker durably."""
        raise NotImplementedError

    # Pins: the one piece of serving state kept in the store, so a restart keeps what users pinned.
    def pinned(self) -> list[str]:
        """The ids of the tasks pinned with :meth:`set_pinned`, servable or not."""
        return [task_id for task_id in self.task_ids() if self._is_pinned(task_id)]

    def set_pinned(self, task_id: str, pinned: bool) -> None:
        """Records that ``task_id`` is pinned, or no longer, durably. Deleting the task removes its pin.

        Raises:
            UnknownTask, InsufficientStorage: nothing changed.
        """
        with self._lock(check_task_id(task_id)):
            if not self.is_task(task_id):
                raise UnknownTask.of(task_id)
            with disk_errors():
                self._mark_pinned(task_id, pinned)

    # Shared reads.
    def _read_current(self, task_id: str) -> TaskVersion | None:
        """The version ``CURRENT`` names; ``None`` when the task does not exist.

        Raises:
            TaskQuarantined: ``CURRENT`` is missing, unreadable or names a missing or incomplete version.
        """
        try:
            name = self._pointer(task_id)
        except (OSError, UnicodeDecodeError) as e:
            raise TaskQuarantined(f"its {CURRENT} pointer cannot be read ({type(e).__name__})") from None
        if name is None:
            return None
        found = VERSION.fullmatch(name)
        if found is None:
            raise TaskQuarantined(f"its {CURRENT} pointer reads {name[:40]!r}, not a version name")
        version = self._version(task_id, int(found[1]))
        if version is None:
            raise TaskQuarantined(f"{CURRENT} names {name}, which is missing or incomplete")
        return version

    def _check(self, task_id: str) -> None:
        """Quarantines ``task_id`` when its ``CURRENT`` cannot be served (never deletes anything)."""
        try:
            self._read_current(task_id)
        except TaskQuarantined as e:
            self.quarantine(task_id, e.message)

    def refresh(self, task_id: str) -> None:
        """Forgets what this process knew of ``task_id`` and reads it again (another process wrote it)."""
        self._known.pop(task_id, None)
        self.quarantined.pop(task_id, None)
        if self.is_task(task_id):
            self._check(task_id)

    def quarantine(self, task_id: str, reason: str) -> None:
        """Stops serving ``task_id``'s current version (kept on disk) until a rollback or an upload."""
        self.quarantined[task_id] = reason
        self._known.pop(task_id, None)
        log.error("store: task %s is quarantined: %s", task_id, reason)

    def get(self, task_id: str, version: int | None = None) -> TaskVersion:
        """The current version (from memory once seen), or ``version`` when given.

        Raises:
            UnknownTask, UnknownVersion, TaskQuarantined (only for the current version).
        """
        check_task_id(task_id)
        if version is not None:
            found = self._version(task_id, version)
            if found is None:
                if not self.is_task(task_id):
                    raise UnknownTask.of(task_id)
                raise UnknownVersion(f"task {task_id!r} has no version {version}; versions: {self.versions(task_id)}")
            return found
        if task_id in self.quarantined:
            raise TaskQuarantined(f"task {task_id!r} is quarantined: {self.quarantined[task_id]}")
        current = self._known.get(task_id) or self._read_current(task_id)
        if current is None:
            raise UnknownTask.of(task_id)
        self._known[task_id] = current
        return current

    def list(self) -> list[TaskVersion]:
        """Every servable task's current version (quarantined ones are in ``quarantined``)."""
        found = []
        for task_id in self.task_ids():
            if task_id in self.quarantined:
                continue
            try:
                current = self._read_current(task_id)
            except TaskQuarantined:
                continue  # a write of another process in flight; recovery decides at start
            if current is not None:
                found.append(current)
        return found


class TaskStore(VersionedStore):
    """Versioned task folders on a local or mounted filesystem. Writes to one id are serialised;
    different ids proceed in parallel.

    Args:
        root: the store folder (created if missing).
        keep_versions, on_step: as :class:`VersionedStore`.
    """

    def __init__(self, root: Path, keep_versions: int = 5, on_step: Callable[[str], None] | None = None) -> None:
        super().__init__(keep_versions, on_step)
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    def recover(self) -> list[str]:
        """Removes this store's own leftovers and quarantines broken tasks; returns what was removed."""
        removed = []
        for path in sorted(self.root.iterdir()):
            if path.name.startswith(OWN_LEFTOVERS) and path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path.name)
            elif not (path.is_dir() and TASK_ID.fullmatch(path.name)):
                log.warning("store: ignoring %s, which is not a task folder", path.name)
            else:
                for pointer in path.glob(f".{CURRENT}.*"):
                    pointer.unlink(missing_ok=True)
                    removed.append(f"{path.name}/{pointer.name}")
                self._check(path.name)
        if removed:
            log.info("store recovery removed its own leftovers %s", removed)
        return removed

    def is_task(self, name: str) -> bool:
        """Whether ``name`` in the store root is a task folder."""
        return bool(TASK_ID.fullmatch(name)) and (self.root / name).is_dir()

    def task_ids(self) -> list[str]:
        """Every task folder's id, servable or not."""
        with os.scandir(self.root) as entries:  # is_dir() from the listing itself: no stat per entry
            return sorted(e.name for e in entries if TASK_ID.fullmatch(e.name) and e.is_dir())

    def _pointer(self, task_id: str) -> str | None:
        folder = self.root / task_id
        try:
            return (folder / CURRENT).read_text().strip()
        except (FileNotFoundError, NotADirectoryError):
            if folder.is_dir():
                raise  # a task without a readable pointer
            return None

    def _version(self, task_id: str, version: int) -> TaskVersion | None:
        path = self.root / task_id / f"v{version}"
        return TaskVersion(task_id, version, path) if complete(path) else None

    def versions(self, task_id: str) -> list[int]:
        """Complete versions of ``task_id``, oldest first."""
        folder = self.root / check_task_id(task_id)
        try:
            with os.scandir(folder) as entries:
                names = [e.name for e in entries]
        except (FileNotFoundError, NotADirectoryError):  # never there, or deleted just now
            raise UnknownTask.of(task_id) from None
        numbers = (VERSION.fullmatch(name) for name in names)
        return sorted(int(m[1]) for m in numbers if m and complete(folder / m[0]))

    def _is_pinned(self, task_id: str) -> bool:
        return (self.root / task_id / PINNED).is_file()

    def _mark_pinned(self, task_id: str, pinned: bool) -> None:
        folder = self.root / task_id
        if pinned:
            (folder / PINNED).touch()  # creating a file is atomic: the marker is there or not
        else:
            (folder / PINNED).unlink(missing_ok=True)
        fsync_dir(folder)

    def version_info(self, task_id: str) -> list[dict[str, Any]]:
        """Per kept version: number, whether current, metrics and creation time from its manifest."""
        current = None if task_id in self.quarantined else self.get(task_id).version
        out = []
        for number in self.versions(task_id):
            path = self.root / task_id / f"v{number}"
            try:
                manifest = (path / MANIFEST).read_bytes()
            except OSError:
                manifest = b""
            out.append(version_entry(number, number == current, manifest, _mtime(path)))
        return out

    def publish(self, task_id: str, weights: bytes, manifest: bytes, validate: Callable[[Path], None]) -> TaskVersion:
        """Writes, validates (``validate`` raises to refuse) and exposes a new version atomically.

        Raises:
            InsufficientStorage: the disk is full; nothing changed.
        """
        check_task_id(task_id)
        with self._lock(task_id):
            tmp = Path(tempfile.mkdtemp(prefix=f"{OWN_LEFTOVERS[0]}{task_id}-", dir=self.root))
            try:
                with disk_errors():
                    for name, data in ((WEIGHTS, weights), (MANIFEST, manifest)):
                        write_synced(tmp / name, data)
                self.on_step("written")
                validate(tmp)
                self.on_step("validated")
                folder = self.root / task_id
                with disk_errors():
                    folder.mkdir(exist_ok=True)
                    numbers = [int(m[1]) for m in (VERSION.fullmatch(p.name) for p in folder.iterdir()) if m]
                    target = folder / f"v{max(numbers, default=0) + 1}"
                    os.replace(tmp, target)
                    fsync_dir(folder)
                    self.on_step("renamed")
                    self._point(folder, target.name)
                self.on_step("pointed")
                self.quarantined.pop(task_id, None)
                self._known[task_id] = TaskVersion(task_id, int(target.name[1:]), target)
                self._prune(folder, int(target.name[1:]))
                return self._known[task_id]
            finally:
                shutil.rmtree(tmp, ignore_errors=True)

    def _prune(self, folder: Path, current: int) -> None:
        """The one deliberate deletion besides delete: versions beyond the newest ``keep_versions``."""
        numbers = sorted(int(m[1]) for m in (VERSION.fullmatch(p.name) for p in folder.iterdir()) if m)
        for number in numbers[: max(0, len(numbers) - self.keep_versions)]:
            if number != current:
                shutil.rmtree(folder / f"v{number}", ignore_errors=True)
        self.on_step("pruned")

    def rollback(self, task_id: str, version: int) -> TaskVersion:
        """Points ``CURRENT`` at kept version ``version``, atomically; lifts a quarantine."""
        with self._lock(check_task_id(task_id)):
            target = self.get(task_id, version)
            with disk_errors():
                self._point(self.root / task_id, target.path.name)
            self.on_step("pointed")
            self.quarantined.pop(task_id, None)
            self._known[task_id] = target
            return target

    def _point(self, folder: Path, name: str) -> None:
        write_atomic(folder / CURRENT, name.encode())  # a leftover .CURRENT.* is removed by recover()

    def delete(self, task_id: str) -> None:
        """Removes the task and all its versions atomically (a rename out of sight, then the files)."""
        check_task_id(task_id)
        with self._lock(task_id):
            folder = self.root / task_id
            if not folder.is_dir():
                raise UnknownTask.of(task_id)
            trash = self.root / f"{OWN_LEFTOVERS[1]}{task_id}-{uuid.uuid4().hex}"
            os.replace(folder, trash)
            self._known.pop(task_id, None)
            self.quarantined.pop(task_id, None)
            fsync_dir(self.root)
            self.on_step("trashed")
            shutil.rmtree(trash, ignore_errors=True)


def version_entry(number: int, current: bool, manifest: bytes, published_at: str | None) -> dict[str, Any]:
    """One row of ``version_info`` from a version's manifest bytes (unreadable ones give empty fields)."""
    try:
        parsed = parse_json(manifest)
    except ValueError:
        parsed = {}
    parsed = parsed if isinstance(parsed, dict) else {}
    provenance = parsed.get("provenance") if isinstance(parsed.get("provenance"), dict) else {}
    metrics = parsed.get("metrics") if isinstance(parsed.get("metrics"), dict) else {}
    return {
        "version": number,
        "current": current,
        "method": parsed.get("method"),
        "metrics": {k: v for k, v in metrics.items() if k != "per_class"},
        "created_at": provenance.get("created_at"),
        "published_at": published_at,
        "sha256": parsed.get("weights_sha256"),
    }


def _mtime(path: Path) -> str:
    return datetime.datetime.fromtimestamp(path.stat().st_mtime, datetime.UTC).isoformat(timespec="seconds")


@contextmanager
def disk_errors() -> Iterator[None]:
    """Turns a full disk (ENOSPC, EDQUOT) into :class:`InsufficientStorage`."""
    try:
        yield
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise InsufficientStorage("the store's disk is full; nothing was changed") from e
        raise
