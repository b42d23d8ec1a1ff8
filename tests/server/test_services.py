"""The service layer: Engine and Tasks run without HTTP; routes only parse and call them; every fast
path (compiled task graphs, stacked tasks, one postprocess call) gives the same detections."""

from __future__ import annotations

import ast
import asyncio
import gc
import inspect
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from models.postprocess import PostprocessConfig
from models.runtime import build_runtime
from server.api.routes import detect as detect_routes
from server.api.routes import tasks as task_routes
from server.batcher import Batcher
from server.config import Settings
from server.exceptions import TooManyTasks, UnknownTask
from server.executor import BatchResult, Executor, Prepared, RowTaps, WorkItem
from server.imaging import decode_image
from server.main import create_app
from server.metrics import Metrics
from server.schemas import DetectResponse
from server.services import build_services, warm_batches
from server.stacks import StackCache
from tests.conftest import on_device
from tests.server.conftest import LiveServer, make_artifact, settings
from tuners.artifact import MANIFEST, WEIGHTS, load_artifact
from tuners.compiled import CompiledTask

SIDE = ["linear_probe", "cst", "e3va", "lst", "side_tuning", "hst"]


def _files(artifact: Path) -> tuple[bytes, bytes]:
    return (artifact / WEIGHTS).read_bytes(), (artifact / MANIFEST).read_bytes()


def test_engine_and_tasks_serve_without_http(tmp_path: Path, backbone, artifacts, photo_bytes, device):
    async def run() -> None:
        services = build_services(settings(tmp_path / "store", device=device), on_device(backbone, device))
        services.start()
        try:
            assert services.batcher.first_stages == (2 if device == "cpu" else 1)  # ONNX Runtime's passes at once
            tasks, engine = services.tasks, services.engine
            info = await tasks.publish("a", *_files(artifacts["side1"]))
            assert info.version == 1 and info.residency == "device"  # the validated upload is resident at once
            await tasks.publish("b", *_files(artifacts["inline0"]))
            answer = await engine.detect(photo_bytes, "a,b", PostprocessConfig())
            assert [r.task for r in answer.results] == ["a", "b"] and answer.backbone_passes == 1
            assert (await tasks.pin("b")).pinned and not (await tasks.unpin("b")).pinned
            await tasks.delete("a")
            with pytest.raises(UnknownTask):
                await engine.detect(photo_bytes, ["a"], PostprocessConfig())
            with pytest.raises(TooManyTasks):
                await engine.detect(photo_bytes, [f"t{i}" for i in range(40)], PostprocessConfig())
            assert [t.id for t in (await tasks.list()).tasks] == ["b"]
        finally:
            await services.stop()

    asyncio.run(run())


def test_services_import_without_fastapi():
    code = "import sys, server.services; assert 'fastapi' not in sys.modules and 'starlette' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])


@pytest.mark.parametrize("module", [detect_routes, task_routes])
def test_routes_only_parse_and_call_one_service_method(module):
    """Each route awaits exactly one ``engine.*`` or ``tasks.*`` call, and reaches no cache, store or state."""
    source = inspect.getsource(module)
    for banned in ("app.state", "tuner_cache", "batcher", "store.", "acquire", "release"):
        assert banned not in source, banned
    routes = [n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.AsyncFunctionDef) and n.decorator_list]
    assert routes
    for route in routes:
        calls = [
            a.value.func.value.id
            for a in ast.walk(route)
            if isinstance(a, ast.Await)
            and isinstance(a.value, ast.Call)
            and isinstance(a.value.func, ast.Attribute)
            and isinstance(a.value.func.value, ast.Name)
            and a.value.func.value.id in ("engine", "tasks")
        ]
        assert len(calls) == 1, (route.name, calls)


