"""The Tasks service: the store and the tuner cache behind every management call, no HTTP.

Publishing validates in full (strict keys and shapes, NaN/Inf, fingerprint, a dry-run forward)
before the store exposes the version, then hands the validated model to the cache, so the first
request for a new version finds it resident. A failed upload changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import Counter
from pathlib import Path
from typing import Any

from server.cache_entries import MAX_SPARES
from server.exceptions import SidecarError, TaskQuarantined, UnknownTask
from server.executor import Executor
from server.schemas import QuarantinedTask, TaskInfo, TaskList, TaskVersions, VersionInfo
from server.store import TaskVersion, VersionedStore, check_task_id, complete
from server.task_reader import quarantine_damaged
from server.tuner_cache import States, TunerCache
from tuners.artifact import MANIFEST, build_spare, load_artifact, manifest_architecture, parse_json, read_manifest
from tuners.errors import ArtifactError, IncompatibleBackboneError
from tuners.task_model import TaskModel

log = logging.getLogger(__name__)


def fixed_fields(manifest: dict[str, Any], nbytes: int) -> dict[str, Any]:
    """The fields of :class:`TaskInfo` that a version's files fix: its manifest's, and its bytes on disk."""
    return {
        "method": manifest["method"],
        "kind": manifest.get("kind", "side"),
        "labels": manifest["labels"],
        "metrics": {k: v for k, v in manifest.get("metrics", {}).items() if k != "per_class"},
        "bytes": nbytes,
        "backbone": manifest["backbone"],
        "sha256": manifest.get("weights_sha256"),
        "created_at": manifest.get("provenance", {}).get("created_at"),
    }


class Tasks:
    """List, inspect, publish, delete, pin and unpin tasks."""

    def __init__(self, store: VersionedStore, cache: TunerCache, executor: Executor) -> None:
        self.store, self.cache, self.executor = store, cache, executor
        # Per version folder: what its files fix in a listing, read once (see _read_fixed).
        self._fixed: dict[Path, tuple[tuple[int, int, int], dict[str, Any]]] = {}
        self._fixed_lock = threading.Lock()

    def info(self, found: TaskVersion, fixed: dict[str, Any] | None = None, states: States | None = None) -> TaskInfo:
        """What the API says about ``found``. ``fixed``: its :func:`fixed_fields`, else read from its folder
        (once per version); ``states``: :meth:`TunerCache.states`, when the caller has it.

        Raises:
            UnknownTask: the task was deleted, or the version pruned, while this read it.
        """
        try:
            fixed = self._read_fixed(found) if fixed is None else fixed
        except (ArtifactError, OSError) as e:
            if complete(found.path):
                raise
            raise UnknownTask(f"task {found.task_id!r} v{found.version} was deleted or pruned just now") from e
        try:
            versions = self.store.versions(found.task_id)
        except UnknownTask:
            versions = []  # deleted since; what the version was is still true
        residency, compiled = (self.cache.states() if states is None else states).get(found.task_id, (None, False))
        return TaskInfo(
            **fixed,
            id=found.task_id,
            version=found.version,
            versions=versions,
            residency=residency,
            pinned=self.cache.is_pinned(found.task_id),
            compiled=compiled,
        )

    def _read_fixed(self, found: TaskVersion) -> dict[str, Any]:
        """:func:`fixed_fields` of ``found``, read from its files once: a published version does not
        change, and a manifest changed on disk since (another inode, size or time) is read again.

        Raises:
            ArtifactError, OSError.
        """
        stat = (found.path / MANIFEST).stat()
        stamp = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        with self._fixed_lock:
            known = self._fixed.get(found.path)
        if known is not None and known[0] == stamp:
            return known[1]
        fixed = fixed_fields(read_manifest(found.path), sum(p.stat().st_size for p in found.path.iterdir()))
        with self._fixed_lock:
            self._fixed[found.path] = (stamp, fixed)
        return fixed

    async def list(self) -> TaskList:
        return await asyncio.to_thread(self._list)

    def _list(self) -> TaskList:
        """Every servable task and every quarantined one. It runs on a worker thread: a store of
        thousands of tasks takes a while to read, and the event loop goes on serving meanwhile."""
        infos, listed, states = [], set(), self.cache.states()
        for found in self.store.list():
            with contextlib.suppress(UnknownTask, TaskQuarantined):  # deleted since the listing; or listed below
                infos.append(self._current_info(found, states))
                listed.add(found.path)
        with self._fixed_lock:  # versions deleted or pruned since are forgotten
            self._fixed = {path: known for path, known in self._fixed.items() if path in listed}
        return TaskList(tasks=infos, quarantined=self.quarantined())

    def _current_info(self, found: TaskVersion, states: States | None = None) -> TaskInfo:
        """:meth:`info` of a task's current version. One whose manifest cannot be read any more (changed
        on disk since it was published) quarantines its task, as an unreadable ``CURRENT`` does, so that
        one damaged file neither fails every listing nor hides the other tasks.

        Raises:
            TaskQuarantined, UnknownTask.
        """
        try:
            return self.info(found, states=states)
        except ArtifactError as e:  # not OSError: a full file table or a flaky disk passes, a damaged file stays
            self.cache.forget(found.task_id)
            quarantine_damaged(self.store, found, e)
            raise

    def quarantined(self) -> list[QuarantinedTask]:
        """Tasks that are kept on disk but not served, with why."""
        return [
            QuarantinedTask(id=task_id, reason=reason, versions=self.store.versions(task_id))
            for task_id, reason in sorted(self.store.quarantined.items())
        ]

    async def versions(self, task_id: str) -> TaskVersions:
        found = await asyncio.to_thread(self.store.version_info, check_task_id(task_id))
        return TaskVersions(id=task_id, versions=[VersionInfo(**v) for v in found])

    async def rollback(self, task_id: str, version: int) -> TaskInfo:
        """Makes kept version ``version`` current, atomically; lifts a quarantine.

        Raises:
            UnknownTask, UnknownVersion.
        """
        found = await asyncio.to_thread(self.store.rollback, check_task_id(task_id), version)
        self.cache.forget(task_id, keep_version=version)
        return await asyncio.to_thread(self.info, found)

    async def get(self, task_id: str) -> TaskInfo:
        check_task_id(task_id)
        return await asyncio.to_thread(lambda: self._current_info(self.store.get(task_id)))

    async def publish(self, task_id: str, weights: bytes, config: bytes) -> TaskInfo:
        """Validates and publishes a new version of ``task_id``.

        Raises:
            InvalidTaskId, ArtifactError (every problem listed), IncompatibleBackboneError.
        """
        check_task_id(task_id)
        try:
            parse_json(config)
        except ValueError as e:
            raise ArtifactError([f"{MANIFEST} is not valid JSON: {e}"]) from e
        checked: list[tuple[TaskModel, dict]] = []

        def validate(folder: Path) -> None:
            model, manifest = load_artifact(folder, self.executor.backbone)
            self.executor.dry_run(model.to(self.executor.device))
            checked.append((model, manifest))

        published = await asyncio.to_thread(self.store.publish, task_id, weights, config, validate)
        self.cache.forget(task_id, keep_version=published.version)
        model, manifest = checked[-1]
        self.cache.admit(published, model, manifest)
        return self.info(published, fixed_fields(manifest, len(weights) + len(config)))  # a DELETE may follow

    async def delete(self, task_id: str) -> None:
        """Removes the task; requests already holding it finish with the version they hold."""
        await asyncio.to_thread(self.store.delete, check_task_id(task_id))
        self.cache.unpin(task_id)
        self.cache.forget(task_id)
        self.executor.metrics.forget_task(task_id)
        with self._fixed_lock:  # a task published again under this id starts at v1 again, in the same folder
            self._fixed = {path: known for path, known in self._fixed.items() if path.parent.name != task_id}

    async def pin(self, task_id: str) -> TaskInfo:
        """Loads the task and keeps it resident until unpinned, across restarts (the pin is kept in the store).

        Raises:
            UnknownTask, TaskQuarantined, CacheBudget, InsufficientStorage: the task is not pinned.
        """
        found = self.store.get(check_task_id(task_id))
        was = self.cache.is_pinned(task_id)
        await self.cache.pin(task_id)
        try:
            await asyncio.to_thread(self.store.set_pinned, task_id, True)
        except Exception:
            if not was:
                self.cache.unpin(task_id)
            raise
        return await asyncio.to_thread(self.info, found)

    async def unpin(self, task_id: str) -> TaskInfo:
        found = self.store.get(check_task_id(task_id))
        await asyncio.to_thread(self.store.set_pinned, task_id, False)
        self.cache.unpin(task_id)
        return await asyncio.to_thread(self.info, found)

    async def build_spares(self) -> int:
        """Builds spare models for the store's architectures, the most common first, until the device
        tier is full (call once at start-up, after :meth:`restore_pins`); returns how many. Each first
        load after a start then refills one instead of building a model on the request path."""
        manifests = await asyncio.to_thread(self._current_manifests)
        keyed = [(manifest_architecture(m), m) for m in manifests]
        counts, sample = Counter(arch for arch, _ in keyed), dict(keyed)
        order = [a for a, _ in counts.most_common()]
        plan = [a for n in range(max(counts.values(), default=0)) for a in order if counts[a] > n][:MAX_SPARES]
        built = 0
        for arch in plan:
            try:
                model = await asyncio.to_thread(build_spare, sample[arch], self.executor.backbone)
            except (ArtifactError, IncompatibleBackboneError):
                continue  # a task of another backbone, or broken: its loads report it
            if not self.cache.add_spare(model):
                break
            built += 1
        return built

    def _current_manifests(self) -> list[dict[str, Any]]:
        manifests = []
        for found in self.store.list():
            with contextlib.suppress(ArtifactError, OSError):  # deleted since, or unreadable: its loads say so
                manifests.append(read_manifest(found.path))
        return manifests

    async def restore_pins(self) -> list[str]:
        """Pins again the tasks pinned in the store (call once at start-up); returns those now pinned.

        A task that cannot be loaded now (quarantined, unreadable, over the cache's budget) is logged and
        stays pinned in the store, so a later start, or a pin call, tries again.
        """
        restored = []
        for task_id in await asyncio.to_thread(self.store.pinned):
            try:
                self.store.get(task_id)
                await self.cache.pin(task_id)
            except (SidecarError, ArtifactError, OSError) as e:
                log.warning("task %s is pinned in the store but was not loaded: %s", task_id, e)
            else:
                restored.append(task_id)
        if restored:
            log.info("pinned again from the store: %s", ", ".join(restored))
        return restored
