"""The batcher: a full queue answers 503 with Retry-After at once, and the server keeps serving;
one batch's tasks run while the next batch's backbone pass runs."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from server.batcher import Batcher
from server.exceptions import Overloaded, SidecarError
from server.executor import BatchResult, Prepared, WorkItem
from server.metrics import Metrics


class BlockingEngine:
    def __init__(self) -> None:
        self.gate = threading.Event()
        self.batches: list[int] = []

    def prepare(self, items: list[WorkItem]) -> Prepared:
        self.gate.wait(10)
        self.batches.append(len(items))
        return Prepared(items, torch.zeros(0), [], {}, len(items))

    def finish(self, prepared: Prepared) -> BatchResult:
        return BatchResult([{} for _ in prepared.items], prepared.passes)


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


class TwoStageEngine:
    """Records the order of the stages; the second stage waits for ``tasks_gate``."""

    def __init__(self) -> None:
        self.tasks_gate = threading.Event()
        self.log: list[str] = []

    def prepare(self, items: list[WorkItem]) -> Prepared:
        self.log.append("backbone " + ",".join(i.image_key for i in items))
        return Prepared(items, torch.zeros(0), [], {}, len(items))

    def finish(self, prepared: Prepared) -> BatchResult:
        self.tasks_gate.wait(10)
        self.log.append("tasks " + ",".join(i.image_key for i in prepared.items))
        if any(i.image_key == "bad" for i in prepared.items):
            raise RuntimeError("a failing batch")
        return BatchResult([{"t": i.image_key} for i in prepared.items], prepared.passes)  # type: ignore[dict-item]


def test_the_next_batch_runs_its_backbone_pass_while_the_last_runs_its_tasks():
    engine = TwoStageEngine()

    def item(key: str) -> WorkItem:
        return WorkItem(torch.zeros(3, 8, 8, dtype=torch.uint8), key, {})

    async def run() -> None:
        batcher = Batcher(engine, Metrics(), max_batch=4, window_s=0, max_queue=8)  # type: ignore[arg-type]
        batcher.start()
        a = asyncio.create_task(batcher.submit(item("a")))
        await asyncio.sleep(0.1)  # a is in its second stage, held there
        b = asyncio.create_task(batcher.submit(item("b")))
        await asyncio.sleep(0.1)
        c = asyncio.create_task(batcher.submit(item("c")))
        await asyncio.sleep(0.1)
        # b's backbone pass ran while a's tasks ran; c waits in the queue, not in the pipeline.
        assert engine.log == ["backbone a", "backbone b"]
        assert batcher.queue.qsize() == 1
        engine.tasks_gate.set()
        assert [(await f)[0]["t"] for f in (a, b, c)] == ["a", "b", "c"]  # each request gets its own result
        assert engine.log[:3] == ["backbone a", "backbone b", "tasks a"]  # c's pass had to wait for a slot
        assert sorted(engine.log[3:]) == ["backbone c", "tasks b", "tasks c"]
        assert engine.log.index("tasks b") < engine.log.index("tasks c")  # second stages keep their order
        with pytest.raises(RuntimeError, match="a failing batch"):  # a failed second stage reaches its requests
            await batcher.submit(item("bad"))
        assert (await batcher.submit(item("d")))[0]["t"] == "d"  # and the batcher goes on
        await batcher.stop()

    asyncio.run(run())