def test_every_request_dependency_runs_on_the_event_loop():
    """A plain ``def`` dependency costs a worker-thread hop per request; every one here is ``async``."""
    from server import deps

    annotated = [deps.SettingsDep, deps.QuarantinedDep, deps.EngineDep, deps.TasksDep, deps.ServicesDep]
    annotated.append(deps.UploadTurnsDep)
    declared = [*detect_routes.router.dependencies, *task_routes.router.dependencies, *task_routes.ADMIN]
    calls = [a.__metadata__[0].dependency for a in annotated] + [d.dependency for d in declared]
    assert {c.__name__ for c in calls} >= {"ensure_ready", "require_inference", "require_admin", "get_engine"}
    for call in calls:
        assert inspect.iscoroutinefunction(call), call.__name__


def _models(backbone, tmp_path: Path, methods: list[str], seed: int = 0) -> dict[str, object]:  # noqa: ANN001
    """Seeded artifacts of ``methods``, loaded on ``backbone``'s device."""
    device = next(backbone.parameters()).device
    return {
        f"{m}-{i}": load_artifact(make_artifact(backbone, tmp_path, m, seed + i), backbone)[0].to(device)
        for i, m in enumerate(methods)
    }


def _assert_same(a, b, atol: float) -> None:  # noqa: ANN001
    """Same detections: scores in the same order within ``atol``, and each detection of ``a`` matched to
    its own one of ``b`` with the same label, box (original pixels) within ``atol`` relatively and score
    within ``atol``. Matched as sets: detections of equal scores come in either order."""
    assert len(a) == len(b) and len(a) > 0
    torch.testing.assert_close(a.scores, b.scores, rtol=0, atol=atol)
    close = (a.labels[:, None] == b.labels[None, :]) & ((a.scores[:, None] - b.scores[None, :]).abs() <= atol)
    close &= ((a.boxes[:, None] - b.boxes[None, :]).abs() <= atol + atol * b.boxes[None, :].abs()).all(-1)
    free = set(range(len(b)))
    for i, row in enumerate(close.tolist()):
        j = next((j for j in sorted(free) if row[j]), None)
        assert j is not None, f"detection {i} of {len(a)} has no match: {a.labels[i]}, {a.boxes[i]}, {a.scores[i]}"
        free.remove(j)


def test_stacked_tasks_equal_tasks_run_one_by_one(tmp_path: Path, backbone, photos, device):
    backbone = on_device(backbone, device)
    methods = [m for m in SIDE for _ in range(2)] + ["cst"]  # pairs of each method, and a third cst
    models = _models(backbone, tmp_path, methods)
    images = [decode_image(p, 1 << 24, 1 << 26) for p in photos[:2]]
    runtime = build_runtime(backbone, "torch", device)
    plain, stacks = Executor(backbone, runtime, Metrics()), StackCache()
    stacked = Executor(backbone, runtime, Metrics(), stacks=stacks)
    items = [WorkItem(img, str(i), dict(models)) for i, img in enumerate(images)]
    together = stacked.run(items)
    assert stacks.builds == len(SIDE)  # one stack per method (the three cst tasks share one)
    for i, img in enumerate(images):
        for task, model in models.items():
            alone = plain.run([WorkItem(img, str(i), {task: model})]).detections[0][task]
            _assert_same(alone, together.detections[i][task], 1e-4)


def test_stack_is_rebuilt_when_its_tasks_change_and_never_serves_old_weights(tmp_path: Path, backbone, photos, device):
    backbone = on_device(backbone, device)
    a, b, a2 = _models(backbone, tmp_path, ["cst", "cst", "cst"], seed=10).values()
    stacks = StackCache(max_stacks=2)
    executor = Executor(backbone, build_runtime(backbone, "torch", device), Metrics(), stacks=stacks)
    image = decode_image(photos[0], 1 << 24, 1 << 26)
    first = executor.run([WorkItem(image, "x", {"a": a, "b": b})]).detections[0]["a"]
    executor.run([WorkItem(image, "x", {"a": a, "b": b})])
    assert stacks.builds == 1  # the same resident set reuses its stack
    del a  # evicted: its stack must never be found again under a reused id
    replaced = executor.run([WorkItem(image, "x", {"a": a2, "b": b})]).detections[0]["a"]  # a new version of a
    assert stacks.builds == 2
    alone = Executor(backbone, build_runtime(backbone, "torch", device), Metrics()).run(
        [WorkItem(image, "x", {"a": a2})]
    )
    _assert_same(alone.detections[0]["a"], replaced, 1e-4)
    assert not torch.allclose(first.scores[:5], replaced.scores[:5])
    b.generation += 1  # the cache refilled b's object with another task's weights
    executor.run([WorkItem(image, "x", {"a": a2, "b": b})])
    assert stacks.builds == 3


