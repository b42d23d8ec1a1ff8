"""Timing helpers shared by the benchmarks."""

from __future__ import annotations

import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from models import FrozenBackbone
from tuners import TaskModel, build_task_model
from tuners.trainer.report import median_seconds

__all__ = ["median_seconds", "paired_median_seconds", "scratch", "untrained_tasks"]


@contextmanager
def scratch(prefix: str) -> Iterator[Path]:
    """A temporary folder for a benchmark's artifacts, stores, ONNX graphs and server logs (up to a
    GB). Removed when the run ends; kept, and its path printed, when the run fails, for the logs."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield work
    except BaseException:
        print(f"kept {work} (server logs inside)", file=sys.stderr)
        raise
    shutil.rmtree(work, ignore_errors=True)


def paired_median_seconds(
    a: Callable[[], object], b: Callable[[], object], repeats: int = 20, warmup: int = 3
) -> tuple[float, float]:
    """Median wall times of ``a`` and ``b``, run alternately so that drift (clocks, caches, a
    neighbour on the machine) weighs on both alike; under ``inference_mode``, after ``warmup`` pairs."""
    times: tuple[list[float], list[float]] = ([], [])
    with torch.inference_mode():
        for i in range(warmup + repeats):
            for fn, out in ((a, times[0]), (b, times[1])) if i % 2 else ((b, times[1]), (a, times[0])):
                start = time.perf_counter()
                fn()
                if i >= warmup:
                    out.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def untrained_tasks(backbone: FrozenBackbone, method: str, n: int, head: dict | None = None) -> list[TaskModel]:
    """``n`` untrained ``method`` tasks of 10 classes with ``head`` (default: the light head's defaults),
    seeded 0..n-1 (distinct weights), in eval mode on the backbone's device. Timing does not depend on
    the weights."""
    device = next(backbone.parameters()).device
    models = []
    for i in range(n):
        torch.manual_seed(i)
        model = build_task_model(method, {}, backbone, [f"c{j}" for j in range(10)], head)
        models.append(model.to(device).eval())
    return models
