"""The torch executor, and the common interface both executors share."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor

from models.backbones.base import FrozenBackbone

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class BackboneRuntime(Protocol):
    """Runs the frozen backbone: ``[B, 3, H, W]`` float batch -> ``{tap: [B, C, h, w]}`` float32.

    ``concurrent``: passes may run on several threads at once, and never read the torch backbone's
    weights once :meth:`prepare` has run for their taps (inline tasks swap their own weights into
    that module, under the executor's lock). Otherwise every pass runs under that lock.
    """

    backbone: FrozenBackbone
    device: torch.device
    provider: str
    concurrent: bool

    def prepare(self, taps: Collection[str]) -> object: ...

    def __call__(self, images: Tensor, taps: Collection[str]) -> dict[str, Tensor]: ...


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when a GPU is present; asking for ``cuda`` without one raises."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was requested but torch sees no CUDA device")
    return torch.device(device)


class TorchRuntime:
    """Eager torch execution under ``inference_mode``.

    Args:
        backbone: the frozen backbone (moved to ``device``).
        device: ``auto``, ``cpu`` or ``cuda[:N]``.
        dtype: ``fp32``, or ``fp16``/``bf16`` autocast on CUDA.
        channels_last: use the channels-last memory format (faster convolutions on GPUs).
    """

    def __init__(
        self, backbone: FrozenBackbone, device: str = "auto", dtype: str = "fp32", channels_last: bool = False
    ) -> None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        self.device = resolve_device(device)
        if dtype != "fp32" and self.device.type != "cuda":
            raise ValueError(f"dtype {dtype} needs a CUDA device; the CPU runs fp32")
        self.dtype = DTYPES[dtype]
        self.channels_last = channels_last
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.backbone = backbone.to(self.device, memory_format=memory_format)
        self.provider = f"torch-{self.device.type}"
        self.concurrent = False  # a pass reads the module's weights, which inline tasks swap

    def prepare(self, taps: Collection[str]) -> None:
        """Nothing to build ahead: eager torch runs any tap set."""

    def __call__(self, images: Tensor, taps: Collection[str]) -> dict[str, Tensor]:
        images = images.to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        # No cast cache: a pass casts each weight once anyway, and CUDA graphs capture this call
        # (torch.cuda.make_graphed_callables refuses autocast's cache for the same reason).
        enabled = self.dtype != torch.float32
        autocast = torch.autocast(self.device.type, self.dtype, enabled=enabled, cache_enabled=False)
        with torch.inference_mode(), autocast:
            out = self.backbone(images, taps)
        return {k: v.float() for k, v in out.items()}


def set_float32_precision(dtype: str) -> None:
    """What float32 means on CUDA, for this process: IEEE float32 when serving ``fp32``, TF32 otherwise.

    torch runs cuDNN's float32 convolutions in TF32 by default (a 10-bit mantissa: mobilenet_v2's
    taps moved by 1.2e-3 to 2.7e-3 relative to IEEE float32 on an H200, docs/BENCHMARKS.md), and
    cuDNN picks its algorithm by batch shape, so a task's scores could move with what it is batched
    with by more than invariant 3's 1e-4. Under ``fp16``/``bf16`` autocast the server has been asked
    for reduced precision, and what stays float32 may use TF32 too.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    # torch's own flags: setting its newer per-operator ``fp32_precision`` instead makes any later
    # read of these raise, and other libraries still read them
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = dtype != "fp32"


def default_runtime(device: torch.device) -> str:
    """``onnx`` on the CPU (about 5x faster than eager torch for mobilenet_v2), ``torch`` on CUDA."""
    return "torch" if device.type == "cuda" else "onnx"


def build_runtime(
    backbone: FrozenBackbone,
    kind: str = "torch",
    device: str = "auto",
    *,
    dtype: str = "fp32",
    taps: Collection[str] | None = None,
    cache_dir: Path | None = None,
    threads: int = 0,
    cuda_graphs: bool = False,
) -> BackboneRuntime:
    """Builds the ``torch`` or ``onnx`` executor (``auto``: :func:`default_runtime`).

    ONNX prepares a graph for ``taps`` (default: the pyramid taps) at once, and one per other tap
    set on first use; ``threads`` is its intra-op thread count (0: one per core). On CUDA, torch
    runs channels-last, and replays captured CUDA graphs when ``cuda_graphs``.
    """
    if kind == "auto":
        kind = default_runtime(resolve_device(device))
    if kind == "torch":
        eager = TorchRuntime(backbone, device, dtype, channels_last=resolve_device(device).type == "cuda")
        if cuda_graphs and eager.device.type == "cuda":
            from models.runtime.cuda_graphs import CudaGraphRuntime

            return CudaGraphRuntime(eager)
        return eager
    if kind == "onnx":
        from models.runtime.onnx import OnnxRuntime

        cache_dir = cache_dir or Path(".cache/onnx")
        return OnnxRuntime(backbone, list(taps or backbone.pyramid_taps), cache_dir, device, threads)
    raise ValueError(f"runtime must be 'auto', 'torch' or 'onnx', got {kind!r}")
