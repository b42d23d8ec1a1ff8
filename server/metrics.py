"""Prometheus metrics, in a registry owned by the app (no process-global state)."""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Summary, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
LOAD_BUCKETS = (0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    """Every metric the server exports under ``/metrics``; names start with ``sidecar_``.

    Args:
        task_histograms: a latency histogram per task (``sidecar_request_seconds``, 16 series for
            each task that has served requests); else a count and a sum per task (3 series), as
            Triton exports per model, for servers of thousands of tasks. ``sidecar_detect_seconds``,
            over all requests, is a histogram either way.
    """

    def __init__(self, task_histograms: bool = True) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.detect_seconds = Histogram(
            "sidecar_detect_seconds", "detect latency, every request", buckets=LATENCY_BUCKETS, registry=r
        )
        per_task = ("sidecar_request_seconds", "detect latency per task", ["task"])
        self.request_seconds: Histogram | Summary = (
            Histogram(*per_task, buckets=LATENCY_BUCKETS, registry=r)
            if task_histograms
            else Summary(*per_task, registry=r)
        )
        self.stage_seconds = Histogram(
            "sidecar_stage_seconds",
            "time per engine stage (queue, preprocess, backbone, tuner_head)",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.backbone_image_passes = Counter(
            "sidecar_backbone_image_passes", "images run through the shared backbone pass", registry=r
        )
        self.inline_image_passes = Counter(
            "sidecar_inline_image_passes", "images run through an inline task's own backbone pass", registry=r
        )
        self.images_served = Counter("sidecar_images_served", "images answered by detect", registry=r)
        self.task_results = Counter("sidecar_task_results", "task results answered by detect", registry=r)
        self.cache_events = Counter(
            "sidecar_tuner_cache_events", "tuner cache hits, misses and evictions", ["tier", "event"], registry=r
        )
        self.resident_bytes = Gauge("sidecar_tuner_cache_resident_bytes", "task model bytes", ["tier"], registry=r)
        self.budget_bytes = Gauge("sidecar_tuner_cache_budget_bytes", "byte budget per tier", ["tier"], registry=r)
        self.cold_load_seconds = Histogram(
            "sidecar_cold_load_seconds", "store -> device load time", buckets=LOAD_BUCKETS, registry=r
        )
        self.feature_cache_events = Counter(
            "sidecar_feature_cache_events", "backbone feature cache hits and misses", ["event"], registry=r
        )
        self.feature_cache_bytes = Gauge("sidecar_feature_cache_bytes", "cached tap bytes", registry=r)
        self.queue_depth = Gauge("sidecar_queue_depth", "requests waiting for the engine", registry=r)
        self.body_bytes = Gauge(
            "sidecar_request_body_bytes", "request body bytes received and not yet answered", registry=r
        )
        self.errors = Counter("sidecar_errors", "error responses by code", ["code"], registry=r)

    def forget_task(self, task_id: str) -> None:
        """Drops a deleted task's series, so that tasks published and deleted over time do not grow ``/metrics``."""
        with contextlib.suppress(KeyError):
            self.request_seconds.remove(task_id)

    def render(self) -> bytes:
        """The text format. It grows with the tasks that have served requests (16 series each, or 3
        without ``task_histograms``): call it off the event loop."""
        return generate_latest(self.registry)
