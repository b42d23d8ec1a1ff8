"""The training config: one pydantic model, read from TOML or YAML, then overridden by flags.

Precedence: defaults < config file < command-line flags < ``--set key=value`` pairs. Unknown keys
are rejected with the list of valid ones, at the top level and in the method's ``tuner`` table.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from models.backbones import list_backbones
from models.heads import HeadConfigError, check_head_options
from models.transform import MAX_CANVAS
from tuners.base import TUNERS
from tuners.data.layouts import DATASET_FORMATS
from tuners.data.transforms import AUGMENTATIONS
from tuners.errors import TunerError

TASK_ID_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"


class ConfigError(TunerError):
    """A training config that cannot be used; the message lists every problem."""


class TrainConfig(BaseModel):
    """Everything one ``server-train`` run needs. Field descriptions double as ``--help`` text."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    method: str = Field("cst", description="tuner method (server-train --list-methods)")
    backbone: str = Field("mobilenet_v2", description="registered backbone name")
    weights: str | None = Field(None, description="weights path, or 'random' (default: offline package)")
    allow_download: bool = Field(False, description="let torchvision download weights when nothing is local")
    image_size: int = Field(320, ge=32, le=MAX_CANVAS, description="longest image side on the backbone's canvas")
    data: Path = Field(
        ..., description="dataset: a folder (splits inside, or one split), a data.yaml, a COCO .json or a .zip"
    )
    format: Literal[DATASET_FORMATS] = Field(  # type: ignore[valid-type]
        "auto", description="dataset format (auto: detected from the files, and logged)"
    )
    val_data: Path | None = Field(None, description="validation split (default: DATA/val)")
    out: Path = Field(Path("runs/task"), description="run folder: best/ artifact, state/, report.json")
    epochs: int = Field(12, ge=1)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(2e-3, gt=0, allow_inf_nan=False, description="peak AdamW learning rate")
    weight_decay: float = Field(1e-4, ge=0, allow_inf_nan=False)
    warmup_iters: int = Field(50, ge=0, description="linear warm-up iterations before the cosine decay")
    grad_clip: float = Field(10.0, ge=0, allow_inf_nan=False, description="max gradient norm (0: off)")
    augmentation: str = Field("flip", description=f"one of {', '.join(AUGMENTATIONS)}")
    seed: int = Field(0, ge=0, lt=2**32, description="seeds initialisation, shuffling and augmentation")
    device: Literal["auto", "cpu", "cuda"] = Field("auto")
    workers: int = Field(0, ge=0, description="DataLoader worker processes")
    tuner: dict[str, Any] = Field(default_factory=dict, description="method options (see --list-methods)")
    head: dict[str, Any] = Field(default_factory=dict, description="head options, e.g. {name = 'light'}")
    cache_features: Literal["none", "memory", "disk"] = Field("none", description="reuse backbone taps")
    cache_bytes: int = Field(2 << 30, ge=0, description="byte budget of the feature cache")
    feature_runtime: Literal["auto", "torch", "onnx"] = Field(
        "auto", description="runs the backbone for --cache-features (auto: onnx on the CPU, as the server does)"
    )
    eval_score_thresh: float = Field(0.05, ge=0, le=1)
    resume: bool = Field(False, description="continue from OUT/state")
    progress: bool = Field(True, description="show a progress bar")
    logger: Literal["none", "tensorboard", "mlflow"] = Field("none", description="also log epoch metrics there")
    publish: str | None = Field(None, description="server URL to upload the best artifact to")
    api_key: str | None = Field(None, description="admin key for --publish")
    task_id: str | None = Field(None, pattern=TASK_ID_PATTERN, description="task id for --publish")

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        if value not in TUNERS:
            raise ValueError(f"unknown method {value!r}; known: {', '.join(TUNERS.names())}")
        return value

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, value: str) -> str:
        known = list_backbones()
        if value not in known:
            raise ValueError(f"unknown backbone {value!r}; known: {', '.join(known)}")
        return value

    @field_validator("augmentation")
    @classmethod
    def _known_augmentation(cls, value: str) -> str:
        if value not in AUGMENTATIONS:
            raise ValueError(f"augmentation must be one of {AUGMENTATIONS}")
        return value

    def check(self) -> None:
        """Cross-field rules; also builds the method config so unknown tuner keys fail early."""
        tuner_cls = TUNERS.get(self.method)
        tuner_cls.config_cls.from_dict(self.tuner)
        head = {"name": "light", **self.head}
        try:
            check_head_options(head.pop("name"), head)
        except HeadConfigError as e:
            raise ConfigError(str(e)) from None
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device cuda: torch sees no CUDA GPU on this machine; use --device cpu (or auto)")
        if self.cache_features != "none":
            if tuner_cls.kind != "side":
                raise ConfigError(
                    f"--cache-features needs a side tuner; {self.method} is inline, so its taps change as it trains"
                )
            if self.augmentation != "none":
                raise ConfigError(
                    f"--cache-features reuses each image's taps across epochs, which is wrong when augmentation "
                    f"{self.augmentation!r} changes the image every epoch; use --augmentation none"
                )


def read_config_file(path: Path) -> dict[str, Any]:
    """A TOML (``.toml``) or YAML (``.yaml``/``.yml``) mapping."""
    if path.suffix not in (".toml", ".yaml", ".yml"):
        raise ConfigError(f"config file must end in .toml, .yaml or .yml, got {path.name}")
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from e
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{path} is not valid {'TOML' if path.suffix == '.toml' else 'YAML'}: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of keys to values")
    return data


def apply_set(values: dict[str, Any], pairs: list[str]) -> dict[str, Any]:
    """Applies ``key=value`` overrides (``tuner.rank=8`` reaches into a table); values parse as YAML scalars."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in values.items()}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        value = yaml.safe_load(raw) if raw else ""
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {part} is not a table")
        node[leaf] = value
    return out


def build_config(values: dict[str, Any]) -> TrainConfig:
    """Validates merged values into a :class:`TrainConfig`; every problem is listed in one error."""
    valid = sorted(TrainConfig.model_fields)
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise ConfigError(f"unknown keys {unknown}; valid keys: {valid}")
    try:
        config = TrainConfig(**values)
    except ValidationError as e:
        problems = [f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()]
        raise ConfigError("invalid training config: " + "; ".join(problems)) from e
    config.check()
    return config
