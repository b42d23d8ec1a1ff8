"""A task store behind an fsspec URL: an object store (``s3://``, ``gs://``, ``az://``), a shared
filesystem (``file://``), or ``memory://`` in tests.

The layout is the local store's: ``URL/<task id>/v<N>/{tuner.safetensors,tuner.json}``,
``URL/<task id>/CURRENT`` and, on a pinned task, ``URL/<task id>/PINNED``. Object stores have no
rename and no folders, so the writes differ while keeping the local store's guarantees:

- **One PUT is atomic** (S3, GCS and Azure never show half an object). Publishing writes and
  validates the version in a local temp folder first, then uploads the weights, then the
  manifest (a version is complete when both exist), then replaces ``CURRENT``. A crash leaves the
  old ``CURRENT`` or the new one. Version numbers only grow, so an incomplete upload is never
  listed and its number never reused.
- **A task exists while its ``CURRENT`` does.** Delete removes ``PINNED``, then ``CURRENT`` (every
  reader sees the task gone at once), then the versions; a first upload is invisible until its
  ``CURRENT`` is written, and a task published again under a deleted one's id is not pinned.
- On a filesystem (``file://``), ``CURRENT`` is written under a temp name and renamed into place.
- **One writer**, as for the local store: the single-process server, or the Ray app's ``Writer``.
  Writers in several processes are not coordinated.

Replicas read through a local **mirror** (``mirror/<task id>/v<N>-<hash>/``): a version is
downloaded once into a temp folder, then renamed into place. It is named by the hash of its
manifest, which holds the weights' sha256, so a task deleted and published again as ``v1`` never
reuses a stale copy; loading checks the weights against that sha256. Only JSON and safetensors
are ever read. Credentials come from the usual places of each fsspec backend (``AWS_*`` variables,
instance roles, ``GOOGLE_APPLICATION_CREDENTIALS``); install ``s3fs`` or ``gcsfs`` for them.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import logging
import posixpath
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fsspec

from models.files import write_atomic
from server.exceptions import UnknownTask
from server.store import (
    CURRENT,
    PINNED,
    TASK_ID,
    VERSION,
    TaskVersion,
    VersionedStore,
    check_task_id,
    disk_errors,
    version_entry,
)
from tuners.artifact import MANIFEST, WEIGHTS

log = logging.getLogger(__name__)


class ObjectTaskStore(VersionedStore):
    """Versioned tasks under an fsspec URL, read through a local mirror.

    Args:
        url: where the tasks live, e.g. ``s3://bucket/sidecar`` or ``file:///mnt/shared/store``.
        mirror: a local folder for downloaded versions (created if missing; only this store writes it).
        keep_versions, on_step: as :class:`VersionedStore`.
        storage_options: passed to the fsspec filesystem (endpoint, profile, ...).
    """

    def __init__(
        self,
        url: str,
        mirror: Path,
        keep_versions: int = 5,
        on_step: Callable[[str], None] | None = None,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(keep_versions, on_step)
        self.fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
        self.base = root.rstrip("/")
        self.mirror = mirror
        self.mirror.mkdir(parents=True, exist_ok=True)
        self._kept: dict[tuple[str, int], TaskVersion] = {}  # versions read, so task@N reads no object
        self._renames = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))
        self.fs.makedirs(self.base, exist_ok=True)

    def _path(self, *parts: str) -> str:
        return posixpath.join(self.base, *parts)

    def _names(self, *parts: str) -> list[str]:
        """Entry names under a prefix, read afresh (no listing cache); ``[]`` when there are none."""
        path = self._path(*parts)
        self.fs.invalidate_cache(path)
        try:
            return sorted(posixpath.basename(p.rstrip("/")) for p in self.fs.ls(path, detail=False))
        except FileNotFoundError:
            return []

    def _put(self, path: str, data: bytes) -> None:
        """Writes one object atomically (a rename on filesystems; a single PUT on object stores)."""
        with disk_errors():
            if self._renames:  # a filesystem: as the local store writes (fsync, rename, fsync the folder)
                target = Path(path)
                target.parent.mkdir(parents=True, exist_ok=True)
                write_atomic(target, data)
            else:
                self.fs.pipe_file(path, data)

    # The backend's part of VersionedStore.
    def is_task(self, name: str) -> bool:
        return bool(TASK_ID.fullmatch(name)) and self.fs.exists(self._path(name, CURRENT))

    def task_ids(self) -> list[str]:
        return [name for name in self._names() if self.is_task(name)]

    def recover(self) -> list[str]:
        """Removes the mirror's unfinished downloads and uploads, and quarantines tasks whose
        ``CURRENT`` cannot be served. Nothing under the URL is removed."""
        removed = [*self.mirror.glob(".upload-*"), *self.mirror.glob("*/.download-*")]
        for path in removed:
            shutil.rmtree(path, ignore_errors=True)
        for task_id in self.task_ids():
            self._check(task_id)
        return [str(p.relative_to(self.mirror)) for p in removed]

    def _complete(self, task_id: str, name: str) -> bool:
        return {MANIFEST, WEIGHTS} <= set(self._names(task_id, name))

    def _pointer(self, task_id: str) -> str | None:
        try:
            return self.fs.cat_file(self._path(task_id, CURRENT)).decode().strip()
        except FileNotFoundError:
            return None

    def _mirrored(self, task_id: str, name: str, manifest: bytes) -> Path:
        """A version's folder in the mirror, named by its manifest's hash."""
        return self.mirror / task_id / f"{name}-{hashlib.sha256(manifest).hexdigest()[:16]}"

    def refresh(self, task_id: str) -> None:
        self._kept = {k: v for k, v in self._kept.items() if k[0] != task_id}
        super().refresh(task_id)

    def _version(self, task_id: str, version: int) -> TaskVersion | None:
        """The version, downloaded into the mirror once; ``None`` when it is missing or incomplete."""
        if (task_id, version) in self._kept:
            return self._kept[task_id, version]
        name = f"v{version}"
        try:
            manifest = self.fs.cat_file(self._path(task_id, name, MANIFEST))
        except FileNotFoundError:
            return None
        local = self._mirrored(task_id, name, manifest)
        if not local.is_dir():
            local.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=local.parent))
            try:
                self.fs.get_file(self._path(task_id, name, WEIGHTS), str(tmp / WEIGHTS))
                (tmp / MANIFEST).write_bytes(manifest)
                tmp.replace(local)
            except FileNotFoundError:
                return None
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        self._kept[task_id, version] = TaskVersion(task_id, version, local)
        return self._kept[task_id, version]

    def versions(self, task_id: str) -> list[int]:
        names = self._names(check_task_id(task_id))
        if not names:
            raise UnknownTask.of(task_id)
        numbers = (VERSION.fullmatch(name) for name in names)
        return sorted(int(m[1]) for m in numbers if m and self._complete(task_id, m[0]))

    def _is_pinned(self, task_id: str) -> bool:
        path = self._path(task_id, PINNED)
        self.fs.invalidate_cache(path)
        return self.fs.exists(path)

    def _mark_pinned(self, task_id: str, pinned: bool) -> None:
        path = self._path(task_id, PINNED)
        if pinned:
            self._put(path, b"")
        else:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(path)

    def version_info(self, task_id: str) -> list[dict[str, Any]]:
        """Per kept version: as :meth:`TaskStore.version_info`."""
        current = None if task_id in self.quarantined else self.get(task_id).version
        out = []
        for number in self.versions(task_id):
            path = self._path(task_id, f"v{number}", MANIFEST)
            out.append(version_entry(number, number == current, self.fs.cat_file(path), self._modified(path)))
        return out

    def _modified(self, path: str) -> str | None:
        info = self.fs.info(path)
        stamp = next((info[k] for k in ("mtime", "LastModified", "updated", "created") if info.get(k)), None)
        if isinstance(stamp, int | float):
            stamp = datetime.datetime.fromtimestamp(stamp, datetime.UTC)
        return stamp.isoformat(timespec="seconds") if isinstance(stamp, datetime.datetime) else stamp

    # Writes.
    def publish(self, task_id: str, weights: bytes, manifest: bytes, validate: Callable[[Path], None]) -> TaskVersion:
        """Validates locally, uploads weights then manifest, then points ``CURRENT`` at the new version.

        Raises:
            InsufficientStorage: the local disk is full; nothing changed.
        """
        check_task_id(task_id)
        with self._lock(task_id):
            tmp = Path(tempfile.mkdtemp(prefix=".upload-", dir=self.mirror))
            try:
                with disk_errors():
                    (tmp / WEIGHTS).write_bytes(weights)
                    (tmp / MANIFEST).write_bytes(manifest)
                self.on_step("written")
                validate(tmp)
                self.on_step("validated")
                numbers = [int(m[1]) for m in map(VERSION.fullmatch, self._names(task_id)) if m]
                name = f"v{max(numbers, default=0) + 1}"
                self._put(self._path(task_id, name, WEIGHTS), weights)
                self._put(self._path(task_id, name, MANIFEST), manifest)
                self.on_step("renamed")
                self._put(self._path(task_id, CURRENT), name.encode())
                self.on_step("pointed")
                local = self._mirrored(task_id, name, manifest)
                local.parent.mkdir(parents=True, exist_ok=True)
                tmp.replace(local)  # what was validated is what the replicas load: no download
                self.quarantined.pop(task_id, None)
                self._known[task_id] = self._kept[task_id, int(name[1:])] = TaskVersion(task_id, int(name[1:]), local)
                self._prune(task_id, int(name[1:]))
                return self._known[task_id]
            finally:
                shutil.rmtree(tmp, ignore_errors=True)

    def _prune(self, task_id: str, current: int) -> None:
        """The one deliberate deletion besides delete: versions beyond the newest ``keep_versions``."""
        numbers = sorted(int(m[1]) for m in map(VERSION.fullmatch, self._names(task_id)) if m)
        for number in numbers[: max(0, len(numbers) - self.keep_versions)]:
            if number != current:
                self.fs.rm(self._path(task_id, f"v{number}"), recursive=True)
                self._kept.pop((task_id, number), None)
        self.on_step("pruned")

    def rollback(self, task_id: str, version: int) -> TaskVersion:
        """Points ``CURRENT`` at kept version ``version``, atomically; lifts a quarantine."""
        with self._lock(check_task_id(task_id)):
            target = self.get(task_id, version)
            self._put(self._path(task_id, CURRENT), f"v{version}".encode())
            self.on_step("pointed")
            self.quarantined.pop(task_id, None)
            self._known[task_id] = target
            return target

    def delete(self, task_id: str) -> None:
        """Removes ``CURRENT`` (the task is gone for every reader), then every version and the mirror."""
        check_task_id(task_id)
        with self._lock(task_id):
            if not self.is_task(task_id):
                raise UnknownTask.of(task_id)
            self._mark_pinned(task_id, False)  # first: an id published again after a crash here is not pinned
            self.fs.rm(self._path(task_id, CURRENT))
            self._known.pop(task_id, None)
            self._kept = {k: v for k, v in self._kept.items() if k[0] != task_id}
            self.quarantined.pop(task_id, None)
            self.on_step("trashed")
            self.fs.rm(self._path(task_id), recursive=True)
            shutil.rmtree(self.mirror / task_id, ignore_errors=True)
