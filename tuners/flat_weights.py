"""A model's tensors as views of one buffer laid out like a safetensors file's data section.

Once a model's tensors are laid out so, reading another file with the same layout (the next version
of a task, or another task of the same architecture read into a spare model) is one ``readinto``
of the data section into the buffer, plus one copy to the model's device, instead of one read per
tensor after a walk of the module tree. The layout is recognised by the file's header entries
(compared as parsed JSON: writers order them freely), so a file that differs in any key, dtype,
shape or offset takes the checked path again (:func:`tuners.artifact.read_weights`).
"""

from __future__ import annotations

from typing import BinaryIO

import torch
from torch import Tensor, nn

FLAT = "_flat_weights"  # the attribute of a model that holds its FlatWeights


class FlatWeights:
    """The buffer behind a model's state tensors, and how to tell that the model still uses it.

    Args:
        entries: the parsed safetensors header (without ``__metadata__``) the layout was made for.
        buffer: uint8 ``[nbytes]`` on the model's device; every state tensor is a view of it.
        slots: per state tensor, its owner's ``_parameters`` or ``_buffers`` dict, its name there and
            its data pointer. A move to another device or a replaced buffer changes the pointer.
    """

    def __init__(self, entries: dict, buffer: Tensor, slots: list[tuple[dict[str, Tensor], str, int]]) -> None:
        self.entries, self.buffer, self.slots = entries, buffer, slots

    @staticmethod
    def of(model: nn.Module, entries: dict) -> FlatWeights | None:
        """The model's layout when it was made for a file with these header entries and the model still
        holds its tensors there; else None."""
        flat = model.__dict__.get(FLAT)
        if flat is None or flat.entries != entries:
            return None
        if any(name not in owner or owner[name].data_ptr() != ptr for owner, name, ptr in flat.slots):
            return None
        return flat

    @staticmethod
    def lay_out(model: nn.Module, state: dict[str, Tensor], entries: dict) -> FlatWeights | None:
        """Rebinds the tensors of ``state`` (``model.state_dict()``, already checked against ``entries``,
        the file's parsed header) as views of one new buffer, and records it on the model. None, with the model
        unchanged, where the layout cannot hold them: tensors on several devices or sharing memory,
        overlapping or misaligned data offsets, or a state key that is no parameter or buffer."""
        devices = {t.device for t in state.values()}
        ptrs = [t.data_ptr() for t in state.values() if t.numel()]
        spans = sorted(tuple(entries[k]["data_offsets"]) for k in state)
        if len(devices) != 1 or len(set(ptrs)) != len(ptrs) or any(a[1] > b[0] for a, b in zip(spans, spans[1:])):
            return None
        buffer = torch.empty(max((end for _, end in spans), default=0), dtype=torch.uint8, device=devices.pop())
        slots, views = [], []
        for key, t in state.items():
            module_name, _, name = key.rpartition(".")
            module = model.get_submodule(module_name)
            owner = module._parameters if name in module._parameters else module._buffers
            begin, end = entries[key]["data_offsets"]
            if name not in owner or owner[name] is None or begin % t.element_size():
                return None
            views.append((owner, name, buffer[begin:end].view(t.dtype).view(t.shape)))
        for owner, name, view in views:
            if isinstance(owner[name], nn.Parameter):
                owner[name].data = view
            else:
                owner[name] = view
            slots.append((owner, name, owner[name].data_ptr()))
        flat = FlatWeights(entries, buffer, slots)
        model.__dict__[FLAT] = flat
        return flat

    def read(self, f: BinaryIO) -> bool:
        """Reads the data section from ``f`` (positioned at its start) into the buffer; False when the
        file ends first."""
        staging = self.buffer if self.buffer.device.type == "cpu" else torch.empty_like(self.buffer, device="cpu")
        if f.readinto(memoryview(staging.numpy())) != staging.numel():
            return False
        if staging is not self.buffer:
            self.buffer.copy_(staging)
        return True
