"""Dynamic batching with backpressure.

Requests wait in a bounded queue; when it is full, :meth:`Batcher.submit` raises ``Overloaded``
(503 with Retry-After) at once. One collector task takes the first waiting request and every
other one already queued, up to ``max_batch`` images: under load, the requests that arrived while
the last batch ran. If none was queued behind the first, the server is idle and the batch runs at
once. If others were, and ``window_s`` is set, it gathers more for up to ``window_s``. The
default window is 0, as Triton's ``max_queue_delay_microseconds``: on a CPU a batch of 8 costs
per image what 8 batches of one do, so waiting only idles the executor (``docs/BENCHMARKS.md``).
The executor runs on a single worker thread, so no GPU or CPU-heavy work runs on the event loop;
requests that arrive while it runs form the next batch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from server.exceptions import Overloaded
from server.executor import BatchResult, Executor, WorkItem
from server.metrics import Metrics

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    item: WorkItem
    future: asyncio.Future
    queued_at: float


class Batcher:
    def __init__(self, engine: Executor, metrics: Metrics, max_batch: int, window_s: float, max_queue: int) -> None:
        self.engine, self.metrics = engine, metrics
        self.max_batch, self.window_s = max_batch, window_s
        self.queue: asyncio.Queue[_Pending] = asyncio.Queue(maxsize=max_queue)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._collect(), name="batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._executor.shutdown(wait=True)

    async def submit(self, item: WorkItem) -> tuple[dict, int]:
        """Queues one image; returns (task id -> detections, backbone passes of its batch)."""
        future = asyncio.get_running_loop().create_future()
        try:
            self.queue.put_nowait(_Pending(item, future, time.perf_counter()))
        except asyncio.QueueFull:
            raise Overloaded(f"the request queue is full ({self.queue.maxsize}); retry shortly") from None
        self.metrics.queue_depth.set(self.queue.qsize())
        return await future

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
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._gather()
            self.metrics.queue_depth.set(self.queue.qsize())
            now = time.perf_counter()
            for p in batch:
                self.metrics.stage_seconds.labels(stage="queue").observe(now - p.queued_at)
            try:
                result: BatchResult = await loop.run_in_executor(
                    self._executor, self.engine.run, [p.item for p in batch]
                )
            except Exception as e:  # noqa: BLE001  (delivered to each waiting request)
                log.exception("engine failed on a batch of %d", len(batch))
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(e)
                continue
            for p, detections in zip(batch, result.detections):
                if not p.future.done():
                    p.future.set_result((detections, result.backbone_passes))
