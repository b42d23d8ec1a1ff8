"""The task store: ``ROOT/<task id>/v<N>/`` artifact folders and a ``CURRENT`` pointer per task.

Publishing writes a temp folder, validates it (the caller's check: strict keys and shapes,
NaN/Inf, fingerprint, a dry-run forward), fsyncs, renames it to the next version, then
atomically replaces ``CURRENT``. Nothing becomes visible before the pointer moves, so a crash at
any point leaves the previous state; :meth:`TaskStore.recover` removes the leftovers at start.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from server.exceptions import InvalidTaskId, UnknownTask
from tuners.artifact import MANIFEST, WEIGHTS, fsync_dir

log = logging.getLogger(__name__)
TASK_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
CURRENT = "CURRENT"


def check_task_id(task_id: str) -> str:
    if not TASK_ID.fullmatch(task_id):
        raise InvalidTaskId(f"task id {task_id!r} must match {TASK_ID.pattern}")
    return task_id


@dataclass(frozen=True)
class TaskVersion:
    task_id: str
    version: int
    path: Path


class TaskStore:
    """Versioned task folders. Uploads to one id are serialised; different ids proceed in parallel."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self._known: dict[str, TaskVersion] = {}  # current versions, so a request reads no file

    def _lock(self, task_id: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(task_id, threading.Lock())

    def recover(self) -> list[str]:
        """Removes temp folders, trash and versions no ``CURRENT`` points to; returns what was removed."""
        removed = []
        for path in self.root.glob(".*"):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
        for task in self.root.iterdir():
            current = self.current(task.name) if TASK_ID.fullmatch(task.name) else None
            for child in task.iterdir():
                if child.name != CURRENT and (current is None or child != current.path):
                    shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink()
                    removed.append(f"{task.name}/{child.name}")
            if current is None:
                shutil.rmtree(task, ignore_errors=True)
        if removed:
            log.info("store recovery removed %s", removed)
        return removed

    def current(self, task_id: str) -> TaskVersion | None:
        pointer = self.root / task_id / CURRENT
        try:
            name = pointer.read_text().strip()
        except (FileNotFoundError, NotADirectoryError):
            return None
        path = self.root / task_id / name
        if not re.fullmatch(r"v\d+", name) or not (path / MANIFEST).is_file():
            return None
        return TaskVersion(task_id, int(name[1:]), path)

    def get(self, task_id: str) -> TaskVersion:
        """The current version; from memory once seen (this process is the store's only writer)."""
        found = self._known.get(task_id) or self.current(check_task_id(task_id))
        if found is None:
            raise UnknownTask.of(task_id)
        self._known[task_id] = found
        return found

    def list(self) -> list[TaskVersion]:
        found = [self.current(p.name) for p in sorted(self.root.iterdir()) if TASK_ID.fullmatch(p.name)]
        return [t for t in found if t is not None]

    def versions(self, task_id: str) -> list[int]:
        folder = self.root / task_id
        return sorted(int(p.name[1:]) for p in folder.glob("v*") if re.fullmatch(r"v\d+", p.name))

    def publish(self, task_id: str, weights: bytes, manifest: bytes, validate: Callable[[Path], None]) -> TaskVersion:
        """Writes, validates (``validate`` raises to refuse) and exposes a new version atomically."""
        check_task_id(task_id)
        with self._lock(task_id):
            tmp = Path(tempfile.mkdtemp(prefix=f".upload-{task_id}-", dir=self.root))
            try:
                for name, data in ((WEIGHTS, weights), (MANIFEST, manifest)):
                    with open(tmp / name, "wb") as f:
                        f.write(data)
                        f.flush()
                        os.fsync(f.fileno())
                validate(tmp)
                folder = self.root / task_id
                folder.mkdir(exist_ok=True)
                latest = self.current(task_id)
                version = max([latest.version if latest else 0, *self.versions(task_id)]) + 1
                target = folder / f"v{version}"
                os.replace(tmp, target)
                fsync_dir(folder)
                self._point(folder, target.name)
                self._known[task_id] = TaskVersion(task_id, version, target)
                return self._known[task_id]
            finally:
                shutil.rmtree(tmp, ignore_errors=True)

    def _point(self, folder: Path, name: str) -> None:
        tmp = folder / f".{CURRENT}.{uuid.uuid4().hex}"
        with open(tmp, "w") as f:
            f.write(name)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, folder / CURRENT)
        fsync_dir(folder)

    def delete(self, task_id: str) -> None:
        """Removes the task atomically (a rename out of sight, then the files)."""
        check_task_id(task_id)
        with self._lock(task_id):
            folder = self.root / task_id
            if self.current(task_id) is None:
                raise UnknownTask.of(task_id)
            trash = self.root / f".trash-{task_id}-{uuid.uuid4().hex}"
            os.replace(folder, trash)
            self._known.pop(task_id, None)
            fsync_dir(self.root)
            shutil.rmtree(trash, ignore_errors=True)
