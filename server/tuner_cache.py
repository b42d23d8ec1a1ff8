"""Task models in memory, bounded in bytes: a device tier, a host tier, and the store behind them.

- LRU per tier. An entry evicted from the device tier moves to the host tier (when that has a
  budget), and from there it is dropped; the store on disk is the last tier.
- Pinned tasks and tasks with a reference count above zero (in use by a batch) are never evicted.
- Loads run on their own thread (``tuner-loader``), so a request for a cold task waits for its
  load while requests for resident tasks go straight to the batcher. A request naming several
  cold tasks queues all their loads at once (:meth:`TunerCache.acquire_many`).
- A version is verified in full once (sha256, NaN/Inf) at upload or first load. Later reloads
  read its tensors straight into a preallocated model of the same architecture when one is spare
  (a dropped entry nobody holds; spares count against the tier's budget and go first), else into
  a freshly built one (building a model is Python module construction; reading fills its tensors).
- With a ``compiler``, a side task in use is also compiled (ONNX Runtime) on a background
  thread once it has served ``compile_after`` requests while resident (tiered, as JITs do: tasks
  that churn through the cache never pay for it); it is served in torch until the graph is ready.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from models.backbones.base import FrozenBackbone
from server.exceptions import CacheBudget, Overloaded
from server.store import TaskVersion, VersionedStore
from tuners.artifact import WEIGHTS, load_artifact, read_into, read_manifest
from tuners.compiled import CompiledTask
from tuners.task_model import TaskModel, architecture_key

log = logging.getLogger(__name__)
Key = tuple[str, int]  # (task id, version)
TIERS = ("device", "host")
MAX_SPARES = 8  # spare models kept for reuse, across architectures
Compiler = Callable[[TaskModel, dict[str, Any]], CompiledTask]


def model_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def to_host(model: torch.nn.Module, pin: bool) -> None:
    """Moves ``model`` to host memory, page-locked when ``pin`` (a GPU reads it back with non-blocking copies)."""
    model.to("cpu")
    if pin:
        for t in [*model.parameters(), *model.buffers()]:
            t.data = t.data.pin_memory()


def entry_bytes(model: TaskModel, compiles: bool) -> int:
    """What an entry costs: its tensors, twice for a side task that will also hold a compiled graph."""
    return model_bytes(model) * (2 if compiles and model.kind == "side" else 1)


@dataclass
class Entry:
    key: Key
    model: TaskModel
    manifest: dict[str, Any]
    nbytes: int
    refs: int = 0
    stale: bool = False  # deleted or replaced: dropped when the last user releases it
    compiled: CompiledTask | None = None
    uses: int = 0  # requests served while resident
    arch: str = ""  # TaskModel.architecture, for reusing the model object

    def __post_init__(self) -> None:
        self.arch = self.arch or self.model.architecture


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

    @property
    def compiled(self) -> CompiledTask | None:
        return self.entry.compiled


class TunerCache:
    """Byte-budgeted two-tier LRU of task models with pins and reference counts."""

    def __init__(
        self,
        store: VersionedStore,
        backbone: FrozenBackbone,
        device: torch.device,
        budgets: dict[str, int],
        metrics: Any,
        compiler: Compiler | None = None,
        compile_after: int = 2,
    ) -> None:
        self.store, self.backbone, self.device, self.budgets, self.metrics = store, backbone, device, budgets, metrics
        self.compiler, self.compile_after = compiler, compile_after
        self._spares: OrderedDict[int, tuple[str, TaskModel, int]] = OrderedDict()  # id -> (arch, model, bytes)
        self.tiers: dict[str, OrderedDict[Key, Entry]] = {t: OrderedDict() for t in TIERS}
        self._pinned: set[str] = set()
        self._verified: set[Key] = set()
        self._loading: dict[Key, Future] = {}
        self._lock = threading.RLock()
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tuner-loader")
        self._compile = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tuner-compiler")
        for tier, budget in budgets.items():
            metrics.budget_bytes.labels(tier=tier).set(budget)

    def close(self) -> None:
        self._loader.shutdown(wait=True, cancel_futures=True)
        self._compile.shutdown(wait=True, cancel_futures=True)

    def resident_bytes(self, tier: str) -> int:
        """Bytes of the tier's entries, and of the spare models it keeps (device tier)."""
        with self._lock:
            return self._tier_bytes(tier)

    def _tier_bytes(self, tier: str) -> int:
        spares = sum(b for _, _, b in self._spares.values()) if tier == "device" else 0
        return sum(e.nbytes for e in self.tiers[tier].values()) + spares

    def residency(self, task_id: str) -> str | None:
        with self._lock:
            return next((t for t in TIERS for k in self.tiers[t] if k[0] == task_id), None)

    def is_compiled(self, task_id: str) -> bool:
        with self._lock:
            return any(e.compiled is not None for t in TIERS for k, e in self.tiers[t].items() if k[0] == task_id)

    def is_pinned(self, task_id: str) -> bool:
        return task_id in self._pinned

    def pinned(self) -> list[str]:
        """The pinned task ids."""
        return sorted(self._pinned)

    async def pin(self, task_id: str) -> None:
        """Loads ``task_id`` and keeps it resident on the device until :meth:`unpin`."""
        with self._lock:
            was = task_id in self._pinned
            self._pinned.add(task_id)
        try:
            self.release(await self.acquire(task_id))
        except Exception:
            if not was:
                self._pinned.discard(task_id)
            raise

    def unpin(self, task_id: str) -> None:
        self._pinned.discard(task_id)

    async def acquire(self, task_id: str, version: int | None = None) -> Lease:
        """``task_id`` at ``version`` (default: current), resident on the device and referenced until released."""
        return (await self.acquire_many([(task_id, version)]))[0]

    async def acquire_many(self, specs: list[tuple[str, int | None]]) -> list[Lease]:
        """Leases for every (task, version or current), in order. The loads of all cold ones are queued
        before waiting on any."""
        versions = [self.store.get(task_id, version) for task_id, version in specs]
        for version in versions:  # prefetch: the loader works through them while we wait on the first
            with self._lock:
                if (version.task_id, version.version) not in self.tiers["device"]:
                    self._start_load(version)
        leases: list[Lease] = []
        try:
            for version in versions:
                leases.append(await self._acquire(version))
        except BaseException:
            for lease in leases:
                self.release(lease)
            raise
        return leases

    async def _acquire(self, version: TaskVersion) -> Lease:
        key = (version.task_id, version.version)
        for _ in range(8):  # a just-loaded entry can be evicted before we take it, under heavy churn
            with self._lock:
                entry = self.tiers["device"].get(key)
                if entry is not None:
                    entry.refs += 1
                    entry.uses += 1
                    self.tiers["device"].move_to_end(key)
                    self.metrics.cache_events.labels(tier="device", event="hit").inc()
                    if entry.uses == self.compile_after:
                        self._schedule_compile(entry)
                    return Lease(entry)
                future = self._start_load(version)
            await asyncio.wrap_future(future)
        raise Overloaded(f"task {version.task_id} was evicted repeatedly while loading; retry")

    def _start_load(self, version: TaskVersion) -> Future:
        """The running load of ``version``, or a new one (call with the lock held)."""
        key = (version.task_id, version.version)
        future = self._loading.get(key)
        if future is None:
            self.metrics.cache_events.labels(tier="device", event="miss").inc()
            future = self._loading[key] = self._loader.submit(self._load, version)
        return future

    def release(self, lease: Lease) -> None:
        with self._lock:
            if lease.released:
                return
            lease.released = True
            lease.entry.refs -= 1
            if lease.entry.stale and lease.entry.refs == 0:
                self._drop(lease.entry)
                self._update_gauges()  # only a drop changes what is resident

    def admit(self, version: TaskVersion, model: TaskModel, manifest: dict[str, Any]) -> None:
        """Makes a model that was just built and verified (an upload) resident, when it fits without waiting."""
        key = (version.task_id, version.version)
        entry = Entry(key, model.to(self.device).eval(), manifest, entry_bytes(model, self.compiler is not None))
        entry.uses = 1  # the upload counts as a use: the next request compiles it
        with self._lock:
            self._verified.add(key)
            try:
                self._make_room("device", entry.nbytes)
            except (CacheBudget, Overloaded):
                return  # loaded on first use instead
            self.tiers["device"][key] = entry
            self._update_gauges()

    def _load(self, version: TaskVersion) -> None:
        key = (version.task_id, version.version)
        try:
            start = time.perf_counter()
            with self._lock:
                entry = self.tiers["host"].pop(key, None)
            if entry is not None:
                self.metrics.cache_events.labels(tier="host", event="hit").inc()
                entry.model.to(self.device, non_blocking=True)  # from pinned memory on CUDA
            else:
                model, manifest = self._read(version, key)
                entry = Entry(key, model, manifest, entry_bytes(model, self.compiler is not None))
                self.metrics.cold_load_seconds.observe(time.perf_counter() - start)
            with self._lock:
                self._make_room("device", entry.nbytes)
                self.tiers["device"][key] = entry
                self._update_gauges()
        finally:
            with self._lock:
                self._loading.pop(key, None)

    def _read(self, version: TaskVersion, key: Key) -> tuple[TaskModel, dict[str, Any]]:
        """A verified version read into a spare model of its architecture, else a full (first) load."""
        if key in self._verified:
            manifest = read_manifest(version.path)
            arch = architecture_key(manifest["method"], manifest["config"], manifest["head"], len(manifest["labels"]))
            spare = self._take_spare(arch)
            if spare is not None:
                problems = read_into(version.path / WEIGHTS, spare.state_dict())
                if not problems:
                    # a new generation: whatever held this object (a stack) must not take it for the old task
                    spare.labels, spare.generation = list(manifest["labels"]), spare.generation + 1
                    return spare.eval(), manifest
                log.warning("task %s v%d did not fit a spare model (%s); building it", *key, problems[0])
        model, manifest = load_artifact(version.path, self.backbone, verify=key not in self._verified, from_store=True)
        self._verified.add(key)
        return model.to(self.device).eval(), manifest

    def _take_spare(self, arch: str) -> TaskModel | None:
        """A model of ``arch`` to read weights into: a spare, else the idle entry of that architecture
        that is least recently used in a tier that is full (it would be dropped to make room anyway)."""
        with self._lock:
            found = next((k for k, (a, _, _) in self._spares.items() if a == arch), None)
            if found is not None:
                return self._spares.pop(found)[1]
            for tier in ("host", "device") if self.budgets["host"] else ("device",):
                victim = next((e for e in self.tiers[tier].values() if e.arch == arch and self._evictable(e)), None)
                if victim is not None and self._tier_bytes(tier) + victim.nbytes > self.budgets[tier]:
                    del self.tiers[tier][victim.key]
                    self.metrics.cache_events.labels(tier=tier, event="eviction").inc()
                    return victim.model.to(self.device)
            return None

    def _evictable(self, entry: Entry) -> bool:
        return entry.refs == 0 and entry.key[0] not in self._pinned

    def _keep_spare(self, entry: Entry) -> None:
        """Keeps a dropped, unreferenced entry's model for the next cold load of its architecture (lock held)."""
        model = entry.model
        nbytes = model_bytes(model)
        if entry.refs or self._tier_bytes("device") + nbytes > self.budgets["device"]:
            return
        model.to(self.device)
        self._spares[id(model)] = (model.architecture, model, nbytes)
        while len(self._spares) > MAX_SPARES:
            self._spares.popitem(last=False)

    def _schedule_compile(self, entry: Entry) -> None:
        if self.compiler is None or entry.compiled is not None or entry.model.kind != "side":
            return

        def compile_entry() -> None:
            if entry.stale or not any(entry is e for t in TIERS for e in self.tiers[t].values()):
                return  # dropped while waiting
            try:
                entry.compiled = self.compiler(entry.model, entry.manifest)  # type: ignore[misc]
            except Exception:  # noqa: BLE001  (the task keeps serving in torch)
                log.exception("compiling task %s v%d failed; it is served in torch", *entry.key)

        self._compile.submit(compile_entry)

    def _make_room(self, tier: str, nbytes: int) -> None:
        """Evicts least-recently-used idle, unpinned entries until ``nbytes`` more fit in ``tier``."""
        budget = self.budgets[tier]
        if nbytes > budget:
            raise CacheBudget(f"a task model of {nbytes} bytes exceeds the {tier} budget {budget}")
        entries = self.tiers[tier]
        while self._tier_bytes(tier) + nbytes > budget:
            if tier == "device" and self._spares:
                self._spares.popitem(last=False)
                continue
            victim = next((e for e in entries.values() if self._evictable(e)), None)
            if victim is None:
                raise Overloaded(f"the {tier} tuner cache is full of pinned or in-use tasks")
            del entries[victim.key]
            self.metrics.cache_events.labels(tier=tier, event="eviction").inc()
            if tier == "device" and self.budgets["host"] >= victim.nbytes and not victim.stale:
                to_host(victim.model, pin=self.device.type == "cuda")
                self._make_room("host", victim.nbytes)
                self.tiers["host"][victim.key] = victim
            else:
                self._keep_spare(victim)

    def _drop(self, entry: Entry) -> None:
        for tier in TIERS:
            if self.tiers[tier].get(entry.key) is entry:
                del self.tiers[tier][entry.key]
        self._keep_spare(entry)

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
            self.metrics.resident_bytes.labels(tier=tier).set(self._tier_bytes(tier))
