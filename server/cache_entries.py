"""What the tuner cache holds: entries (a task version's model and its bookkeeping), the leases
that batches take on them, and spare models."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch

from tuners.compiled import CompiledTask
from tuners.task_model import TaskModel

Key = tuple[str, int]  # (task id, version)
MAX_SPARES = 8  # spare models kept for reuse, across architectures


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


class Spares:
    """Models that hold no task, kept for the next cold load of their architecture: at most ``MAX_SPARES``,
    the oldest dropped first. Their bytes count against the device tier's budget."""

    def __init__(self) -> None:
        self._models: OrderedDict[int, tuple[str, TaskModel, int]] = OrderedDict()  # id -> (arch, model, bytes)

    def __len__(self) -> int:
        return len(self._models)

    @property
    def nbytes(self) -> int:
        return sum(nbytes for _, _, nbytes in self._models.values())

    def add(self, model: TaskModel, nbytes: int) -> None:
        self._models[id(model)] = (model.architecture, model, nbytes)
        while len(self._models) > MAX_SPARES:
            self._models.popitem(last=False)

    def take(self, arch: str) -> TaskModel | None:
        """A spare of architecture ``arch``, no longer kept; None when there is none."""
        found = next((key for key, (a, _, _) in self._models.items() if a == arch), None)
        return None if found is None else self._models.pop(found)[1]

    def drop_oldest(self) -> None:
        self._models.popitem(last=False)
