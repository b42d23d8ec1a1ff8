"""What the tuner cache holds: entries (a task version's model and its bookkeeping) and the leases
that batches take on them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from tuners.compiled import CompiledTask
from tuners.task_model import TaskModel

Key = tuple[str, int]  # (task id, version)


def model_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def to_host(model: torch.nn.Module, pin: bool) -> None:
    """Moves ``model`` to host memory, page-locked when ``pin`` (a GPU reads it back with non-blocking copies)."""
    model.to("cpu")
    if pin:
        for t in [*model.parameters(), *model.buffers()]:
            t.data = t.data.pin_memory()


def entry_bytes(model: TaskModel, compiles: bool) -> int:
    """What an entry costs: its tensors, twice for a side task that will also hold a compiled graph."""
    return model_bytes(model) * (2 if compiles and model.kind == "side" else 1)


@dataclass
class Entry:
    key: Key
    model: TaskModel
    manifest: dict[str, Any]
    nbytes: int
    refs: int = 0
    stale: bool = False  # deleted or replaced: dropped when the last user releases it
    compiled: CompiledTask | None = None
    uses: int = 0  # requests served while resident
    arch: str = ""  # TaskModel.architecture, for reusing the model object

    def __post_init__(self) -> None:
        self.arch = self.arch or self.model.architecture


@dataclass
class Lease:
    """A task model held for one batch; :meth:`TunerCache.release` it when done."""

    entry: Entry
    released: bool = field(default=False)

    @property
    def model(self) -> TaskModel:
        return self.entry.model

    @property
    def version(self) -> int:
        return self.entry.key[1]

    @property
    def compiled(self) -> CompiledTask | None:
        return self.entry.compiled
