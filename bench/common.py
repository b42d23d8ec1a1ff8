"""Timing helpers shared by the benchmarks."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from tuners.trainer.report import median_seconds

__all__ = ["median_seconds", "paired_median_seconds"]


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
