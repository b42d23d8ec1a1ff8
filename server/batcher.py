"""Dynamic batching with backpressure, and a two-stage pipeline behind it.

Requests wait in a bounded queue; when it is full, :meth:`Batcher.submit` raises ``Overloaded``
(503 with Retry-After) at once. A request takes its place as it arrives, before its image is
decoded and its tasks are leased (:meth:`Batcher.admitted`), so requests on their way count against
the queue's bound too: the backlog stays bounded, and an overloaded server turns a request away
before it spends a core on decoding it. One collector task takes the first waiting request and
every other one already queued, up to ``max_batch`` images: under load, the requests that arrived
while the last batch ran. If none was queued behind the first, the server is idle and the batch
runs at once. If others were, and ``window_s`` is set, it gathers more for up to ``window_s``. The
default window is 0, as Triton's ``max_queue_delay_microseconds``: on a CPU a batch of 8 costs per
image what 8 batches of one do, so waiting only idles the executor (``docs/BENCHMARKS.md``).

A batch runs in two stages on worker threads, so no GPU or CPU-heavy work runs on the event
loop: :meth:`Executor.prepare` (the shared backbone pass) and :meth:`Executor.finish` (every
task's tuner and head, and postprocessing). While one batch is in its second stage, the next is
gathered and runs its first, as in a pipelined ensemble: the cores the heads leave idle (small
graphs, NMS, Python) go to the next backbone pass. Up to ``first_stages`` batches run their first
stage at once, as Triton runs several instances of a model: on a CPU, one ONNX Runtime pass leaves
cores idle at its parallel sections' ends, and a second pass fills them (``docs/BENCHMARKS.md``);
on a GPU one is right, and batching does the rest. A batch holds its place until it starts its
second stage, and one batch runs that stage at a time, so the queue, not the pipeline, holds the
backlog.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from server.exceptions import Overloaded
from server.executor import Executor, Prepared, WorkItem
from server.metrics import Metrics

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    item: WorkItem
    future: asyncio.Future
    queued_at: float


class Batcher:
    def __init__(
        self,
        engine: Executor,
        metrics: Metrics,
        max_batch: int,
        window_s: float,
        max_queue: int,
        first_stages: int = 1,
    ) -> None:
        if first_stages < 1:
            raise ValueError(f"first_stages must be at least 1, got {first_stages}")
        self.engine, self.metrics = engine, metrics
        self.max_batch, self.window_s, self.first_stages = max_batch, window_s, first_stages
        self.queue: asyncio.Queue[_Pending] = asyncio.Queue(maxsize=max_queue)
        self._first = ThreadPoolExecutor(max_workers=first_stages, thread_name_prefix="engine-backbone")
        self._second = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine-tasks")
        self._task: asyncio.Task | None = None
        self._running: set[asyncio.Task] = set()
        self._arriving = 0  # requests admitted, not yet queued (decoding, leasing); touched on the event loop only

    def start(self) -> None:
        self._task = asyncio.create_task(self._collect(), name="batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await asyncio.gather(*self._running, return_exceptions=True)
        self._first.shutdown(wait=True)
        self._second.shutdown(wait=True)

    async def submit(self, item: WorkItem) -> tuple[dict, int]:
        """Queues one image; returns (task id -> detections, backbone passes of its batch)."""
        return await self.enqueue(item)

    @contextlib.contextmanager
    def admitted(self) -> Iterator[None]:
        """A request's place on its way to the queue (while its image decodes and its tasks are leased),
        on the event loop; the request is queued with no await after leaving it.

        Raises:
            Overloaded: the queue and the requests already on their way fill ``max_queue``: at once,
                before the request costs any decoding.
        """
        if self._arriving + self.queue.qsize() >= self.queue.maxsize:
            raise self._full()
        self._arriving += 1
        try:
            yield
        finally:
            self._arriving -= 1

    def _full(self) -> Overloaded:
        return Overloaded(f"the request queue is full ({self.queue.maxsize}); retry shortly")

    def enqueue(self, item: WorkItem) -> asyncio.Future:
        """Queues one image. The future gets (task id -> detections, backbone passes of its batch) when
        the item's batch is done, or the batch's error; the batch runs the item even if nobody waits.

        Raises:
            Overloaded: the queue is full.
        """
        future = asyncio.get_running_loop().create_future()
        try:
            self.queue.put_nowait(_Pending(item, future, time.perf_counter()))
        except asyncio.QueueFull:
            raise self._full() from None
        self.metrics.queue_depth.set(self.queue.qsize())
        return future

    async def _gather(self) -> list[_Pending]:
        batch = [await self.queue.get()]
        if self.queue.empty():
            return batch  # idle: nobody else is waiting, so waiting out the window only adds latency
        deadline = time.perf_counter() + self.window_s
        while len(batch) < self.max_batch:
            try:
                batch.append(self.queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            left = deadline - time.perf_counter()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self.queue.get(), left))
            except TimeoutError:
                break
        return batch

    async def _collect(self) -> None:
        places = asyncio.Semaphore(self.first_stages)  # batches in their first stage, or waiting for the second
        slot = asyncio.Semaphore(1)  # one batch in its second stage while others run their first
        while True:
            await places.acquire()
            batch = await self._gather()
            self.metrics.queue_depth.set(self.queue.qsize())
            now = time.perf_counter()
            for p in batch:
                self.metrics.stage_seconds.labels(stage="queue").observe(now - p.queued_at)
            running = asyncio.create_task(self._run(batch, places, slot))
            self._running.add(running)
            running.add_done_callback(self._running.discard)

    async def _run(self, batch: list[_Pending], places: asyncio.Semaphore, slot: asyncio.Semaphore) -> None:
        """Both stages of ``batch``: its place is given back once it holds the second stage's slot."""
        try:
            prepared = await asyncio.get_running_loop().run_in_executor(
                self._first, self.engine.prepare, [p.item for p in batch]
            )
        except Exception as e:  # noqa: BLE001  (delivered to each waiting request)
            places.release()
            self._fail(batch, e)
            return
        await slot.acquire()
        places.release()
        await self._finish(batch, prepared, slot)

    async def _finish(self, batch: list[_Pending], prepared: Prepared, slot: asyncio.Semaphore) -> None:
        try:
            result = await asyncio.get_running_loop().run_in_executor(self._second, self.engine.finish, prepared)
        except Exception as e:  # noqa: BLE001  (as in _run)
            self._fail(batch, e)
            return
        finally:
            slot.release()
        for p, detections in zip(batch, result.detections):
            if not p.future.done():
                p.future.set_result((detections, result.backbone_passes))

    @staticmethod
    def _fail(batch: list[_Pending], error: Exception) -> None:
        log.error("engine failed on a batch of %d", len(batch), exc_info=error)
        for p in batch:
            if not p.future.done():
                p.future.set_exception(error)
