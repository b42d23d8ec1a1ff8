"""Detection heads (neck + dense head + loss + decoding). Importing registers every head."""

from __future__ import annotations

import functools
import inspect
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from models.heads import fcos, light, retinanet  # noqa: F401  (registration)
from models.heads.base import DetectionHead, HeadOutputs
from models.registry import HEADS

SIZED_BY_THE_TUNER = ("self", "num_classes", "in_channels", "in_strides")
# Bounds of the options the heads share by name: a manifest's head is checked before anything is built.
# Widths need no upper bound (a manifest's layout is checked on the meta device, which allocates
# nothing), but a count of layers does: building 2**70 modules never ends, even there.
MAX_LAYERS = 32
BOUNDS = {
    "width": Field(gt=0),
    "num_convs": Field(ge=0, le=MAX_LAYERS),
    "prior_prob": Field(gt=0, lt=1),
    "anchor_size": Field(gt=0),
}


class HeadConfigError(ValueError):
    """Head options that cannot be used; the message names every problem and the valid choices."""


@functools.cache
def _options_model(name: str) -> type[BaseModel]:
    """A pydantic model of head ``name``'s options, from its constructor's signature."""
    signature = inspect.signature(HEADS.get(name).__init__, eval_str=True)
    fields = {
        p.name: (Annotated[p.annotation, BOUNDS[p.name]] if p.name in BOUNDS else p.annotation, p.default)
        for p in signature.parameters.values()
        if p.name not in SIZED_BY_THE_TUNER and p.default is not inspect.Parameter.empty
    }
    return create_model(f"{name}_head", __config__=ConfigDict(extra="forbid"), **fields)


def check_head_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """Validates ``options`` of head ``name`` against its constructor: types checked, unknown keys listed.

    Returns:
        The options, converted to their declared types (``"64"`` -> ``64``).
    """
    if name not in HEADS.names():
        raise HeadConfigError(f"unknown head {name!r}; known heads: {', '.join(HEADS.names())}")
    model = _options_model(name)
    try:
        return model(**options).model_dump()
    except ValidationError as e:
        problems = [
            f"{'.'.join(map(str, err['loc']))}: {'unknown option' if err['type'] == 'extra_forbidden' else err['msg']}"
            for err in e.errors()
        ]
        valid = ", ".join(f"{k}={f.default!r}" for k, f in model.model_fields.items())
        raise HeadConfigError(f"head {name!r}: {'; '.join(problems)}; its options: {valid}") from None


def resolve_head_config(head_config: dict[str, Any] | None) -> dict[str, Any]:
    """``{"name": ..., **every option}``: the head's name (``light`` when absent) and all its options,
    the defaults filled in, so that a saved artifact does not depend on this version's defaults.

    Raises:
        HeadConfigError: an unknown head, or options it does not take.
    """
    head = {"name": "light", **(head_config or {})}
    name = head.pop("name")
    return {"name": name, **check_head_options(name, head)}


def build_head(
    name: str, num_classes: int, in_channels: list[int], in_strides: list[int], **options: Any
) -> DetectionHead:
    """Builds registered head ``name`` (``light`` by default elsewhere; ``fcos``, ``retinanet``)."""
    return HEADS.get(name)(num_classes, in_channels, in_strides, **check_head_options(name, options))


def list_heads() -> list[str]:
    return HEADS.names()


__all__ = [
    "DetectionHead",
    "HeadConfigError",
    "HeadOutputs",
    "MAX_LAYERS",
    "build_head",
    "check_head_options",
    "list_heads",
    "resolve_head_config",
]
