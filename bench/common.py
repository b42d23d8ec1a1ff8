"""Timing helpers shared by the benchmarks: the trainer's own median timer (warm-up, then the median)."""

from __future__ import annotations

from tuners.trainer.report import median_seconds

__all__ = ["median_seconds"]