@pytest.mark.parametrize("method", SIDE)
def test_compiled_tasks_agree_with_torch(method: str, tmp_path: Path, backbone, photos):
    model = load_artifact(make_artifact(backbone, tmp_path, method, seed=3), backbone)[0]
    compiled = CompiledTask(model, backbone, tmp_path / "task.onnx", "cpu")
    assert compiled.provider == "CPUExecutionProvider"
    executor = Executor(backbone, build_runtime(backbone, "torch", "cpu"), Metrics())
    images = [decode_image(p, 1 << 24, 1 << 26) for p in photos[:3]]
    plain = executor.run([WorkItem(img, str(i), {"t": model}) for i, img in enumerate(images)])
    fast = executor.run(
        [WorkItem(img, str(i), {"t": model}, compiled={"t": compiled}) for i, img in enumerate(images)]
    )
    for a, b in zip(plain.detections, fast.detections):
        _assert_same(a["t"], b["t"], 1e-3)


def test_uploaded_tasks_compile_in_the_background_and_serve_the_same(tmp_path: Path, backbone, artifacts, photo_bytes):
    async def run() -> None:
        services = build_services(settings(tmp_path / "store", task_runtime="torch"), backbone)
        compiled_services = build_services(settings(tmp_path / "store2"), backbone)
        for s in (services, compiled_services):
            s.start()
        try:
            post = PostprocessConfig()
            for s in (services, compiled_services):
                await s.tasks.publish("t", *_files(artifacts["side1"]))
                await s.engine.detect(photo_bytes, ["t"], post)  # its second use (the upload was the first)
            await _until_compiled(compiled_services, "t")
            assert not (await services.tasks.get("t")).compiled
            answers = [await s.engine.detect(photo_bytes, ["t"], post) for s in (services, compiled_services)]
            for answer in answers:  # built unchecked (model_construct): exactly what checking would build
                assert DetectResponse.model_validate(answer.model_dump(), strict=True) == answer
            _same_answers(answers[0].results[0].detections, answers[1].results[0].detections)
        finally:
            for s in (services, compiled_services):
                await s.stop()

    asyncio.run(run())


def _same_answers(a: list, b: list) -> None:
    """Same API detections within the compiled graphs' tolerance, as sets: the random test tasks
    score many boxes alike, so ties may swap places."""
    assert len(a) == len(b) > 0
    for x in a:
        assert any(
            x["label"] == y["label"]
            and x["score"] == pytest.approx(y["score"], abs=2e-3)
            and x["box"] == pytest.approx(y["box"], abs=0.05)
            for y in b
        ), x


async def _until_compiled(services, task_id: str) -> None:  # noqa: ANN001
    deadline = time.time() + 30
    while not (await services.tasks.get(task_id)).compiled:
        assert time.time() < deadline, "the task never compiled"
        await asyncio.sleep(0.05)


