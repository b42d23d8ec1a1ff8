"""Builds the services (``Engine``, ``Tasks``) and what they share from ``Settings``; no HTTP.

The FastAPI app's lifespan and the Ray Serve replicas both call :func:`build_services`, then
``start()`` and ``stop()``, so every front end serves the same objects.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from models import build_backbone
from models.backbones.base import FrozenBackbone
from models.runtime import build_runtime
from models.runtime.torch import BackboneRuntime, default_runtime, resolve_device, set_float32_precision
from models.transform import PreprocessSpec
from server.batcher import Batcher
from server.compiling import Compiler, trim_graphs
from server.config import Settings
from server.engine import Engine, Limits
from server.executor import Executor
from server.feature_cache import FeatureCache
from server.metrics import Metrics
from server.object_store import ObjectTaskStore
from server.stacks import StackCache
from server.store import TaskStore, VersionedStore
from server.tasks import Tasks
from server.tuner_cache import TunerCache
from tuners.compiled import CompiledTask, graph_key
from tuners.task_model import TaskModel

log = logging.getLogger(__name__)


def load_backbone(settings: Settings) -> FrozenBackbone:
    return build_backbone(
        settings.backbone,
        weights=settings.weights,
        allow_download=settings.allow_download,
        preprocess=PreprocessSpec(size=settings.image_size),
    )


@dataclass
class Services:
    """Everything one serving process holds; ``engine`` and ``tasks`` are the two entry points."""

    settings: Settings
    metrics: Metrics
    store: VersionedStore
    tuner_cache: TunerCache
    executor: Executor
    batcher: Batcher
    engine: Engine
    tasks: Tasks

    def start(self) -> None:
        """Starts the batcher; call from the event loop that will serve requests."""
        self.batcher.start()

    async def stop(self) -> None:
        await self.batcher.stop()
        self.tuner_cache.close()
        self.executor.close()

    async def metrics_text(self) -> bytes:
        """This process's Prometheus metrics (a Ray ingress merges its replicas' instead), rendered on a
        worker thread: each task that has served requests adds its latency histogram."""
        return await asyncio.to_thread(self.metrics.render)

    async def quarantined(self) -> dict[str, str]:
        """Quarantined task id -> why it is not served."""
        return dict(self.store.quarantined)


def task_compiler(backbone: FrozenBackbone, cache_dir: Path, device: str, threads: int, keep_bytes: int) -> Compiler:
    """Compiles a side task to ONNX Runtime; graphs are kept on disk under ``cache_dir``, named by their
    content, the most recently used ones up to ``keep_bytes``."""

    def compile_task(model: TaskModel, manifest: dict) -> CompiledTask:
        path = cache_dir / "tasks" / f"{manifest['method']}-{graph_key(manifest, backbone)}.onnx"
        compiled = CompiledTask(model, backbone, path, device, threads)
        trim_graphs(path, keep_bytes)
        return compiled

    return compile_task


def open_store(settings: Settings) -> VersionedStore:
    """The local store at ``store_dir``, or the one at ``store_url`` mirrored into ``store_dir``."""
    if settings.store_url:
        try:
            return ObjectTaskStore(settings.store_url, settings.store_dir, settings.keep_versions)
        except (ImportError, ValueError) as e:  # an fsspec backend not installed, a protocol fsspec does not know
            raise OSError(f"--store-url {settings.store_url} cannot be opened: {e}") from e
        except OSError as e:  # a host that does not resolve, a bucket that refuses
            raise OSError(f"--store-url {settings.store_url} cannot be opened: {e.strerror or e}") from e
    return TaskStore(settings.store_dir, settings.keep_versions)


def freeze_heap() -> None:
    """Takes every object alive now (the backbone, the libraries' modules and state) out of the garbage
    collector's scans (:func:`gc.freeze`); call once the process's services are built.

    A full (oldest-generation) collection otherwise walks all of them and holds the GIL meanwhile,
    stalling every thread: on a loaded server it was the slowest cold load of a run, and the tail of
    the requests queued behind it (``docs/BENCHMARKS.md``, eighth stop). Objects are still freed
    when their last reference goes; only cycles among them are no longer collected.
    """
    gc.collect()
    gc.freeze()


def cache_budgets(settings: Settings, device: torch.device) -> dict[str, int]:
    """The tuner cache's byte budget per tier. On a CPU the device is host memory, so the two tiers
    are one: the device tier gets both budgets, and nothing is parked only to be moved back (at 100
    tasks uniformly, serving 6% fewer requests than with one tier; ``docs/BENCHMARKS.md``)."""
    if device.type == "cpu":
        return {"device": settings.device_cache_bytes + settings.host_cache_bytes, "host": 0}
    return {"device": settings.device_cache_bytes, "host": settings.host_cache_bytes}


def default_concurrent_batches(runtime: BackboneRuntime) -> int:
    """2 where passes can run at once on the CPU (ONNX Runtime): with 4 clients on 2 cores, 2 batches'
    passes at once served 1.11 times the requests of 1 (median of alternated rounds). 3 served 1.08
    times the requests of 2 with one task, but in ``make bench`` 100 tasks with cold loads and the
    cold-load tail did worse (``docs/BENCHMARKS.md``, twelfth stop). 1 on a GPU, where one larger
    batch beats several small ones, and for the torch runtime, whose passes hold a lock."""
    return 2 if runtime.concurrent and runtime.device.type == "cpu" else 1


def warm_batches(max_batch: int) -> list[int]:
    """Batch sizes the runtime runs once before serving: the powers of two below ``max_batch``, and it.

    On CUDA each one captures its CUDA-graph bucket at start, so no capture runs while the engine's
    second stage and the tuner cache's threads launch work; everywhere, the first batch of each
    size meets a warm runtime.
    """
    return [1 << i for i in range(max_batch.bit_length()) if 1 << i < max_batch] + [max_batch]


def warmed_runtime(settings: Settings, backbone: FrozenBackbone, name: str, device: torch.device) -> BackboneRuntime:
    """The shared pass's runtime ``name`` on ``device`` (the backbone's), run once at each of
    :func:`warm_batches` with the taps every task can ask for."""
    default_taps = sorted(set(backbone.stage_taps) | set(backbone.pyramid_taps))
    runtime = build_runtime(
        backbone,
        name,
        str(device),
        dtype=settings.dtype if device.type == "cuda" else "fp32",
        taps=default_taps,
        cache_dir=settings.cache_dir / "onnx",
        threads=settings.threads,
        cuda_graphs=settings.cuda_graphs,
    )
    canvas = backbone.preprocess.canvas
    for size in warm_batches(settings.max_batch_size):
        runtime(torch.zeros(size, 3, canvas, canvas), default_taps)
    return runtime


def build_services(settings: Settings, backbone: FrozenBackbone) -> Services:
    """Runtime (warmed up), store (recovered), caches, executor, batcher and the two services."""
    device = resolve_device(settings.device)
    if device.type == "cuda":
        set_float32_precision(settings.dtype)
    backbone = backbone.to(device)
    runtime_name = default_runtime(device) if settings.runtime == "auto" else settings.runtime
    metrics = Metrics(settings.task_latency_histograms)
    store = open_store(settings)
    store.recover()
    runtime = warmed_runtime(settings, backbone, runtime_name, device)
    task_runtime = settings.task_runtime if settings.task_runtime != "auto" else default_runtime(device)
    compiler = (
        # threads=1: graphs run side by side (see Executor)
        task_compiler(backbone, settings.cache_dir / "onnx", str(device), 1, settings.compiled_cache_bytes)
        if task_runtime == "onnx"
        else None
    )
    budgets = cache_budgets(settings, device)
    cache = TunerCache(store, backbone, device, budgets, metrics, compiler, wait_s=settings.cache_wait_s)
    features = FeatureCache(settings.feature_cache_bytes) if settings.feature_cache_bytes else None
    stack = settings.stack_tasks == "on" or (settings.stack_tasks == "auto" and device.type == "cuda")
    executor = Executor(
        backbone, runtime, metrics, features, StackCache() if stack else None, settings.threads, settings.dtype
    )
    batcher = Batcher(
        executor,
        metrics,
        settings.max_batch_size,
        settings.batch_window_ms / 1e3,
        settings.max_queue,
        settings.concurrent_batches or default_concurrent_batches(runtime),
    )
    limits = Limits(settings.max_request_bytes, settings.max_image_pixels, settings.max_tasks_per_request)
    engine = Engine(executor, batcher, cache, metrics, limits, runtime_name, settings.quarantine_after_failures)
    log.info(
        "backbone %s on %s, runtime %s (%s), tasks in %s",
        backbone.name,
        device,
        runtime_name,
        runtime.provider,
        task_runtime,
    )
    return Services(settings, metrics, store, cache, executor, batcher, engine, Tasks(store, cache, executor))
