"""Datasets: COCO / VOC / YOLO readers, box-aware augmentation, and the composited synth set."""

from tuners.data.formats import FORMATS, read_dataset, write_dataset
from tuners.data.records import DatasetError, DetectionData, ImageRecord

__all__ = ["FORMATS", "DatasetError", "DetectionData", "ImageRecord", "read_dataset", "write_dataset"]
