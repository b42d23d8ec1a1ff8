"""Task models in memory, bounded in bytes: a device tier, a host tier, and the store behind them.

- LRU per tier. An entry evicted from the device tier moves to the host tier (when that has a
  budget), and from there it is dropped; the store on disk is the last tier.
- Pinned tasks and tasks with a reference count above zero (in use by a batch) are never evicted.
- Loads run on their own thread (``tuner-loader``), so a request for a cold task waits for its
  load while requests for resident tasks go straight to the batcher.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from models.backbones.base import FrozenBackbone
from server.errors import ServerError
from server.store import TaskStore, TaskVersion
from tuners.artifact import load_artifact
from tuners.task_model import TaskModel

log = logging.getLogger(__name__)
Key = tuple[str, int]  # (task id, version)
TIERS = ("device", "host")


def model_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


@dataclass
class Entry:
    key: Key
    model: TaskModel
    manifest: dict[str, Any]
    nbytes: int
    refs: int = 0
    stale: bool = False  # deleted or replaced: dropped when the last user releases it


@dataclass
class Lease:
    """A task model held for one batch; :meth:`TunerCache.release` it when done."""

    entry: Entry
    released: bool = field(default=False)

    @property
    def model(self) -> TaskModel:
        return self.entry.model

    @property
    def version(self) -> int:
        return self.entry.key[1]


class TunerCache:
    """Byte-budgeted two-tier LRU of task models with pins and reference counts."""

    def __init__(
        self, store: TaskStore, backbone: FrozenBackbone, device: torch.device, budgets: dict[str, int], metrics: Any
    ) -> None:
        self.store, self.backbone, self.device, self.budgets, self.metrics = store, backbone, device, budgets, metrics
        self.tiers: dict[str, OrderedDict[Key, Entry]] = {t: OrderedDict() for t in TIERS}
        self.pinned: set[str] = set()
        self._loading: dict[Key, Future] = {}
        self._lock = threading.RLock()
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tuner-loader")

    def close(self) -> None:
        self._loader.shutdown(wait=True, cancel_futures=True)

    def resident_bytes(self, tier: str) -> int:
        with self._lock:
            return sum(e.nbytes for e in self.tiers[tier].values())

    def residency(self, task_id: str) -> str | None:
        with self._lock:
            return next((t for t in TIERS for k in self.tiers[t] if k[0] == task_id), None)

    async def acquire(self, task_id: str) -> Lease:
        """The current version of ``task_id``, resident on the device and referenced until released."""
        version = self.store.get(task_id)
        for _ in range(8):  # a just-loaded entry can be evicted before we take it, under heavy churn
            with self._lock:
                entry = self.tiers["device"].get((task_id, version.version))
                if entry is not None:
                    entry.refs += 1
                    self.tiers["device"].move_to_end(entry.key)
                    self.metrics.cache_events.labels(tier="device", event="hit").inc()
                    return Lease(entry)
                future = self._loading.get((task_id, version.version))
                if future is None:
                    self.metrics.cache_events.labels(tier="device", event="miss").inc()
                    future = self._loader.submit(self._load, version)
                    self._loading[(task_id, version.version)] = future
            await asyncio.wrap_future(future)
        raise ServerError(503, "overloaded", f"task {task_id} was evicted repeatedly while loading; retry")

    def release(self, lease: Lease) -> None:
        with self._lock:
            if lease.released:
                return
            lease.released = True
            lease.entry.refs -= 1
            if lease.entry.stale and lease.entry.refs == 0:
                self._drop(lease.entry)
            self._update_gauges()

    def _load(self, version: TaskVersion) -> None:
        key = (version.task_id, version.version)
        try:
            start = time.perf_counter()
            with self._lock:
                parked = self.tiers["host"].pop(key, None)
            if parked is not None:
                self.metrics.cache_events.labels(tier="host", event="hit").inc()
                entry = parked
                entry.model.to(self.device)
            else:
                model, manifest = load_artifact(version.path, self.backbone)
                model = model.to(self.device).eval()
                entry = Entry(key, model, manifest, model_bytes(model))
                self.metrics.cold_load_seconds.observe(time.perf_counter() - start)
            with self._lock:
                self._make_room("device", entry.nbytes)
                self.tiers["device"][key] = entry
                self._update_gauges()
        finally:
            with self._lock:
                self._loading.pop(key, None)

    def _make_room(self, tier: str, nbytes: int) -> None:
        """Evicts least-recently-used idle, unpinned entries until ``nbytes`` more fit in ``tier``."""
        budget = self.budgets[tier]
        if nbytes > budget:
            raise ServerError(
                507, "cache_budget", f"a task model of {nbytes} bytes exceeds the {tier} budget {budget}"
            )
        entries = self.tiers[tier]
        while sum(e.nbytes for e in entries.values()) + nbytes > budget:
            victim = next((e for e in entries.values() if e.refs == 0 and e.key[0] not in self.pinned), None)
            if victim is None:
                raise ServerError(
                    503,
                    "overloaded",
                    f"the {tier} tuner cache is full of pinned or in-use tasks",
                    headers={"Retry-After": "1"},
                )
            del entries[victim.key]
            self.metrics.cache_events.labels(tier=tier, event="eviction").inc()
            if tier == "device" and self.budgets["host"] >= victim.nbytes and not victim.stale:
                victim.model.to("cpu")
                self._make_room("host", victim.nbytes)
                self.tiers["host"][victim.key] = victim

    def _drop(self, entry: Entry) -> None:
        for tier in TIERS:
            if self.tiers[tier].get(entry.key) is entry:
                del self.tiers[tier][entry.key]

    def forget(self, task_id: str, keep_version: int | None = None) -> None:
        """Drops a deleted or replaced task's entries; ones in use go when their last user releases them."""
        with self._lock:
            for tier in TIERS:
                for entry in [e for k, e in self.tiers[tier].items() if k[0] == task_id and k[1] != keep_version]:
                    entry.stale = True
                    if entry.refs == 0:
                        self._drop(entry)
            self._update_gauges()

    def _update_gauges(self) -> None:
        for tier in TIERS:
            self.metrics.resident_bytes.labels(tier=tier).set(sum(e.nbytes for e in self.tiers[tier].values()))
