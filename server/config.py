"""Server settings: one pydantic-settings class, from ``SIDECAR_*`` environment variables and flags.

This is the only module that reads the environment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1 << 20


class Settings(BaseSettings):
    """Every knob of ``server-serve``. Each field is also a flag: ``--max-batch-size 16``."""

    model_config = SettingsConfigDict(env_prefix="SIDECAR_", extra="forbid")

    backbone: str = Field("mobilenet_v2", description="registered backbone name")
    weights: str | None = Field(None, description="weights path (default: the offline package, then download)")
    allow_download: bool = Field(False, description="let torchvision download weights when nothing is local")
    image_size: int = Field(320, ge=32, description="longest image side on the backbone canvas")
    runtime: Literal["auto", "torch", "onnx"] = Field(
        "auto", description="executor of the shared backbone pass (auto: onnx on the CPU, torch on CUDA)"
    )
    task_runtime: Literal["auto", "torch", "onnx"] = Field(
        "auto", description="executor of side tasks' tuners and heads (auto: onnx compiled graphs on the CPU)"
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto")
    dtype: Literal["fp32", "fp16", "bf16"] = Field(
        "fp32", description="autocast of the backbone and side heads on CUDA (the CPU runs fp32)"
    )
    cuda_graphs: bool = Field(True, description="replay captured CUDA graphs for the torch backbone on CUDA")
    stack_tasks: Literal["auto", "on", "off"] = Field(
        "auto", description="run side tasks of one architecture as one vmapped computation (auto: on CUDA)"
    )
    threads: int = Field(0, ge=0, description="torch and ONNX Runtime CPU threads (0: their defaults)")
    store_dir: Path = Field(Path("store"), description="task artifacts, one folder per task and version")
    cache_dir: Path = Field(Path(".cache"), description="exported ONNX graphs (backbone and compiled tasks)")
    device_cache_bytes: int = Field(256 * MiB, gt=0, description="byte budget of task models on the device")
    host_cache_bytes: int = Field(1024 * MiB, ge=0, description="byte budget of task models parked in host memory")
    feature_cache_bytes: int = Field(0, ge=0, description="byte budget of cached backbone taps (0: off)")
    max_batch_size: int = Field(8, ge=1, description="images per engine batch")
    batch_window_ms: float = Field(5.0, ge=0, description="how long the batcher waits to fill a batch")
    max_queue: int = Field(64, ge=1, description="queued requests before answering 503")
    max_request_bytes: int = Field(20 * MiB, gt=0, description="largest accepted request body")
    max_upload_bytes: int = Field(512 * MiB, gt=0, description="largest accepted artifact upload")
    max_image_pixels: int = Field(40_000_000, gt=0, description="largest decoded image, in pixels")
    max_tasks_per_request: int = Field(32, ge=1)
    admin_key: SecretStr | None = Field(None, description="required by management endpoints when set")
    inference_key: SecretStr | None = Field(None, description="required by detect endpoints when set")
    host: str = Field("127.0.0.1")
    port: int = Field(8000, ge=0, le=65535)
    log_level: str = Field("info")
