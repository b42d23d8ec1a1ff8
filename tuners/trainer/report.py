"""Measurements for ``report.json``: training memory, and a task's inference cost per image.

Peak training memory on the CPU has no allocator counter, so :class:`TrainingMemory` measures it
from what a training step must hold: the task's parameters, their gradients and optimizer state,
plus the activations autograd saves for backward (counted once per storage through
``torch.autograd.graph.saved_tensors_hooks``, frozen backbone weights excluded). On CUDA the
allocator's own peak is reported as well.
"""

from __future__ import annotations

import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from models.backbones.base import FrozenBackbone
from tuners.task_model import TaskModel


def _nbytes(tensors: Iterator[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class TrainingMemory:
    """Peak bytes of one training step: task params + grads + optimizer state + saved activations."""

    def __init__(self, model: TaskModel, backbone: FrozenBackbone) -> None:
        self.model = model
        self._frozen = {p.untyped_storage().data_ptr() for p in backbone.parameters()}
        self.peak_activation_bytes = 0

    @contextmanager
    def step(self) -> Iterator[None]:
        """Wrap one forward + backward; records the bytes autograd saved for backward."""
        seen: set[int] = set()
        total = 0

        def pack(t: Tensor) -> Tensor:
            nonlocal total
            ptr = t.untyped_storage().data_ptr()
            if ptr not in seen and ptr not in self._frozen:
                seen.add(ptr)
                total += t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield
        self.peak_activation_bytes = max(self.peak_activation_bytes, total)

    def report(self, optimizer: torch.optim.Optimizer) -> dict[str, int]:
        params = self.model.trainable_parameters()
        state = _nbytes(v for s in optimizer.state.values() for v in s.values() if isinstance(v, Tensor))
        weights = _nbytes(iter(params))
        out = {
            "peak_memory_bytes": weights * 2 + state + self.peak_activation_bytes,
            "activation_bytes": self.peak_activation_bytes,
            "parameter_bytes": weights,
            "optimizer_state_bytes": state,
            "peak_rss_bytes": peak_rss_bytes(),
        }
        if torch.cuda.is_available():
            out["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
        return out


def peak_rss_bytes() -> int:
    """The whole process's peak resident set (Linux reports KiB, macOS bytes)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def median_seconds(fn: Callable[[], object], repeats: int = 30, warmup: int = 3) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs, after ``warmup`` runs, under ``inference_mode``.

    When the process uses CUDA, each run ends with a synchronisation: kernels run after their launch
    returns, so without it the clock would stop before the work does.
    """
    sync = torch.cuda.synchronize if torch.cuda.is_initialized() else (lambda: None)
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        sync()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.inference_mode()
def task_cost(model: TaskModel, backbone: FrozenBackbone, device: torch.device, repeats: int = 20) -> dict[str, float]:
    """Per-image inference cost of adding this task to a request, as a fraction of one backbone pass.

    Side task: its tuner + head on taps that the shared pass already computed. Inline task: its
    own backbone pass + tuner + head, since nothing can be shared. Batch 1, median of ``repeats``.
    """
    canvas = backbone.preprocess.canvas
    images = torch.randn(1, 3, canvas, canvas, device=device)
    model.eval()
    backbone_s = median_seconds(lambda: backbone(images, list(backbone.pyramid_taps)), repeats)
    if model.kind == "side":
        taps = backbone(images, model.required_taps())
        task_s = median_seconds(lambda: model.head_outputs(taps, images), repeats)
    else:
        task_s = median_seconds(lambda: model(backbone, images), repeats)
    return {
        "task_cost_fraction_of_backbone": task_s / backbone_s,
        "task_ms_per_image": task_s * 1e3,
        "backbone_ms_per_image": backbone_s * 1e3,
    }


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
