"""Executors of a frozen backbone: torch (CPU/CUDA) and ONNX Runtime. Same call, same taps."""

from models.runtime.onnx import OnnxRuntime
from models.runtime.torch import BackboneRuntime, TorchRuntime, build_runtime

__all__ = ["BackboneRuntime", "OnnxRuntime", "TorchRuntime", "build_runtime"]
