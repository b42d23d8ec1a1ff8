"""torch-only building blocks: frozen backbones, shared preprocessing, heads, runtimes.

Knows nothing of HTTP or tuners.
"""

from models.backbones import FrozenBackbone, build_backbone, list_backbones
from models.heads import DetectionHead, build_head, list_heads
from models.postprocess import PostprocessConfig
from models.transform import ImageMeta, ImageTransform, PreprocessSpec
from models.types import Detections, Target

__all__ = [
    "Detections",
    "DetectionHead",
    "FrozenBackbone",
    "ImageMeta",
    "ImageTransform",
    "PostprocessConfig",
    "PreprocessSpec",
    "Target",
    "build_backbone",
    "build_head",
    "list_backbones",
    "list_heads",
]