def test_a_new_version_of_a_compiled_task_serves_its_own_weights(tmp_path: Path, backbone, artifacts, photo_bytes):
    """Never stale weights after an upload, on the compiled path: once an upload answers, no request
    gets the old version's graph."""

    async def run() -> None:
        services = build_services(settings(tmp_path / "store"), backbone)
        reference = build_services(settings(tmp_path / "ref", task_runtime="torch"), backbone)
        for s in (services, reference):
            s.start()
        try:
            post = PostprocessConfig()
            await services.tasks.publish("t", *_files(artifacts["side1"]))  # cst
            old = (await services.engine.detect(photo_bytes, ["t"], post)).results[0].detections
            await _until_compiled(services, "t")
            for s in (services, reference):
                await s.tasks.publish("t", *_files(artifacts["side7"]))  # cst too, other weights
            want = (await reference.engine.detect(photo_bytes, ["t"], post)).results[0]
            first = (await services.engine.detect(photo_bytes, ["t"], post)).results[0]
            assert first.version == 2
            _same_answers(want.detections, first.detections)
            await _until_compiled(services, "t")  # v1's graph went with v1; this is v2's
            compiled = (await services.engine.detect(photo_bytes, ["t"], post)).results[0]
            _same_answers(want.detections, compiled.detections)
            with pytest.raises(AssertionError):
                _same_answers(old, compiled.detections)
        finally:
            for s in (services, reference):
                await s.stop()

    asyncio.run(run())


def test_a_fan_out_over_cold_tasks_queues_every_load_at_once(tmp_path: Path, backbone, artifacts, monkeypatch):
    import server.task_reader as module

    real = module.load_artifact

    def slow(folder, bb, **kwargs):  # noqa: ANN001, ANN003, ANN202
        time.sleep(0.3)
        return real(folder, bb, **kwargs)

    async def run() -> None:
        services = build_services(settings(tmp_path / "store", task_runtime="torch"), backbone)
        for name in ("a", "b", "c"):
            services.store.publish(name, *_files(artifacts["side0"]), lambda _: None)
        monkeypatch.setattr(module, "load_artifact", slow)
        waiting = asyncio.create_task(services.tuner_cache.acquire_many([("a", None), ("b", None), ("c", None)]))
        await asyncio.sleep(0.1)  # the first load is still running
        misses = services.metrics.cache_events.labels(tier="device", event="miss")._value.get()
        assert misses == 3
        for lease in await waiting:
            services.tuner_cache.release(lease)
        await services.stop()

    asyncio.run(run())


def test_a_task_reads_its_rows_of_the_batch_taps_without_a_copy():
    batch = {"c4": torch.randn(4, 8, 5, 5)}
    rows = [RowTaps(batch, i) for i in range(4)]
    whole = RowTaps.gather(rows[1:3], "c4")  # consecutive rows of one pass: a view of it
    assert whole.data_ptr() == batch["c4"][1].data_ptr() and torch.equal(whole, batch["c4"][1:3])
    cached = RowTaps({"c4": torch.randn(1, 8, 5, 5)}, 0)  # a feature-cache hit next to a computed row
    mixed = RowTaps.gather([rows[2], cached, rows[0]], "c4")
    assert torch.equal(mixed, torch.cat([batch["c4"][2:3], cached.batch["c4"], batch["c4"][0:1]]))


def test_an_idle_batcher_does_not_wait_out_its_window():
    class Instant:
        def prepare(self, items: list[WorkItem]) -> Prepared:
            return Prepared(items, torch.zeros(0), [], {}, len(items))

        def finish(self, prepared: Prepared) -> BatchResult:
            return BatchResult([{} for _ in prepared.items], prepared.passes)

    async def run() -> float:
        batcher = Batcher(Instant(), Metrics(), max_batch=8, window_s=2.0, max_queue=8)  # type: ignore[arg-type]
        batcher.start()
        start = time.perf_counter()
        await batcher.submit(WorkItem(torch.zeros(3, 8, 8, dtype=torch.uint8), "k", {}))
        took = time.perf_counter() - start
        await batcher.stop()
        return took

    assert asyncio.run(run()) < 0.5  # a 2 s window, not waited out


