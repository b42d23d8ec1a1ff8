"""The Ray Serve deployment bodies: an engine replica, and the store's single writer.

- ``EngineReplica`` is one Sidecar engine: the backbone loaded once, its own byte-budgeted tuner
  cache and batcher (``build_services``). Its multiplexed loader returns a token, never a model:
  the tuner cache stays the only memory manager, and calling the loader for every task of every
  request keeps Serve's index of "which replica holds which task" true, so requests for a task
  are routed to the replica that holds it (SCALE_OUT.md, section 4).
- ``StoreWriter`` owns every write: it validates (with its own backbone) and publishes, deletes,
  rolls back, pins; then broadcasts the change to every engine replica before it answers, so no
  replica serves a replaced version after the call returns. A replica that missed a broadcast
  (started during one, or the writer restarted) catches up from ``state()`` within ``SYNC_S``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from typing import Any

from ray import serve

from models.postprocess import PostprocessConfig
from server.config import Settings
from server.schemas import BackboneInfo, DetectResponse, TaskInfo, TaskList, TaskVersions
from server.services import Services, build_services, freeze_heap, load_backbone

log = logging.getLogger(__name__)
SYNC_S = 2.0  # the backstop: how often a replica compares its view of the store with the writer's


def _services(settings: Settings) -> Services:
    import torch

    torch.set_num_threads(settings.threads or 1)  # Ray gives fractional-CPU replicas one thread anyway
    services = build_services(settings, load_backbone(settings))
    freeze_heap()  # a replica is a process of its own
    return services


class EngineReplica:
    """One engine; ``detect`` is routed here by the multiplexed id the ingress sets (a task id)."""

    async def __init__(self, settings: Settings) -> None:  # type: ignore[misc]  (Ray awaits an async constructor)
        self.settings, self.services = settings, _services(settings)
        self.state: tuple[str, int] | None = None  # the writer's (incarnation, epoch) last applied
        self._started = False
        await self.services.tasks.build_spares()
        await self._start()  # pulls the writer's state (the pinned tasks) within SYNC_S, before any request

    async def resident(self, task_id: str) -> str:
        """Replaced by :meth:`with_routing` with Serve's multiplexed loader of this body."""
        return task_id  # a token for Serve's routing index; the tuner cache holds the model

    @classmethod
    def with_routing(cls, max_tasks: int) -> type[EngineReplica]:
        """The deployment class: ``resident`` as a multiplexed loader indexing up to ``max_tasks`` ids."""
        loader = serve.multiplexed(max_num_models_per_replica=max_tasks)(EngineReplica.resident)
        return type("EngineReplica", (cls,), {"resident": loader})

    async def _start(self) -> None:
        if not self._started:
            self._started = True
            self.services.start()
            asyncio.get_running_loop().create_task(self._sync_forever())

    async def detect(self, data: bytes, task_ids: list[str], post: PostprocessConfig) -> DetectResponse:
        await self._start()
        for spec in task_ids:
            await self.resident(spec.split("@")[0])
        return await self.services.engine.detect(data, task_ids, post)

    async def backbone_info(self) -> BackboneInfo:
        return await self.services.engine.backbone_info()

    async def apply(self, state: tuple[str, int], change: dict[str, Any]) -> int:
        """A change the writer made: read the task again, drop replaced versions, follow the pin."""
        task_id, store, cache = change["task"], self.services.store, self.services.tuner_cache
        store.refresh(task_id)
        try:
            current: int | None = store.get(task_id).version
        except Exception:  # noqa: BLE001  (deleted or quarantined: nothing of it may be served)
            current = None
        cache.forget(task_id, keep_version=current)
        if change.get("pinned") is True and current is not None:
            await cache.pin(task_id)
        elif change.get("pinned") is False or current is None:
            cache.unpin(task_id)
        if current is None:
            self.services.metrics.forget_task(task_id)
        self.state = state
        return os.getpid()

    async def _sync_forever(self) -> None:
        writer = serve.get_deployment_handle("Writer", serve.get_replica_context().app_name)
        while True:
            await asyncio.sleep(SYNC_S)
            try:
                state, pinned = await writer.state.remote()
            except Exception:  # noqa: BLE001  (the writer is restarting; try again next period)
                continue
            if state != self.state:
                self.resync(pinned)
                self.state = state

    def resync(self, pinned: list[str]) -> None:
        """Reads every task again (a missed broadcast), keeping only current versions resident."""
        store, cache = self.services.store, self.services.tuner_cache
        for task_id in store.task_ids():
            store.refresh(task_id)
        for task_id in cache.states():  # the resident tasks, read under the cache's lock
            try:
                cache.forget(task_id, keep_version=store.get(task_id).version)
            except Exception:  # noqa: BLE001
                cache.forget(task_id)
        for task_id in cache.pinned():
            if task_id not in pinned:
                cache.unpin(task_id)
        for task_id in (t for t in pinned if not cache.is_pinned(t)):
            asyncio.get_running_loop().create_task(cache.pin(task_id))

    async def snapshot(self, metrics: bool = False) -> dict[str, Any]:
        """What this replica holds and has done: for routing checks, ``/metrics`` (its text, when
        ``metrics``) and ``GET /v1/tasks``."""
        cache, executor = self.services.tuner_cache, self.services.executor
        states = cache.states()  # under the cache's lock: loads change the tiers meanwhile
        return {
            "pid": os.getpid(),
            "resident": {task_id: tier for task_id, (tier, _) in states.items()},
            "pinned": cache.pinned(),
            "compiled": sorted(task_id for task_id, (_, compiled) in states.items() if compiled),
            "backbone_passes": executor.backbone_image_passes,
            "images_served": int(self.services.metrics.images_served._value.get()),
            "state": self.state,
            "metrics": (await self.services.metrics_text()).decode() if metrics else "",
        }


