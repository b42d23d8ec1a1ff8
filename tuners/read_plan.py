"""One-call refills: a safetensors file read straight into a model's own tensors with one ``preadv``.

Reading a file tensor by tensor gives up the GIL and takes it back once per tensor (136 times for a
``cst`` task), and under load each of those waits for a core and for the GIL: a cold load then
spends most of its time waiting. A :class:`ReadPlan` is made once a file's header has been checked
against a model (:func:`tuners.artifact.read_weights`) and kept on the model. A later file whose
header has the same entries (compared as parsed JSON: writers order them freely), such as another
task of the same architecture refilling a spare model, is then read with one ``os.preadv`` into the
tensors' own memory: one system call, one release of the GIL, and nothing else to check. The
tensors stay where they are, so a model computes bit for bit what it did before.
"""

from __future__ import annotations

import os

import numpy as np
from torch import Tensor, nn

PLAN = "_read_plan"  # the attribute of a model that holds its ReadPlan
IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 16


class ReadPlan:
    """Where each byte of a file's data section goes in a model.

    Args:
        entries: the parsed safetensors header (without ``__metadata__``) the plan was made for.
        pieces: in file order, per tensor, the bytes to skip before it, its owner's ``_parameters`` or
            ``_buffers`` dict and name there (the tensor is looked up at each read, so a tensor that was
            replaced, as a move to another device does, is never written through a stale reference),
            and its size in bytes.
        nbytes: bytes from the start of the data section to the end of its last tensor.
    """

    def __init__(self, entries: dict, pieces: list[tuple[int, dict[str, Tensor], str, int]], nbytes: int) -> None:
        self.entries, self.pieces, self.nbytes = entries, pieces, nbytes

    @staticmethod
    def of(model: nn.Module, entries: dict) -> ReadPlan | None:
        """The model's plan when it was made for a file with these header entries; else None."""
        plan = model.__dict__.get(PLAN)
        return plan if plan is not None and plan.entries == entries else None

    @staticmethod
    def make(model: nn.Module, state: dict[str, Tensor], entries: dict) -> ReadPlan | None:
        """A plan for ``state`` (``model.state_dict()``, already checked against ``entries``, the file's
        parsed header), recorded on the model. None where one ``preadv`` cannot express the file: no
        ``preadv`` here, overlapping data offsets, too many pieces, or a state key that is no parameter
        or buffer of the model."""
        if not hasattr(os, "preadv"):
            return None
        pieces, end = [], 0
        for key in sorted(state, key=lambda k: entries[k]["data_offsets"][0]):
            begin, stop = entries[key]["data_offsets"]
            module_name, _, name = key.rpartition(".")
            module = model.get_submodule(module_name)
            owner = module._parameters if name in module._parameters else module._buffers
            if begin < end or owner.get(name) is None:
                return None
            pieces.append((begin - end, owner, name, stop - begin))
            end = stop
        if len(pieces) + sum(1 for piece in pieces if piece[0]) > IOV_MAX:
            return None
        plan = ReadPlan(entries, pieces, end)
        model.__dict__[PLAN] = plan
        return plan

    def buffers(self) -> list[np.ndarray | bytearray] | None:
        """Arrays over every tensor's own memory (and scratch for the gaps), in file order, for ``preadv``;
        None when a tensor is not a contiguous CPU tensor of the planned size that NumPy can view (the
        caller reads tensor by tensor then). Only lookups here, none of which gives up the GIL."""
        arrays: list[np.ndarray | bytearray] = []
        try:
            for gap, owner, name, nbytes in self.pieces:
                if gap:
                    arrays.append(bytearray(gap))
                array = owner[name].data.numpy()  # TypeError on CUDA or for bfloat16; AttributeError for None
                if array.nbytes != nbytes or not array.flags.c_contiguous:
                    return None
                arrays.append(array)
        except (AttributeError, KeyError, TypeError):
            return None
        return arrays
