"""The executor: runs a batch of (image, tasks) work items with one shared backbone pass.

For a batch: each image is preprocessed once; the side tasks' taps are unioned and the backbone
runs once over the images that need them, stopping at the deepest tap (or the feature cache
answers); each side task's tuner and head run once on the rows that asked for it (compiled in
ONNX Runtime when the task has a compiled graph, else in torch); inline tasks run grouped by
task, each on its own backbone pass. Every side result of the batch is then postprocessed in one
call (:func:`models.postprocess.finish`). Boxes come back in original-image pixels.

A batch runs in two stages, :meth:`Executor.prepare` (canvases and the shared pass) and
:meth:`Executor.finish` (tasks and postprocess), so that the batcher can run one batch's tasks
while the next batch's backbone pass runs, on two threads, never on the event loop.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from torch import Tensor

from models.backbones.base import FrozenBackbone
from models.heads import HeadOutputs
from models.postprocess import Candidates, PostprocessConfig, finish
from models.runtime.torch import DTYPES, BackboneRuntime
from models.transform import ImageMeta, ImageTransform
from models.types import Detections
from server.feature_cache import FeatureCache
from server.metrics import Metrics
from server.stacks import StackCache, stack_key
from tuners.compiled import CompiledTask
from tuners.errors import ArtifactError
from tuners.task_model import TaskModel

log = logging.getLogger(__name__)


@dataclass
class WorkItem:
    """One image and the task models asked about it (already leased from the tuner cache).

    Attributes:
        image: uint8 ``[3, H, W]`` RGB; or, with ``meta``, the float ``[3, S, S]`` canvas already made
            by :meth:`ImageTransform.load` and :meth:`ImageTransform.canvas` (the server prepares it
            on the request's decoding thread, off this one).
        image_key: content hash, for the feature cache (``""`` when the server has none).
        tasks: task id -> model.
        post: thresholds for this request.
        compiled: task id -> compiled graph, for the tasks that have one.
        meta: the resize's record, when ``image`` is already the canvas.
    """

    image: Tensor
    image_key: str
    tasks: dict[str, TaskModel]
    post: PostprocessConfig = field(default_factory=PostprocessConfig)
    compiled: dict[str, CompiledTask] = field(default_factory=dict)
    meta: ImageMeta | None = None


@dataclass(frozen=True)
class RowTaps:
    """One row's shared taps: row ``index`` of ``batch`` (``{tap: [B, C, h, w]}``, a backbone pass's
    output or a feature-cache entry)."""

    batch: dict[str, Tensor]
    index: int

    @staticmethod
    def gather(parts: list[RowTaps], tap: str) -> Tensor:
        """``[len(parts), C, h, w]``: a view when the parts are consecutive rows of one batch (the usual
        case: a task asked about every image of a batch), else a copy."""
        first = parts[0]
        if all(p.batch is first.batch and p.index == first.index + i for i, p in enumerate(parts)):
            return first.batch[tap][first.index : first.index + len(parts)]
        return torch.cat([p.batch[tap][p.index : p.index + 1] for p in parts])


@dataclass
class Prepared:
    """A batch after its first stage: canvases ``[B, 3, S, S]`` on the device, each row's resize
    record, the shared taps of the rows that have side tasks, and the images the backbone ran on."""

    items: list[WorkItem]
    canvases: Tensor
    metas: list[ImageMeta]
    side_rows: dict[int, RowTaps]
    passes: int


@dataclass
class BatchResult:
    detections: list[dict[str, Detections | TaskFailure]]  # per item: task id -> detections (original pixels)
    backbone_passes: int  # images that went through the shared backbone pass in this batch


@dataclass(frozen=True)
class TaskFailure:
    """A task's model raised, or gave NaN or Inf, on this batch; the other tasks are unaffected."""

    message: str


Outcome = HeadOutputs | TaskFailure
Selected = list[Candidates] | TaskFailure  # a task's candidates, one set per row of its batch


def guarded(run: Callable[[], HeadOutputs]) -> Outcome:
    """``run()``, or a :class:`TaskFailure` when it raises or its outputs hold NaN or Inf."""
    try:
        out = run()
    except Exception as e:  # noqa: BLE001  (user weights may fail in any way; one task's failure stays its own)
        log.exception("a task failed on a batch")
        return TaskFailure(f"{type(e).__name__}: {e}")
    bad = [k for k, v in out.tensors.items() if not all_finite(v)]
    return TaskFailure(f"its head produced NaN or Inf in {', '.join(bad)}") if bad else out


