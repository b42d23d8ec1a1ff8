"""Backpressure: a full queue answers 503 with Retry-After at once, and the server keeps serving."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from server.batcher import Batcher
from server.exceptions import Overloaded, SidecarError
from server.executor import BatchResult, WorkItem
from server.metrics import Metrics


class BlockingEngine:
    def __init__(self) -> None:
        self.gate = threading.Event()
        self.batches: list[int] = []

    def run(self, items: list[WorkItem]) -> BatchResult:
        self.gate.wait(10)
        self.batches.append(len(items))
        return BatchResult([{} for _ in items], len(items))


def test_full_queue_answers_503_then_recovers():
    engine = BlockingEngine()
    item = WorkItem(torch.zeros(3, 8, 8, dtype=torch.uint8), "k", {})

    async def run() -> None:
        batcher = Batcher(engine, Metrics(), max_batch=2, window_s=0.01, max_queue=2)  # type: ignore[arg-type]
        batcher.start()
        first = asyncio.create_task(batcher.submit(item))  # taken by the engine, which blocks
        await asyncio.sleep(0.1)
        queued = [asyncio.create_task(batcher.submit(item)) for _ in range(2)]
        await asyncio.sleep(0.05)
        with pytest.raises(SidecarError) as e:
            await batcher.submit(item)
        assert isinstance(e.value, Overloaded) and e.value.retry_after == 1  # 503 with Retry-After: 1
        engine.gate.set()
        await asyncio.gather(first, *queued)
        assert engine.batches == [1, 2]  # the two queued requests ran as one batch
        await batcher.stop()

    asyncio.run(run())