class StoreWriter:
    """The store's only writer; every write is broadcast to the engine replicas before it answers."""

    def __init__(self, settings: Settings) -> None:
        self.services = _services(settings)  # its backbone validates uploads (the dry-run forward)
        self.incarnation, self.epoch = uuid.uuid4().hex, 0  # a restart is a new incarnation: replicas resync
        self.pinned: set[str] | None = None  # read from the store on first use

    async def _pins(self) -> set[str]:
        """The pinned set, kept in the store: a restarted writer, or a restarted app, reads it back
        (the versions need no rebuilding either, since every replica reads them from the store)."""
        if self.pinned is None:
            self.pinned = set(await asyncio.to_thread(self.services.store.pinned))
        return self.pinned

    async def state(self) -> tuple[tuple[str, int], list[str]]:
        return (self.incarnation, self.epoch), sorted(await self._pins())

    async def health(self) -> dict[str, Any]:
        """This writer's process, incarnation and epoch (operators and the restart test read it)."""
        return {"pid": os.getpid(), "incarnation": self.incarnation, "epoch": self.epoch}

    async def _changed(self, task_id: str, pinned: bool | None = None) -> None:
        self.epoch += 1
        change = {"task": task_id} if pinned is None else {"task": task_id, "pinned": pinned}
        engines = serve.get_deployment_handle("Engine", serve.get_replica_context().app_name)
        results = await engines.broadcast("apply", (self.incarnation, self.epoch), change).results_async(
            timeout_s=10, return_exceptions=True
        )
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:  # a replica died mid-broadcast: its replacement reads the store when it starts
            log.warning("%d of %d replicas missed change %s: %s", len(failed), len(results), change, failed[0])

    async def publish(self, task_id: str, weights: bytes, config: bytes) -> TaskInfo:
        info = await self.services.tasks.publish(task_id, weights, config)
        await self._changed(task_id)
        return info

    async def delete(self, task_id: str) -> None:
        await self.services.tasks.delete(task_id)
        (await self._pins()).discard(task_id)
        await self._changed(task_id, pinned=False)

    async def rollback(self, task_id: str, version: int) -> TaskInfo:
        info = await self.services.tasks.rollback(task_id, version)
        await self._changed(task_id)
        return info

    async def pin(self, task_id: str, pinned: bool) -> TaskInfo:
        info = await self.services.tasks.get(task_id)  # raises for an unknown task
        await asyncio.to_thread(self.services.store.set_pinned, task_id, pinned)
        pins = await self._pins()
        pins.add(task_id) if pinned else pins.discard(task_id)
        await self._changed(task_id, pinned=pinned)
        return info.model_copy(update={"pinned": pinned})

    async def list(self) -> TaskList:
        return await self.services.tasks.list()

    async def get(self, task_id: str) -> TaskInfo:
        return (await self.services.tasks.get(task_id)).model_copy(update={"pinned": task_id in await self._pins()})

    async def versions(self, task_id: str) -> TaskVersions:
        return await self.services.tasks.versions(task_id)

    async def quarantined(self) -> dict[str, str]:
        return await self.services.quarantined()
