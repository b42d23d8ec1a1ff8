"""CUDA graphs for the backbone: one captured graph per (tap set, batch bucket) at the fixed canvas.

At small batches a GPU spends much of a mobilenet_v2 pass launching kernels; replaying a captured
graph launches them all at once. Batches are padded up to the next bucket (1, 2, 4, 8, 16, 32),
and the rows of the padding are dropped from the outputs, so results do not depend on it.
"""

from __future__ import annotations

from collections.abc import Collection

import torch
from torch import Tensor

from models.runtime.torch import TorchRuntime

BUCKETS = (1, 2, 4, 8, 16, 32)


class CudaGraphRuntime:
    """Wraps a CUDA :class:`TorchRuntime`; falls back to it for batches above the largest bucket."""

    def __init__(self, eager: TorchRuntime, buckets: tuple[int, ...] = BUCKETS) -> None:
        if eager.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.eager, self.buckets = eager, buckets
        self.backbone, self.device, self.provider = eager.backbone, eager.device, f"{eager.provider}-graphs"
        self.concurrent = False
        self._graphs: dict[tuple[frozenset[str], int], tuple[torch.cuda.CUDAGraph, Tensor, dict[str, Tensor]]] = {}

    def _capture(self, taps: frozenset[str], bucket: int) -> tuple[torch.cuda.CUDAGraph, Tensor, dict[str, Tensor]]:
        canvas = self.backbone.preprocess.canvas
        static_in = torch.zeros(bucket, 3, canvas, canvas, device=self.device)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):  # warm-up outside the capture, as torch.cuda.graphs requires
                self.eager(static_in, taps)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # "thread_local": other threads (the engine's second stage, the tuner cache's loads) may go on
        # allocating and synchronising on their own streams while this thread captures on its own.
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            static_out = self.eager(static_in, taps)
        return graph, static_in, static_out

    def prepare(self, taps: Collection[str]) -> None:
        """Nothing ahead: a bucket's graph is captured on its first pass."""

    def __call__(self, images: Tensor, taps: Collection[str]) -> dict[str, Tensor]:
        n = int(images.shape[0])
        bucket = next((b for b in self.buckets if b >= n), None)
        if bucket is None:
            return self.eager(images, taps)
        key = (frozenset(taps), bucket)
        if key not in self._graphs:
            self._graphs[key] = self._capture(*key)
        graph, static_in, static_out = self._graphs[key]
        static_in[:n].copy_(images, non_blocking=True)
        static_in[n:].zero_()
        graph.replay()
        return {t: v[:n].clone() for t, v in static_out.items()}
