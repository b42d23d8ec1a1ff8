"""Side tasks of one architecture, asked about the same images, run as one stacked computation.

``torch.func.stack_module_state`` stacks the tasks' tensors along a new leading dimension and
``torch.vmap`` runs tuner + head once for all of them, over the same shared taps: the batched
convolutions become grouped ones, one kernel launch for K tasks instead of K (Punica and S-LoRA
do this for LoRA). On a GPU at small batches this is what keeps K tasks near the cost of one;
on the CPU a compiled graph per task is faster (``bench/serve_load.py`` measures both).

A stack holds weak references to its members (and their weight generations) and is rebuilt
whenever the set of models differs, so a task that was evicted, replaced or deleted, or a model
object the cache refilled with another task's weights, is never served from an old stack.
"""

from __future__ import annotations

import copy
import math
import threading
import weakref
from collections import OrderedDict
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state

from models.heads import HeadOutputs
from tuners.task_model import TaskModel


def stack_key(model: TaskModel) -> str:
    """Tasks with equal keys can share a stack (see :attr:`TaskModel.architecture`)."""
    return model.architecture


class _HeadTensors(nn.Module):
    """``TaskModel.head_outputs`` as a plain dict of tensors, which ``vmap`` can return."""

    def __init__(self, model: TaskModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, taps: dict[str, Tensor], images: Tensor | None) -> dict[str, Tensor]:
        return self.model.head_outputs(taps, images).tensors


class TaskStack:
    """K side tasks of one :func:`stack_key`, run as one vmapped computation.

    Args:
        models: the members, in eval mode, on one device.
    """

    def __init__(self, models: list[TaskModel]) -> None:
        if len({stack_key(m) for m in models}) != 1:
            raise ValueError("a stack holds tasks of one method, config and head only")
        self.members = [(weakref.ref(m), m.generation) for m in models]
        wrappers = [_HeadTensors(m) for m in models]
        self.params, self.buffers = stack_module_state(wrappers)  # each [K, ...], copies of the members' tensors
        self.base = copy.deepcopy(wrappers[0]).to("meta")
        self.strides = models[0].head.strides

    def holds(self, models: list[TaskModel]) -> bool:
        """Whether this stack was built from exactly these model objects, alive and holding the same weights."""
        return len(models) == len(self.members) and all(
            ref() is m and generation == m.generation for (ref, generation), m in zip(self.members, models)
        )

    def __call__(
        self, taps: dict[str, Tensor], canvas: tuple[int, int], images: Tensor | None = None
    ) -> list[HeadOutputs]:
        """Shared ``{tap: [B, C, h, w]}`` on a ``canvas`` (H, W) -> head outputs per member, in member order."""

        def one(params: dict[str, Tensor], buffers: dict[str, Tensor]) -> dict[str, Tensor]:
            return functional_call(self.base, (params, buffers), (taps, images))

        out = torch.vmap(one)(self.params, self.buffers)
        shapes = [(math.ceil(canvas[0] / s), math.ceil(canvas[1] / s)) for s in self.strides]
        return [HeadOutputs({k: v[i] for k, v in out.items()}, shapes) for i in range(len(self.members))]


class StackCache:
    """The stacks in use, at most ``max_stacks`` (LRU); a stack is rebuilt when its members change."""

    def __init__(self, max_stacks: int = 8) -> None:
        self.max_stacks = max_stacks
        self._stacks: OrderedDict[tuple[Any, ...], TaskStack] = OrderedDict()
        self._lock = threading.Lock()
        self.builds = 0  # tests read it

    def get(self, models: list[TaskModel]) -> TaskStack:
        key = tuple(id(m) for m in models)
        with self._lock:
            stack = self._stacks.get(key)
            if stack is not None and stack.holds(models):
                self._stacks.move_to_end(key)
                return stack
            stack = self._stacks[key] = TaskStack(models)
            self.builds += 1
            while len(self._stacks) > self.max_stacks:
                self._stacks.popitem(last=False)
            return stack
