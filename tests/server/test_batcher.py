"""The batcher: a full queue answers 503 with Retry-After at once, before the request's image is
decoded, and the server keeps serving;
one batch's tasks run while the next batch's backbone pass runs; up to ``first_stages`` batches run
their backbone pass at once, outside the executor's lock only on a runtime that allows it."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from models.postprocess import PostprocessConfig
from models.runtime import build_runtime
from server.batcher import Batcher
from server.exceptions import NotAnImage, Overloaded, SidecarError, UnknownTask
from server.executor import BatchResult, Executor, Prepared, WorkItem
from server.metrics import Metrics
from server.services import build_services
from tests.server.conftest import settings
from tuners import build_task_model


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


def test_requests_decoding_hold_places_in_the_queue():
    """Requests on their way to the queue (decoding their image) count against ``max_queue``: one
    more is turned away as it arrives, and the place comes back when the request leaves."""
    item = WorkItem(torch.zeros(3, 8, 8, dtype=torch.uint8), "k", {})

    async def run() -> None:
        batcher = Batcher(BlockingEngine(), Metrics(), max_batch=2, window_s=0, max_queue=2)  # type: ignore[arg-type]
        with batcher.admitted():
            batcher.enqueue(item)  # one queued, one decoding: full
            with pytest.raises(Overloaded, match=r"queue is full \(2\)"), batcher.admitted():
                pass
        with batcher.admitted():  # the decoding one left: a place again
            pass
        await batcher.stop()

    asyncio.run(run())


def test_an_overloaded_engine_turns_a_request_away_before_decoding_it(tmp_path: Path, backbone, photo_bytes):
    """With the queue's places taken, a request gets 503 (Overloaded) at once: bytes that are no
    image would otherwise have been found out (415) by decoding them, a core's milliseconds each.
    A request waiting for its tasks to load holds its place too, so the backlog stays bounded."""

    async def run() -> None:
        services = build_services(settings(tmp_path / "store", max_queue=3), backbone)
        services.start()
        engine, loaded = services.engine, asyncio.Event()
        try:
            with contextlib.ExitStack() as places:
                for _ in range(3):
                    places.enter_context(services.batcher.admitted())
                with pytest.raises(Overloaded):
                    await engine.detect(b"not an image", "a", PostprocessConfig())
            with pytest.raises(NotAnImage):  # with room, the same request is decoded
                await engine.detect(b"not an image", "a", PostprocessConfig())

            async def slow_load(specs: list) -> list:
                await loaded.wait()
                raise UnknownTask("no task 'a'")

            services.engine.cache.acquire_many = slow_load  # type: ignore[method-assign]
            waiting = [asyncio.create_task(engine.detect(photo_bytes, "a", PostprocessConfig())) for _ in range(3)]
            await asyncio.sleep(0.5)  # decoded, and waiting for their task
            with pytest.raises(Overloaded):
                await engine.detect(b"not an image", "a", PostprocessConfig())
            loaded.set()
            assert all(isinstance(r, UnknownTask) for r in await asyncio.gather(*waiting, return_exceptions=True))
            with pytest.raises(NotAnImage):  # their places came back
                await engine.detect(b"not an image", "a", PostprocessConfig())
        finally:
            await services.stop()

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


class MeetingEngine:
    """Each first stage waits at a barrier of ``parties``: it passes only if that many run at once."""

    def __init__(self, parties: int) -> None:
        self.barrier = threading.Barrier(parties, timeout=5)
        self.lock = threading.Lock()
        self.running = self.most = 0

    def prepare(self, items: list[WorkItem]) -> Prepared:
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
        self.barrier.wait()
        with self.lock:
            self.running -= 1
        return Prepared(items, torch.zeros(0), [], {}, len(items))

    def finish(self, prepared: Prepared) -> BatchResult:
        return BatchResult([{"t": i.image_key} for i in prepared.items], prepared.passes)  # type: ignore[dict-item]


@pytest.mark.parametrize("first_stages", [1, 2, 3])
def test_up_to_first_stages_batches_run_their_backbone_pass_at_once(first_stages: int):
    """With ``first_stages`` = N, N single-request batches meet inside their first stage (a barrier of N);
    never more, and every request gets its own result."""
    engine = MeetingEngine(first_stages)

    def item(key: str) -> WorkItem:
        return WorkItem(torch.zeros(3, 8, 8, dtype=torch.uint8), key, {})

    async def run() -> list[str]:
        batcher = Batcher(engine, Metrics(), max_batch=1, window_s=0, max_queue=16, first_stages=first_stages)  # type: ignore[arg-type]
        batcher.start()
        keys = [str(i) for i in range(3 * first_stages)]
        answers = await asyncio.gather(*(batcher.submit(item(k)) for k in keys))
        await batcher.stop()
        return [a[0]["t"] for a in answers]

    assert asyncio.run(run()) == [str(i) for i in range(3 * first_stages)]
    assert engine.most == first_stages


def test_batches_waiting_for_the_second_stage_keep_their_places():
    """While one batch's second stage is held, at most ``first_stages`` more leave the queue."""
    engine = TwoStageEngine()

    def item(key: str) -> WorkItem:
        return WorkItem(torch.zeros(3, 8, 8, dtype=torch.uint8), key, {})

    async def run() -> None:
        batcher = Batcher(engine, Metrics(), max_batch=1, window_s=0, max_queue=16, first_stages=2)  # type: ignore[arg-type]
        batcher.start()
        futures = [asyncio.create_task(batcher.submit(item(k))) for k in "abcdef"]
        await asyncio.sleep(0.3)
        assert engine.log == ["backbone a", "backbone b", "backbone c"]  # a in its second stage; b and c wait
        assert batcher.queue.qsize() == 3
        engine.tasks_gate.set()
        assert [(await f)[0]["t"] for f in futures] == list("abcdef")
        await batcher.stop()

    asyncio.run(run())