def all_finite(x: Tensor) -> bool:
    """Whether every element of ``x`` is finite, from one float64 sum: NaN and Inf carry through a
    sum (Inf - Inf is NaN) and float64 cannot overflow on float32 or float16 values. Cheaper than
    ``isfinite().all()``, and paid for every task of every batch."""
    return math.isfinite(x.sum(dtype=torch.float64))


def _slices(n: int, chunks: int) -> list[slice]:
    """``range(n)`` cut into at most ``chunks`` contiguous slices (views, not copies, of a batch)."""
    step = -(-n // chunks)
    return [slice(start, min(n, start + step)) for start in range(0, n, step)]


def select(model: TaskModel, outputs: Outcome, posts: list[PostprocessConfig]) -> Selected:
    """Each row's candidates from a task's head outputs (decoded in float32), or the task's failure:
    decoding one task's outputs may fail too, and that also stays the task's own."""
    if isinstance(outputs, TaskFailure):
        return outputs
    try:
        floats = HeadOutputs({k: v.float() for k, v in outputs.tensors.items()}, outputs.level_shapes)
        return model.head.candidates(floats, posts)
    except Exception as e:  # noqa: BLE001  (as in guarded)
        log.exception("a task's candidates failed on a batch")
        return TaskFailure(f"{type(e).__name__}: {e}")


def concat_outputs(parts: list[Outcome]) -> Outcome:
    """Head outputs of consecutive row chunks -> one batch (a failed chunk fails the whole)."""
    failed = next((p for p in parts if isinstance(p, TaskFailure)), None)
    if failed is not None or len(parts) == 1:
        return failed or parts[0]
    heads: list[HeadOutputs] = parts  # type: ignore[assignment]
    return HeadOutputs({k: torch.cat([p.tensors[k] for p in heads]) for k in heads[0].tensors}, heads[0].level_shapes)


class Executor:
    def __init__(
        self,
        backbone: FrozenBackbone,
        runtime: BackboneRuntime,
        metrics: Metrics,
        feature_cache: FeatureCache | None = None,
        stacks: StackCache | None = None,
        task_workers: int = 0,
        dtype: str = "fp32",
    ) -> None:
        self.backbone, self.runtime, self.metrics, self.feature_cache = backbone, runtime, metrics, feature_cache
        self.stacks = stacks
        self.device = next(iter(backbone.parameters())).device
        # Side heads run under fp16/bf16 autocast on CUDA when asked; decoding and NMS stay float32.
        self.autocast = DTYPES[dtype] if self.device.type == "cuda" and dtype != "fp32" else None
        self._workers = task_workers or os.cpu_count() or 1
        self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="task-graph")
        self.transform = ImageTransform(backbone.preprocess)
        self.backbone_image_passes = 0  # the counter behind invariant 4
        self._counter_lock = threading.Lock()  # batches' first stages may run on several threads (Batcher)
        # Inline tuners swap per-task tensors into the shared backbone for their own pass
        # (functional_call), so every forward on it holds this lock: the shared pass (or, with a
        # concurrent runtime, its export), inline predictions and the upload dry-run. The two stages
        # of a batch run on two threads, and several batches' first stages may run at once.
        self.lock = threading.Lock()

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def run(self, items: list[WorkItem]) -> BatchResult:
        """Both stages of a batch, one after the other (the batcher runs them on two threads)."""
        return self.finish(self.prepare(items))

    def prepare(self, items: list[WorkItem]) -> Prepared:
        """Stage 1: the canvases and the shared backbone pass (or the feature cache's taps)."""
        with torch.inference_mode():
            start = time.perf_counter()
            ready = [(i.image, i.meta) if i.meta is not None else self.transform.one(i.image) for i in items]
            canvases = torch.stack([canvas for canvas, _ in ready]).to(self.device)
            self.metrics.stage_seconds.labels(stage="preprocess").observe(time.perf_counter() - start)
            side_rows, passes = self._shared_taps(items, canvases)
        return Prepared(items, canvases, [meta for _, meta in ready], side_rows, passes)

    def finish(self, prepared: Prepared) -> BatchResult:
        """Stage 2: every task's tuner and head on its rows, then one postprocess for the batch."""
        with torch.inference_mode():
            return self._finish(prepared)

    def dry_run(self, model: TaskModel) -> None:
        """Upload check: one forward pass of ``model`` (already on this device) on a blank canvas.

        Raises:
            ArtifactError: the forward pass fails, or its outputs hold NaN or Inf.
        """
        canvas = self.backbone.preprocess.canvas
        images = torch.zeros(1, 3, canvas, canvas, device=self.device)
        try:
            with self.lock, torch.inference_mode():
                outputs = model(self.backbone, images)
        except Exception as e:  # noqa: BLE001  (any failure of user weights is a bad artifact)
            raise ArtifactError([f"dry-run forward failed: {type(e).__name__}: {e}"]) from e
        bad = [k for k, v in outputs.tensors.items() if not all_finite(v)]
        if bad:
            raise ArtifactError([f"dry-run forward gives NaN or Inf in {', '.join(bad)}"])

    def _finish(self, prepared: Prepared) -> BatchResult:
        items, canvases, metas, side_rows = prepared.items, prepared.canvases, prepared.metas, prepared.side_rows
        start = time.perf_counter()
        groups: dict[tuple[str, int], list[int]] = defaultdict(list)
        for row, item in enumerate(items):
            for task_id, model in item.tasks.items():
                groups[(task_id, id(model))].append(row)
        results: list[dict[str, Detections | TaskFailure]] = [{} for _ in items]
        side: list[tuple[str, list[int]]] = []
        for (task_id, _), rows in groups.items():
            model = items[rows[0]].tasks[task_id]
            if model.kind == "inline":
                self._run_inline(task_id, model, rows, canvases, metas, items, results)
            else:
                side.append((task_id, rows))
        pending: list[tuple[int, str, Candidates]] = []  # (row, task, candidates): finished together
        with torch.autocast(self.device.type, self.autocast or torch.float32, enabled=self.autocast is not None):
            side_outputs = self._side_outputs(side, items, side_rows, canvases)
        for (task_id, rows), outputs in zip(side, side_outputs):
            found = select(items[rows[0]].tasks[task_id], outputs, [items[r].post for r in rows])
            if isinstance(found, TaskFailure):
                for r in rows:
                    results[r][task_id] = found
                continue
            pending += [(r, task_id, c) for r, c in zip(rows, found)]
        canvas = (int(canvases.shape[-2]), int(canvases.shape[-1]))
        finished = finish([c for _, _, c in pending], canvas, [items[r].post for r, _, _ in pending])
        for (r, task_id, _), det in zip(pending, finished):
            results[r][task_id] = ImageTransform.to_original(det, metas[r]).to("cpu")
        self.metrics.stage_seconds.labels(stage="tuner_head").observe(time.perf_counter() - start)
        return BatchResult(results, prepared.passes)

    def _side_outputs(
        self,
        side: list[tuple[str, list[int]]],
        items: list[WorkItem],
        side_rows: dict[int, RowTaps],
        canvases: Tensor,
    ) -> list[Outcome]:
        """Head outputs of each side (task, rows): compiled graph, else stacked with its kind, else eager."""
        outputs: list[Outcome | None] = [None] * len(side)
        stackable: dict[tuple[str, tuple[int, ...]], list[int]] = defaultdict(list)
        jobs: list[tuple[int, CompiledTask, dict[str, Tensor], Tensor | None]] = []
        for i, (task_id, rows) in enumerate(side):
            model, compiled = items[rows[0]].tasks[task_id], items[rows[0]].compiled.get(task_id)
            if compiled is None and self.stacks is not None:
                stackable[(stack_key(model), tuple(rows))].append(i)
                continue
            taps, images = self._inputs(model, rows, side_rows, canvases)
            if compiled is not None:
                jobs.append((i, compiled, taps, images))
            else:
                outputs[i] = guarded(lambda m=model, t=taps, x=images: m.head_outputs(t, x))
        for i, out in self._run_compiled(jobs):
            outputs[i] = out
        canvas = (int(canvases.shape[-2]), int(canvases.shape[-1]))
        for (_, rows), members in stackable.items():
            models = [items[rows[0]].tasks[side[i][0]] for i in members]
            taps, images = self._inputs(models[0], list(rows), side_rows, canvases)
            try:
                stacked = self.stacks.get(models)(taps, canvas, images) if len(models) > 1 else None  # type: ignore[union-attr]
            except Exception:  # noqa: BLE001  (one member's bad weights: run them one by one, each on its own)
                log.exception("a stack of %d tasks failed; running them one by one", len(models))
                stacked = None
            for j, (i, model) in enumerate(zip(members, models)):
                if stacked is not None:
                    outputs[i] = guarded(lambda o=stacked[j]: o)
                else:
                    outputs[i] = guarded(lambda m=model, t=taps, x=images: m.head_outputs(t, x))
        return outputs  # type: ignore[return-value]

    def _run_compiled(
        self, jobs: list[tuple[int, CompiledTask, dict[str, Tensor], Tensor | None]]
    ) -> list[tuple[int, Outcome]]:
        """Runs compiled graphs one thread each, side by side: small convolutions scale poorly across
        intra-op threads, so K graphs on the cores beat K graphs one after another. With fewer graphs
        than workers, each graph's rows are split too, so one task's batch also uses every core."""
        if not jobs:
            return []
        chunks = max(1, self._workers // len(jobs))
        parts = [
            (i, compiled, {t: v[rows] for t, v in taps.items()}, None if images is None else images[rows])
            for i, compiled, taps, images in jobs
            for rows in _slices(next(iter(taps.values())).shape[0], chunks)
        ]

        def run(part: tuple[int, CompiledTask, dict[str, Tensor], Tensor | None]) -> Outcome:
            return guarded(lambda: part[1](part[2], part[3]))

        ran = list(self._pool.map(run, parts)) if len(parts) > 1 else [run(parts[0])]
        merged: dict[int, list[Outcome]] = defaultdict(list)
        for (i, *_), out in zip(parts, ran):
            merged[i].append(out)
        return [(i, concat_outputs(outs)) for i, outs in merged.items()]

    def _inputs(
        self, model: TaskModel, rows: list[int], side_rows: dict[int, RowTaps], canvases: Tensor
    ) -> tuple[dict[str, Tensor], Tensor | None]:
        """The shared taps of ``rows`` that ``model`` reads (on this device), and the canvases if it reads them."""
        parts = [side_rows[r] for r in rows]
        taps = {t: RowTaps.gather(parts, t).to(self.device) for t in model.required_taps()}
        return taps, canvases[rows] if model.tuner.needs_images else None

    def _run_inline(
        self,
        task_id: str,
        model: TaskModel,
        rows: list[int],
        canvases: Tensor,
        metas: list[ImageMeta],
        items: list[WorkItem],
        results: list[dict[str, Detections | TaskFailure]],
    ) -> None:
        """An inline task's own backbone pass over its rows, one pass per distinct postprocess setting."""
        self.metrics.inline_image_passes.inc(len(rows))
        by_post: dict[PostprocessConfig, list[int]] = defaultdict(list)
        for r in rows:
            by_post[items[r].post].append(r)
        for post, same in by_post.items():
            try:
                with self.lock:
                    found = model.predict(self.backbone, canvases[same], [metas[r] for r in same], post)
                if not all(all_finite(d.boxes) and all_finite(d.scores) for d in found):
                    raise FloatingPointError("its detections hold NaN or Inf")
            except Exception as e:  # noqa: BLE001  (as in guarded)
                log.exception("inline task %s failed on a batch", task_id)
                for r in same:
                    results[r][task_id] = TaskFailure(f"{type(e).__name__}: {e}")
                continue
            for r, det in zip(same, found):
                results[r][task_id] = det.to("cpu")

    def _backbone_pass(self, canvases: Tensor, taps: list[str]) -> dict[str, Tensor]:
        """The shared pass. A runtime that allows it (ONNX Runtime) runs passes of several batches at
        once, outside the lock, once the lock has covered building its graph for ``taps``."""
        if not self.runtime.concurrent:
            with self.lock:
                return self.runtime(canvases, taps)
        with self.lock:
            self.runtime.prepare(taps)  # an export reads the torch module's weights
        return self.runtime(canvases, taps)

    def _shared_taps(self, items: list[WorkItem], canvases: Tensor) -> tuple[dict[int, RowTaps], int]:
        """Per row that has side tasks: its taps, from the cache or one backbone pass over the rest."""
        needed = {
            row: sorted({t for m in item.tasks.values() if m.kind == "side" for t in m.required_taps()})
            for row, item in enumerate(items)
        }
        taps = sorted({t for names in needed.values() for t in names})
        if self.feature_cache is not None and taps:  # cache the common taps too, so other tasks hit later
            taps = sorted(set(taps) | set(self.backbone.stage_taps) | set(self.backbone.pyramid_taps))
        out: dict[int, RowTaps] = {}
        missing = []
        for row, names in needed.items():
            if not names:
                continue
            cached = self.feature_cache.get(items[row].image_key, taps) if self.feature_cache else None
            if cached is not None:
                out[row] = RowTaps(cached, 0)
                self.metrics.feature_cache_events.labels(event="hit").inc()
            else:
                missing.append(row)
        if missing:
            start = time.perf_counter()
            computed = self._backbone_pass(canvases if len(missing) == len(items) else canvases[missing], taps)
            self.metrics.stage_seconds.labels(stage="backbone").observe(time.perf_counter() - start)
            with self._counter_lock:
                self.backbone_image_passes += len(missing)
            self.metrics.backbone_image_passes.inc(len(missing))
            for i, row in enumerate(missing):
                out[row] = RowTaps(computed, i)
                if self.feature_cache is not None:
                    self.metrics.feature_cache_events.labels(event="miss").inc()
                    self.feature_cache.put(items[row].image_key, {t: v[i : i + 1] for t, v in computed.items()})
                    self.metrics.feature_cache_bytes.set(self.feature_cache.bytes)
        return out, len(missing)
