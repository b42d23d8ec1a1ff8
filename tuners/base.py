"""The tuner interface: config dataclasses, the one registry, and the ``Tuner`` base class.

A **side** tuner only reads taps, so a shared backbone pass can serve it. An **inline** tuner
changes the backbone's forward, and runs its own pass through :meth:`Tuner.backbone_forward`
(block overrides or per-task weights, never by mutating the shared backbone).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import TypeAdapter, ValidationError
from torch import Tensor, nn

from models.backbones.base import FrozenBackbone
from models.registry import Registry
from models.types import Target
from tuners.errors import TunerError

TUNERS: Registry = Registry("tuner")


@dataclass
class TunerConfig:
    """Base of every method's config. Subclasses add fields, each with a default and a help string."""

    def validate(self) -> list[str]:
        """Problems with this config (override and extend); empty when valid."""
        return []

    def __post_init__(self) -> None:
        problems = self.validate()
        if problems:
            raise TunerError(f"{type(self).__name__}: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TunerConfig:
        """Builds the config; unknown keys are rejected with the list of valid ones."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise TunerError(f"unknown keys {unknown} for {cls.__name__}; valid keys: {sorted(names)}")
        try:  # types checked as pydantic checks them: "4" becomes 4, "abc" for an int is refused
            return _adapter(cls).validate_python(data)
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
            raise TunerError(f"invalid {cls.__name__}: {problems}") from None


@functools.cache
def _adapter(cls: type) -> TypeAdapter:
    """One pydantic validator per config class (building one costs more than a validation)."""
    return TypeAdapter(cls)


def option(default: Any, help: str) -> Any:  # noqa: A002
    """A config field with a default and a help string."""
    return field(default=default, metadata={"help": help})


class Tuner(nn.Module):
    """Turns backbone taps into the maps a detection head reads.

    Subclasses set ``kind``, build their modules in ``__init__`` and set ``out_channels`` and
    ``out_strides``. They never keep a reference to the backbone as a submodule, so their
    ``state_dict`` holds the task's own tensors only.
    """

    kind: ClassVar[str] = "side"
    config_cls: ClassVar[type[TunerConfig]] = TunerConfig
    needs_images: ClassVar[bool] = False
    needs_num_classes: ClassVar[bool] = False  # when True, __init__ also takes num_classes (exit heads)
    carries_backbone_copy: ClassVar[bool] = False
    out_channels: list[int]
    out_strides: list[int]

    def __init__(self, config: TunerConfig, backbone: FrozenBackbone) -> None:
        super().__init__()
        self.config = config

    def required_taps(self) -> list[str]:
        raise NotImplementedError

    def forward(self, taps: dict[str, Tensor], images: Tensor | None = None) -> list[Tensor]:
        """Maps ``{tap: [B, C, h, w]}`` (and the ``[B, 3, H, W]`` batch if ``needs_images``) to
        ``[B, out_channels[i], H / out_strides[i], W / out_strides[i]]`` per output level."""
        raise NotImplementedError

    def backbone_forward(self, backbone: FrozenBackbone, images: Tensor) -> dict[str, Tensor]:
        """The taps this task reads. Side tuners: the shared pass. Inline tuners override this."""
        return backbone(images, self.required_taps())

    def auxiliary_losses(
        self, taps: dict[str, Tensor], images: Tensor, targets: list[Target], progress: float
    ) -> dict[str, Tensor]:
        """Extra loss terms beyond the head's (early exits, for example); none by default."""
        return {}

    def early_exit_predict(
        self, backbone: FrozenBackbone, images: Tensor, head: nn.Module, canvas: tuple[int, int], config: Any
    ) -> list | None:
        """Detections from a method that may stop the backbone early, or ``None`` to run the full path."""
        return None


def register_tuner(name: str, config_cls: type[TunerConfig]):  # noqa: ANN201
    """Class decorator: registers a ``Tuner`` subclass under ``name``; duplicates raise."""

    def decorator(cls: type[Tuner]) -> type[Tuner]:
        if cls.kind not in ("side", "inline"):
            raise TunerError(f"{cls.__name__}.kind must be 'side' or 'inline', got {cls.kind!r}")
        cls.config_cls = config_cls
        TUNERS.add(name, cls)
        return cls

    return decorator


def tap_shapes(backbone: FrozenBackbone, taps: list[str]) -> tuple[list[int], list[int]]:
    """(channels, strides) of ``taps``."""
    return [backbone.feature_spec[t].channels for t in taps], [backbone.feature_spec[t].stride for t in taps]


def require_cnn(backbone: FrozenBackbone, method: str) -> None:
    if backbone.family != "cnn":
        raise TunerError(f"{method} needs a CNN backbone with stage taps c2..c5, got {backbone.name}")
