"""Task models in memory, bounded in bytes: a device tier, a host tier, and the store behind them.

- LRU per tier. An entry evicted from the device tier moves to the host tier (when that has a
  budget), and from there it is dropped; the store on disk is the last tier.
- Pinned tasks and tasks with a reference count above zero (in use by a batch) are never evicted.
- Loads run on their own thread (``tuner-loader``), so a request for a cold task waits for its
  load while requests for resident tasks go straight to the batcher. A request naming several
  cold tasks queues all their loads at once (:meth:`TunerCache.acquire_many`).
- A load reads a version's tensors straight into a preallocated model of the same architecture
  when one is spare (a dropped entry nobody holds, or the idle entry a full tier would drop next;
  spares count against the tier's budget and go first), else into a freshly built one (building
  a model is most of a load: Python module construction). A version is verified in full once
  (sha256, NaN/Inf), at upload or at its first load after a start, whichever model it fills.
- When the device tier is full of tasks that other requests are using, a request waits for room
  (:mod:`server.admission`); one whose tasks cannot fit together even alone gets
  :class:`CacheBudget`. A load whose size is known fails before it reads anything when there is
  no room for it, and a version removed while it loads is looked up again.
- With a ``compiler``, a side task in use is also compiled (ONNX Runtime) on a background
  thread once it has served ``compile_after`` requests while resident (:mod:`server.compiling`);
  it is served in torch until the graph is ready.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from models.backbones.base import FrozenBackbone
from server.admission import Admission, NoRoom, fits, too_big
from server.cache_entries import MAX_SPARES, Entry, Key, Lease, Spares, entry_bytes, model_bytes, to_host
from server.compiling import BackgroundCompiler, Compiler
from server.exceptions import CacheBudget, Overloaded, UnknownVersion
from server.store import TaskVersion, VersionedStore, complete
from server.task_reader import quarantine_damaged, read_version
from tuners.artifact import manifest_architecture, read_manifest
from tuners.errors import ArtifactError
from tuners.task_model import TaskModel

log = logging.getLogger(__name__)
TIERS = ("device", "host")
States = dict[str, tuple[str, bool]]  # task id -> (tier, compiled), for the resident tasks


class VersionGone(UnknownVersion):
    """A version's folder went away while it loaded: replaced and pruned, or deleted."""


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
        wait_s: float = 10.0,
    ) -> None:
        self.store, self.backbone, self.device, self.budgets, self.metrics = store, backbone, device, budgets, metrics
        self.compiling, self.admission = BackgroundCompiler(compiler, compile_after), Admission(wait_s)
        self._spares = Spares()
        self.tiers: dict[str, OrderedDict[Key, Entry]] = {t: OrderedDict() for t in TIERS}
        self._pinned: set[str] = set()
        self._sizes: dict[Key, int] = {}  # versions verified in full, and their entries' bytes
        self._loading: dict[Key, Future] = {}
        self._lock = threading.RLock()
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tuner-loader")
        for tier, budget in budgets.items():
            metrics.budget_bytes.labels(tier=tier).set(budget)

    def close(self) -> None:
        self._loader.shutdown(wait=True, cancel_futures=True)
        self.compiling.close()

    def resident_bytes(self, tier: str) -> int:
        """Bytes of the tier's entries, and of the spare models it keeps (device tier)."""
        with self._lock:
            return self._tier_bytes(tier)

    def _tier_bytes(self, tier: str) -> int:
        spares = self._spares.nbytes if tier == "device" else 0
        return sum(e.nbytes for e in self.tiers[tier].values()) + spares

    def _entry_bytes(self, model: TaskModel) -> int:
        return entry_bytes(model, self.compiling.compiler is not None)

    def states(self) -> States:
        """Per resident task: its tier (the first of ``TIERS`` that holds a version of it) and whether a
        version of it has a compiled graph. One pass over the entries, for a listing of every task."""
        found: States = {}
        with self._lock:
            for tier in TIERS:
                for (task_id, _), entry in self.tiers[tier].items():
                    where, compiled = found.get(task_id, (tier, False))
                    found[task_id] = (where, compiled or entry.compiled is not None)
        return found

    def residency(self, task_id: str) -> str | None:
        return self.states().get(task_id, (None, False))[0]

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
        before waiting on any. A current version replaced and pruned, or deleted, while it loaded is
        looked up again (the next version, or ``UnknownTask``).

        Raises:
            UnknownTask, UnknownVersion: a task or version is not in the store.
            CacheBudget: the tasks' models do not fit the device tier together, even with no other request.
            Overloaded: other requests held the room these tasks need for ``wait_s``.
        """
        lookups = 3
        while True:
            try:
                return await self._admit([self.store.get(task_id, version) for task_id, version in specs])
            except VersionGone:
                lookups -= 1
                if not lookups:
                    raise

    async def _admit(self, versions: list[TaskVersion]) -> list[Lease]:
        """Leases for ``versions``: at once when there is room, else after waiting for it (:mod:`server.admission`).

        A failed try waits for the next release before the next one. Two tries in a row that fail
        while no other request holds anything mean the pinned tasks leave too little room: :class:`CacheBudget`.
        """
        full, idle_failures = None, 0
        if not self.admission.queued:
            try:
                return await self._lease_all(versions)
            except NoRoom as e:
                full = e
        deadline = time.monotonic() + self.admission.wait_s
        async with self.admission.turn():
            failed = False
            while True:
                if full is not None:
                    fits = functools.partial(self._fits, full, versions)
                    await self.admission.wait(fits, deadline, after_release=failed and not idle_failures)
                try:
                    return await self._lease_all(versions)
                except NoRoom as e:
                    full, failed = (e if full is None or e.nbytes > full.nbytes else full), True
                    pinned, busy = self._room(versions)
                    idle_failures = 0 if busy else idle_failures + 1
                    if idle_failures == 2:
                        raise too_big(full, len(versions), self.budgets["device"], pinned) from e

    async def _lease_all(self, versions: list[TaskVersion]) -> list[Lease]:
        """Leases for ``versions``, or none. On :class:`NoRoom`, its ``nbytes`` is what the leases held
        and the load that found no room needed together, and ``tasks`` how many tasks that counts."""
        for version in versions:  # prefetch: the loader works through them while we wait on the first
            with self._lock:
                if (version.task_id, version.version) not in self.tiers["device"]:
                    self._start_load(version)
        leases: list[Lease] = []
        try:
            for version in versions:
                leases.append(await self._acquire(version))
        except NoRoom as e:
            held = {lease.entry.key: lease.entry.nbytes for lease in leases}
            raise NoRoom(e.message, nbytes=sum(held.values()) + e.nbytes, tasks=len(held) + 1) from e
        finally:
            if len(leases) < len(versions):
                for lease in leases:
                    self.release(lease)
        return leases

    def _fits(self, full: NoRoom, versions: list[TaskVersion]) -> bool:
        """Whether the device tier looks able to hold ``versions`` now (:func:`server.admission.fits`)."""
        tasks = len({(v.task_id, v.version) for v in versions})
        return fits(full, tasks, self.budgets["device"], *self._room(versions))

    def _room(self, versions: list[TaskVersion]) -> tuple[int, int]:
        """Bytes of the device tier's entries that are not ``versions``: pinned, and in use by other requests
        (with ``versions`` empty: all that no load may evict)."""
        mine = {(v.task_id, v.version) for v in versions}
        with self._lock:
            others = [e for e in self.tiers["device"].values() if e.key not in mine]
            pinned = sum(e.nbytes for e in others if e.key[0] in self._pinned)
            return pinned, sum(e.nbytes for e in others if e.refs and e.key[0] not in self._pinned)

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
                    self.compiling.used(entry, self.snapshot)
                    return Lease(entry)
                future = self._start_load(version)
            # shielded: a request cancelled while it waits (its client went away) leaves the load to the others
            await asyncio.shield(asyncio.wrap_future(future))
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
        self.admission.released()

    def admit(self, version: TaskVersion, model: TaskModel, manifest: dict[str, Any]) -> None:
        """Makes a model that was just built and verified (an upload) resident, when it fits without waiting."""
        key = (version.task_id, version.version)
        entry = Entry(key, model.to(self.device).eval(), manifest, self._entry_bytes(model))
        entry.uses = 1  # the upload counts as a use: the next request compiles it
        with self._lock:
            self._sizes[key] = entry.nbytes
            try:
                self._make_room("device", entry.nbytes)
            except (CacheBudget, Overloaded):
                return  # loaded on first use instead
            self.tiers["device"][key] = entry
            self._update_gauges()

    def _load(self, version: TaskVersion) -> None:
        """Makes ``version`` resident on the device, from the host tier or else the store.

        Raises:
            NoRoom: the device tier is full of pinned or in-use entries. A version whose size is known
                fails before it is read, and a parked one stays in the host tier.
        """
        key = (version.task_id, version.version)
        try:
            start = time.perf_counter()
            with self._lock:
                parked = self.tiers["host"].get(key)
                self._check_room(parked.nbytes if parked is not None else self._sizes.get(key, 0))
                entry = self.tiers["host"].pop(key, None)
            if entry is not None:
                self.metrics.cache_events.labels(tier="host", event="hit").inc()
                entry.model.to(self.device, non_blocking=True)  # from pinned memory on CUDA
            else:
                try:
                    model, manifest = self._read(version, key)
                except (ArtifactError, OSError) as e:
                    if not complete(version.path):
                        raise VersionGone(f"task {version.task_id!r} has no version {version.version} now") from None
                    if isinstance(e, ArtifactError):  # not OSError: a full file table or a flaky disk passes
                        quarantine_damaged(self.store, version, e)
                    raise
                nbytes = self._sizes.get(key) or self._entry_bytes(model)
                entry = Entry(key, model, manifest, nbytes)
                self._sizes[key] = nbytes  # verified in full by now
                self.metrics.cold_load_seconds.observe(time.perf_counter() - start)
            with self._lock:
                try:
                    self._make_room("device", entry.nbytes)
                except NoRoom:
                    if parked is not None:
                        self._park(entry)
                    raise
                self.tiers["device"][key] = entry
                self._update_gauges()
        finally:
            with self._lock:
                self._loading.pop(key, None)

    def _check_room(self, nbytes: int) -> None:
        """Raises :class:`NoRoom` when ``nbytes`` cannot fit the device tier even by evicting every idle entry."""
        if sum(self._room([])) + nbytes > self.budgets["device"]:
            raise NoRoom("the device tuner cache is full of pinned or in-use tasks", nbytes=nbytes)

    def _read(self, version: TaskVersion, key: Key) -> tuple[TaskModel, dict[str, Any]]:
        """``version`` read into a spare model of its architecture, else into a model built for it."""
        manifest = read_manifest(version.path)
        spare = self._take_spare(manifest_architecture(manifest))
        verified = key in self._sizes
        return read_version(version.path, manifest, self.backbone, self.device, spare, verified), manifest

    def _take_spare(self, arch: str) -> TaskModel | None:
        """A model of ``arch`` to read weights into: a spare, else the idle entry of that architecture
        that is least recently used in the last tier, when that is full (it would be dropped to make
        room anyway; with a host tier, a device entry would be parked there instead)."""
        with self._lock:
            spare = self._spares.take(arch)
            if spare is not None:
                return spare
            tier = "host" if self.budgets["host"] else "device"
            victim = next((e for e in self.tiers[tier].values() if e.arch == arch and self._evictable(e)), None)
            if victim is None or self._tier_bytes(tier) + victim.nbytes <= self.budgets[tier]:
                return None
            del self.tiers[tier][victim.key]
            self.metrics.cache_events.labels(tier=tier, event="eviction").inc()
            return victim.model if tier == "device" else victim.model.to(self.device)

    def add_spare(self, model: TaskModel) -> bool:
        """Keeps ``model`` (built for no task) for the next cold load of its architecture, when it fits
        the device tier beside what is resident; returns whether it was kept."""
        nbytes = model_bytes(model)
        with self._lock:
            if len(self._spares) >= MAX_SPARES or self._tier_bytes("device") + nbytes > self.budgets["device"]:
                return False
            self._spares.add(model.to(self.device), nbytes)
            return True

    def _evictable(self, entry: Entry) -> bool:
        return entry.refs == 0 and entry.key[0] not in self._pinned

    def _keep_spare(self, entry: Entry) -> None:
        """Keeps a dropped, unreferenced entry's model for the next cold load of its architecture (lock held)."""
        model = entry.model
        nbytes = model_bytes(model)
        if entry.refs or self._tier_bytes("device") + nbytes > self.budgets["device"]:
            return
        self._spares.add(model.to(self.device), nbytes)

    def snapshot(self, entry: Entry) -> TaskModel | None:
        """A copy of a resident entry's model, to compile (the loader may refill the model once it is
        evicted; a resident one never is: a spare leaves the tiers first); ``None`` once it has left."""
        with self._lock:
            if entry.stale or not any(entry is e for t in TIERS for e in self.tiers[t].values()):
                return None
            return copy.deepcopy(entry.model)

    def _make_room(self, tier: str, nbytes: int) -> None:
        """Evicts least-recently-used idle, unpinned entries until ``nbytes`` more fit in ``tier``."""
        budget = self.budgets[tier]
        if nbytes > budget:
            raise CacheBudget(f"a task model of {nbytes} bytes exceeds the {tier} budget {budget}")
        entries = self.tiers[tier]
        while self._tier_bytes(tier) + nbytes > budget:
            if tier == "device" and self._spares:
                self._spares.drop_oldest()
                continue
            victim = next((e for e in entries.values() if self._evictable(e)), None)
            if victim is None:
                raise NoRoom(f"the {tier} tuner cache is full of pinned or in-use tasks", nbytes=nbytes)
            del entries[victim.key]
            self.metrics.cache_events.labels(tier=tier, event="eviction").inc()
            if tier == "host" or not self._park(victim):
                self._keep_spare(victim)

    def _park(self, entry: Entry) -> bool:
        """Moves an entry leaving the device tier to the host tier, when that has room for it (lock held)."""
        if self.budgets["host"] < entry.nbytes or entry.stale:
            return False
        to_host(entry.model, pin=self.device.type == "cuda")
        self._make_room("host", entry.nbytes)
        self.tiers["host"][entry.key] = entry
        return True

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
            for key in [k for k in self._sizes if k[0] == task_id and k[1] != keep_version]:
                del self._sizes[key]  # a version loaded again (a rollback) is verified again
            self._update_gauges()

    def _update_gauges(self) -> None:
        for tier in TIERS:
            self.metrics.resident_bytes.labels(tier=tier).set(self._tier_bytes(tier))
