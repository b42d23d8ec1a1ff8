"""The Tasks service: the store and the tuner cache behind every management call, no HTTP.

Publishing validates in full (strict keys and shapes, NaN/Inf, fingerprint, a dry-run forward)
before the store exposes the version, then hands the validated model to the cache, so the first
request for a new version finds it resident. A failed upload changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from pathlib import Path
from typing import Any

from server.cache_entries import MAX_SPARES
from server.exceptions import SidecarError, TaskQuarantined, UnknownTask
from server.executor import Executor
from server.schemas import QuarantinedTask, TaskInfo, TaskList, TaskVersions, VersionInfo
from server.store import TaskVersion, VersionedStore, check_task_id, complete
from server.task_reader import quarantine_damaged
from server.tuner_cache import TunerCache
from tuners.artifact import MANIFEST, build_spare, load_artifact, manifest_architecture, parse_json, read_manifest
from tuners.errors import ArtifactError, IncompatibleBackboneError
from tuners.task_model import TaskModel

log = logging.getLogger(__name__)


class Tasks:
    """List, inspect, publish, delete, pin and unpin tasks."""

    def __init__(self, store: VersionedStore, cache: TunerCache, executor: Executor) -> None:
        self.store, self.cache, self.executor = store, cache, executor

    def info(self, found: TaskVersion, manifest: dict[str, Any] | None = None, nbytes: int | None = None) -> TaskInfo:
        """What the API says about ``found``, read from its folder unless the caller has ``manifest`` and ``nbytes``.

        Raises:
            UnknownTask: the task was deleted, or the version pruned, while this read it.
        """
        try:
            manifest = read_manifest(found.path) if manifest is None else manifest
            nbytes = sum(p.stat().st_size for p in found.path.iterdir()) if nbytes is None else nbytes
        except (ArtifactError, OSError) as e:
            if complete(found.path):
                raise
            raise UnknownTask(f"task {found.task_id!r} v{found.version} was deleted or pruned just now") from e
        try:
            versions = self.store.versions(found.task_id)
        except UnknownTask:
            versions = []  # deleted since; what the version was is still true
        return TaskInfo(
            id=found.task_id,
            version=found.version,
            versions=versions,
            method=manifest["method"],
            kind=manifest.get("kind", "side"),
            labels=manifest["labels"],
            metrics={k: v for k, v in manifest.get("metrics", {}).items() if k != "per_class"},
            bytes=nbytes,
            residency=self.cache.residency(found.task_id),
            pinned=self.cache.is_pinned(found.task_id),
            compiled=self.cache.is_compiled(found.task_id),
            backbone=manifest["backbone"],
            sha256=manifest.get("weights_sha256"),
            created_at=manifest.get("provenance", {}).get("created_at"),
        )

    async def list(self) -> TaskList:
        infos = []
        for found in await asyncio.to_thread(self.store.list):
            with contextlib.suppress(UnknownTask, TaskQuarantined):  # deleted since the listing; or listed below
                infos.append(self._current_info(found))
        return TaskList(tasks=infos, quarantined=self.quarantined())

    def _current_info(self, found: TaskVersion) -> TaskInfo:
        """:meth:`info` of a task's current version. One whose manifest cannot be read any more (changed
        on disk since it was published) quarantines its task, as an unreadable ``CURRENT`` does, so that
        one damaged file neither fails every listing nor hides the other tasks.

        Raises:
            TaskQuarantined, UnknownTask.
        """
        try:
            return self.info(found)
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
        return self.info(found)

    async def get(self, task_id: str) -> TaskInfo:
        return self._current_info(await asyncio.to_thread(self.store.get, check_task_id(task_id)))

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
        return self.info(published, manifest, len(weights) + len(config))  # a DELETE may follow at once

    async def delete(self, task_id: str) -> None:
        """Removes the task; requests already holding it finish with the version they hold."""
        await asyncio.to_thread(self.store.delete, check_task_id(task_id))
        self.cache.unpin(task_id)
        self.cache.forget(task_id)

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
        return self.info(found)

    async def unpin(self, task_id: str) -> TaskInfo:
        found = self.store.get(check_task_id(task_id))
        await asyncio.to_thread(self.store.set_pinned, task_id, False)
        self.cache.unpin(task_id)
        return self.info(found)

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