def test_a_loaded_batcher_batches_what_queued_while_the_last_batch_ran():
    """Window 0 (the default): each batch is every request queued meanwhile, with no wait for more."""
    sizes: list[int] = []

    class Slow:
        def prepare(self, items: list[WorkItem]) -> Prepared:
            sizes.append(len(items))
            time.sleep(0.05)
            return Prepared(items, torch.zeros(0), [], {}, len(items))

        def finish(self, prepared: Prepared) -> BatchResult:
            return BatchResult([{} for _ in prepared.items], prepared.passes)

    async def run() -> None:
        batcher = Batcher(Slow(), Metrics(), max_batch=8, window_s=0.0, max_queue=16)  # type: ignore[arg-type]
        batcher.start()
        item = WorkItem(torch.zeros(3, 8, 8, dtype=torch.uint8), "k", {})
        first = asyncio.ensure_future(batcher.submit(item))
        await asyncio.sleep(0.01)  # the first runs alone; five arrive while it runs
        await asyncio.gather(first, *(batcher.submit(item) for _ in range(5)))
        await batcher.stop()

    asyncio.run(run())
    assert sizes == [1, 5]
    assert Settings().batch_window_ms == 0


def test_cold_loads_reuse_model_objects_and_serve_exactly_what_a_fresh_load_does(
    tmp_path: Path, backbone, photos, monkeypatch
):
    import tuners.artifact as module
    from server.store import TaskStore
    from server.tuner_cache import TunerCache, model_bytes

    built = []
    real = module._build
    monkeypatch.setattr(module, "_build", lambda *a, **k: built.append(1) or real(*a, **k))
    store = TaskStore(tmp_path / "store")
    folders = [make_artifact(backbone, tmp_path, "cst", seed) for seed in (20, 21)]
    for name, folder in zip(("a", "b"), folders):
        store.publish(name, *_files(folder), lambda _: None)
    size = model_bytes(load_artifact(folders[0], backbone)[0])
    cache = TunerCache(store, backbone, torch.device("cpu"), {"device": size, "host": 0}, Metrics())
    stacks = StackCache()
    executor = Executor(backbone, build_runtime(backbone, "torch", "cpu"), Metrics(), stacks=stacks)
    image = decode_image(photos[1], 1 << 24, 1 << 26)

    async def lease_run(task: str) -> tuple[int, object, object]:
        lease = await cache.acquire(task)
        try:
            assert not any(m.training for m in lease.model.modules())  # a refilled model is not put in eval again
            result = executor.run([WorkItem(image, "x", {task: lease.model})]).detections[0][task]
            return id(lease.model), lease.model.generation, result
        finally:
            cache.release(lease)

    async def run() -> None:
        built.clear()
        first = [await lease_run(t) for t in ("a", "b", "a", "b")]
        assert len(built) == 1  # the first load builds a model; the others, b's first load too, refill it
        objects, generations = [obj for obj, _, _ in first], [gen for _, gen, _ in first]
        assert len(set(objects)) == 1 and generations == sorted(set(generations))
        for (_, _, got), folder in zip(first, folders * 2):
            fresh = load_artifact(folder, backbone)[0]
            _assert_same(executor.run([WorkItem(image, "x", {"t": fresh})]).detections[0]["t"], got, 1e-6)
        assert cache.resident_bytes("device") <= size

    asyncio.run(run())
    cache.close()