def test_a_failed_first_stage_gives_its_place_back():
    class Failing(TwoStageEngine):
        def prepare(self, items: list[WorkItem]) -> Prepared:
            if items[0].image_key == "bad":
                raise RuntimeError("a failing pass")
            return super().prepare(items)

    engine = Failing()
    engine.tasks_gate.set()

    async def run() -> None:
        batcher = Batcher(engine, Metrics(), max_batch=1, window_s=0, max_queue=16, first_stages=1)  # type: ignore[arg-type]
        batcher.start()
        for _ in range(3):
            with pytest.raises(RuntimeError, match="a failing pass"):
                await batcher.submit(WorkItem(torch.zeros(3, 8, 8, dtype=torch.uint8), "bad", {}))
        assert (await batcher.submit(WorkItem(torch.zeros(3, 8, 8, dtype=torch.uint8), "ok", {})))[0]["t"] == "ok"
        await batcher.stop()

    asyncio.run(run())


class RecordingRuntime:
    """A runtime that records whether the executor's lock was held when it built a graph and ran a pass."""

    def __init__(self, inner: object, concurrent: bool) -> None:
        self.inner, self.concurrent = inner, concurrent
        self.backbone, self.device, self.provider = inner.backbone, inner.device, inner.provider  # type: ignore[attr-defined]
        self.lock: threading.Lock | None = None
        self.held: dict[str, set[bool]] = {"prepare": set(), "pass": set()}

    def prepare(self, taps: list[str]) -> None:
        self.held["prepare"].add(self.lock.locked())  # type: ignore[union-attr]
        self.inner.prepare(taps)  # type: ignore[attr-defined]

    def __call__(self, images: torch.Tensor, taps: list[str]) -> dict[str, torch.Tensor]:
        self.held["pass"].add(self.lock.locked())  # type: ignore[union-attr]
        return self.inner(images, taps)  # type: ignore[operator]


@pytest.mark.parametrize("concurrent", [True, False])
def test_only_a_concurrent_runtime_runs_its_pass_outside_the_lock(tmp_path: Path, backbone, concurrent: bool):
    """Inline tasks swap weights into the torch backbone under the executor's lock: a concurrent runtime
    (ONNX Runtime) builds its graph for new taps under it, then runs the pass without it; others hold it."""
    inner = build_runtime(backbone, "onnx" if concurrent else "torch", "cpu", cache_dir=tmp_path)
    runtime = RecordingRuntime(inner, concurrent)
    executor = Executor(backbone, runtime, Metrics())  # type: ignore[arg-type]
    runtime.lock = executor.lock
    model = build_task_model("linear_probe", {}, backbone, ["a"]).eval()
    executor.prepare([WorkItem(torch.zeros(3, 64, 64, dtype=torch.uint8), "k", {"t": model})])
    assert runtime.held == ({"prepare": {True}, "pass": {False}} if concurrent else {"prepare": set(), "pass": {True}})


def test_first_stages_on_several_threads_count_every_pass_and_answer_as_one_at_a_time(tmp_path: Path, backbone):
    """Invariant 4's counter under batches' first stages on 4 threads, and each row's taps equal to a
    pass run alone (ONNX Runtime passes at once)."""
    runtime = build_runtime(backbone, "onnx", "cpu", cache_dir=tmp_path)
    executor = Executor(backbone, runtime, Metrics())
    model = build_task_model("linear_probe", {}, backbone, ["a"]).eval()
    images = [
        torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(i))
        for i in range(8)
    ]
    items = [[WorkItem(img, str(i), {"t": model})] for i, img in enumerate(images)]
    alone = [executor.prepare(batch).side_rows[0].batch for batch in items]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda batch: executor.prepare(batch).side_rows[0].batch, items * 4))
    assert executor.backbone_image_passes == 8 + 32
    for i, taps in enumerate(together):
        assert all(torch.allclose(taps[t], alone[i % 8][t], atol=1e-6) for t in taps)
