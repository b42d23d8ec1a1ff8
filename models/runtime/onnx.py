"""The ONNX Runtime executor: exports the backbone with the requested taps as graph outputs.

Exports are cached on disk, keyed by backbone fingerprint, taps, opset and canvas size. The
session asks for CUDA when torch sees a GPU and reports the provider it actually got
(``session.get_providers()``): onnxruntime falls back to the CPU silently.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Collection
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import Tensor, nn

from models.backbones.base import FrozenBackbone

logger = logging.getLogger(__name__)

OPSET = 17


class _TapGraph(nn.Module):
    def __init__(self, backbone: FrozenBackbone, taps: list[str]) -> None:
        super().__init__()
        self.backbone, self.taps = backbone, taps

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        out = self.backbone(images, self.taps)
        return tuple(out[t] for t in self.taps)


def export_path(backbone: FrozenBackbone, taps: list[str], cache_dir: Path, opset: int = OPSET) -> Path:
    key = f"{backbone.fingerprint}|{','.join(taps)}|{opset}|{backbone.preprocess.canvas}"
    return cache_dir / f"{backbone.name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.onnx"


def export_onnx(backbone: FrozenBackbone, taps: list[str], cache_dir: Path, opset: int = OPSET) -> Path:
    """Exports (or reuses) the tap graph; the write is atomic (temp file, then rename)."""
    path = export_path(backbone, taps, cache_dir, opset)
    if path.is_file():
        return path
    cache_dir.mkdir(parents=True, exist_ok=True)
    canvas = backbone.preprocess.canvas
    dummy = torch.zeros(1, 3, canvas, canvas)
    fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".onnx.tmp")
    os.close(fd)
    try:
        torch.onnx.export(
            _TapGraph(backbone.cpu(), taps),
            (dummy,),
            tmp,
            input_names=["images"],
            output_names=taps,
            dynamic_axes={"images": {0: "batch"}, **{t: {0: "batch"} for t in taps}},
            opset_version=opset,
            dynamo=False,
        )
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    logger.info("exported %s taps %s to %s", backbone.name, taps, path)
    return path


class OnnxRuntime:
    """Runs an exported tap graph. Inputs must be on the fixed canvas of the backbone's preprocess spec."""

    def __init__(self, backbone: FrozenBackbone, taps: list[str], cache_dir: Path, device: str = "auto") -> None:
        self.backbone = backbone
        self.taps = list(dict.fromkeys(taps))
        self.path = export_onnx(backbone, self.taps, cache_dir)
        want_cuda = device != "cpu" and torch.cuda.is_available()
        providers = (["CUDAExecutionProvider"] if want_cuda else []) + ["CPUExecutionProvider"]
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(self.path), options, providers=providers)
        self.provider = self.session.get_providers()[0]
        if device.startswith("cuda") and self.provider != "CUDAExecutionProvider":
            raise RuntimeError(f"CUDA was requested but onnxruntime runs on {self.session.get_providers()}")
        self.device = torch.device("cpu")

    def __call__(self, images: Tensor, taps: Collection[str]) -> dict[str, Tensor]:
        missing = set(taps) - set(self.taps)
        if missing:
            raise KeyError(f"taps {sorted(missing)} were not exported; this graph has {self.taps}")
        wanted = [t for t in self.taps if t in set(taps)]
        arrays = self.session.run(wanted, {"images": images.detach().cpu().numpy().astype(np.float32)})
        return {t: torch.from_numpy(a) for t, a in zip(wanted, arrays)}