def test_a_start_builds_spare_models_so_first_loads_build_none(tmp_path: Path, backbone, photo_bytes, monkeypatch):
    """Spares are built at start, one per architecture in turn, the most common first, until the device
    budget is full; a first load then refills one and answers as a fresh load does."""
    import tuners.artifact as module
    from server.store import TaskStore
    from server.tuner_cache import model_bytes

    store = TaskStore(tmp_path / "store")
    folders = [make_artifact(backbone, tmp_path / f"a{seed}", "cst", seed) for seed in (30, 31, 32)]
    folders.append(make_artifact(backbone, tmp_path / "other", "linear_probe", 33))
    for i, folder in enumerate(folders):
        store.publish(f"t{i}", *_files(folder), lambda _: None)
    cst, probe = (model_bytes(load_artifact(folders[i], backbone)[0]) for i in (0, 3))
    built: list[str] = []
    real = module._build
    monkeypatch.setattr(module, "_build", lambda m, *a, **k: built.append(m["method"]) or real(m, *a, **k))
    budget = {"device_cache_bytes": 2 * cst + probe + cst // 2, "host_cache_bytes": 0}

    async def detect(services: object, task: str) -> list[tuple[list[float], float]]:
        services.start()  # type: ignore[attr-defined]
        try:
            answer = await services.engine.detect(photo_bytes, [task], PostprocessConfig())  # type: ignore[attr-defined]
        finally:
            await services.stop()  # type: ignore[attr-defined]
        return [(d["box"], d["score"]) for d in answer.results[0].detections]

    async def run() -> None:
        services = build_services(settings(tmp_path / "store", **budget), backbone)
        assert await services.tasks.build_spares() == 3  # a third cst spare did not fit
        assert built[:3] == ["cst", "linear_probe", "cst"]
        before = len(built)
        got = await detect(services, "t1")
        assert len(built) == before  # t1's first load refilled a spare
        alone = build_services(settings(tmp_path / "alone"), backbone)
        await alone.tasks.publish("t1", *_files(folders[1]))
        assert got and got == await detect(alone, "t1")

    asyncio.run(run())


def test_the_runtime_runs_every_batch_bucket_before_serving(tmp_path: Path, backbone, monkeypatch):
    """On CUDA each size captures a CUDA-graph bucket; no capture may start beside the engine's two
    stages once serving, so every bucket up to the largest batch is run at start."""
    import server.services as module

    sizes: list[int] = []
    real = module.build_runtime

    class Recording:
        def __init__(self, inner: object) -> None:
            self.inner = inner

        def __call__(self, images: torch.Tensor, taps: list[str]) -> dict[str, torch.Tensor]:
            sizes.append(int(images.shape[0]))
            return self.inner(images, taps)  # type: ignore[operator]

        def __getattr__(self, name: str) -> object:
            return getattr(self.inner, name)

    monkeypatch.setattr(module, "build_runtime", lambda *a, **k: Recording(real(*a, **k)))
    services = build_services(settings(tmp_path / "store", max_batch_size=6, concurrent_batches=3), backbone)
    asyncio.run(services.stop())
    assert sizes == [1, 2, 4, 6] == warm_batches(6)
    assert services.batcher.first_stages == 3  # the setting, over the default of 2 on the CPU
    assert warm_batches(1) == [1] and warm_batches(8) == [1, 2, 4, 8] and warm_batches(9) == [1, 2, 4, 8, 9]


def test_a_serving_process_takes_its_startup_heap_out_of_full_collections(tmp_path: Path, backbone):
    """A full collection walking the backbone and the libraries' objects holds the GIL and stalls every
    thread of a loaded server; frozen after start-up (gc.freeze), it does not walk them."""
    with LiveServer(create_app(settings(tmp_path / "store"), backbone=backbone)) as live:
        assert httpx.get(f"{live.url}/readyz").status_code == 200
        frozen = gc.get_freeze_count()
    assert frozen > 10_000  # torch, the app, the backbone: everything alive at start-up
    assert gc.get_freeze_count() == 0  # unfrozen at shutdown, for a process that serves again


def test_on_a_cpu_the_host_tier_budget_joins_the_device_tier() -> None:
    """Parking a model in host memory when the device is host memory only costs a move back (6% of
    the requests served at 100 tasks uniformly); on a GPU the tiers are two memories."""
    from server.services import cache_budgets

    s = Settings(device_cache_bytes=3, host_cache_bytes=5)
    assert cache_budgets(s, torch.device("cpu")) == {"device": 8, "host": 0}
    assert cache_budgets(s, torch.device("cuda")) == {"device": 3, "host": 5}
