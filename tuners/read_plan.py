"""One-call refills: a safetensors file read straight into a model's own tensors with one ``preadv``.

Reading a file tensor by tensor gives up the GIL and takes it back once per tensor (136 times for a
``cst`` task), and under load each of those waits for a core and for the GIL: a cold load then
spends most of its time waiting. A :class:`ReadPlan` is made once a file's header has been checked
against a model (:func:`tuners.artifact.read_weights`) and kept on the model. A later file whose
header has the same entries (compared as parsed JSON: writers order them freely), such as another
task of the same architecture refilling a spare model, is then read with one ``os.preadv`` into the
tensors' own memory: one system call, one release of the GIL, and nothing else to check. The
tensors stay where they are, so a model computes bit for bit what it did before.

Tensors NumPy cannot view (on a GPU, or bfloat16) are filled from one read of the data section into
a host staging buffer (page-locked when a GPU is filled), then one copy per tensor (non-blocking to a
GPU): :meth:`ReadPlan.read_staged`.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import BinaryIO

import numpy as np
import torch
from torch import Tensor, nn

PLAN = "_read_plan"  # the attribute of a model that holds its ReadPlan
IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 16
_STAGING_LOCK = threading.Lock()
_staging: dict[bool, Tensor] = {}  # page-locked or not -> the one reusable host buffer, grown as needed
_streams: dict[torch.device, torch.cuda.Stream] = {}  # a GPU -> the stream refills copy on


def _copy_stream(device: torch.device) -> torch.cuda.Stream:
    """The stream that refills tensors on ``device`` (call with ``_STAGING_LOCK`` held). It first waits for
    the work already queued on the device's current stream, which may still read the old weights; the
    requests' own streams are never synchronised by a load."""
    stream = _streams.get(device)
    if stream is None:
        stream = _streams[device] = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    return stream


def _staging_buffer(nbytes: int, pinned: bool) -> Tensor:
    """A uint8 host buffer of at least ``nbytes`` (call with ``_STAGING_LOCK`` held)."""
    buffer = _staging.get(pinned)
    if buffer is None or buffer.numel() < nbytes:
        buffer = _staging[pinned] = torch.empty(nbytes, dtype=torch.uint8, device="cpu", pin_memory=pinned)
    return buffer


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

    def read_staged(self, f: BinaryIO, base: int) -> int | None:
        """Fills the tensors :meth:`buffers` cannot view (CUDA, bfloat16) from one read of the data section,
        at ``base`` in ``f``, into a host staging buffer, then one byte copy per tensor (non-blocking from
        page-locked memory to a GPU, on a stream of its own that is waited for before the buffer is used
        again). Returns the bytes
        read (short of :attr:`nbytes` when the file is: nothing is copied then); None when a tensor is
        missing, not contiguous or not of the planned size (the caller reads tensor by tensor)."""
        targets = []
        for _, owner, name, nbytes in self.pieces:
            t = owner.get(name)
            if t is None or not t.is_contiguous() or t.numel() * t.element_size() != nbytes:
                return None
            targets.append(t.detach().reshape(-1).view(torch.uint8))
        with _STAGING_LOCK:
            staging = _staging_buffer(self.nbytes, pinned=any(t.is_cuda for t in targets))[: self.nbytes]
            f.seek(base)
            read = f.readinto(memoryview(staging.numpy()))
            if read != self.nbytes:
                return read
            gpu = next((t.device for t in targets if t.is_cuda), None)
            stream = _copy_stream(gpu) if gpu is not None else None
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                offset = 0
                for (gap, _, _, nbytes), target in zip(self.pieces, targets):
                    offset += gap
                    target.copy_(staging[offset : offset + nbytes], non_blocking=stream is not None)
                    offset += nbytes
            if stream is not None:
                stream.synchronize()  # the copies read the staging buffer, which the next read overwrites
        return read
