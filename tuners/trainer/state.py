"""Resumable training state without pickle: safetensors for tensors, JSON for everything else.

``OUT/state/`` holds ``model.safetensors`` (the task model), ``optimizer.safetensors`` (per-parameter
optimizer tensors and the torch RNG state) and ``trainer_state.json`` (epoch, best metric, history,
scheduler position, optimizer hyper-parameters). It is written atomically like an artifact.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from models.files import replacing_folder

MODEL, OPTIMIZER, STATE = "model.safetensors", "optimizer.safetensors", "trainer_state.json"


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Splits ``optimizer.state_dict()`` into flat tensors and JSON-able rest."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, slots in state["state"].items():
        for name, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], rest: dict) -> None:
    slots: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("state."):
            _, index, name = key.split(".", 2)
            slots.setdefault(int(index), {})[name] = value
    for index, values in rest["scalars"].items():
        slots.setdefault(int(index), {}).update(values)
    optimizer.load_state_dict({"state": slots, "param_groups": rest["param_groups"]})


def save_state(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, info: dict[str, Any]) -> None:
    """Atomically replaces ``folder`` with the model, optimizer, RNG and ``info`` (JSON-able)."""
    tensors, rest = optimizer_tensors(optimizer)
    tensors["rng.torch"] = torch.get_rng_state()
    with replacing_folder(folder) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp / MODEL))
        save_file(tensors, str(tmp / OPTIMIZER))
        (tmp / STATE).write_text(json.dumps({**info, "optimizer": rest}, indent=2))


def load_state(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restores what :func:`save_state` wrote and returns the ``info`` it was given."""
    missing = [n for n in (MODEL, OPTIMIZER, STATE) if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(f"cannot resume: {folder} lacks {', '.join(missing)}")
    info = json.loads((folder / STATE).read_text())
    model.load_state_dict(load_file(str(folder / MODEL)), strict=True)
    tensors = load_file(str(folder / OPTIMIZER))
    torch.set_rng_state(tensors.pop("rng.torch"))
    restore_optimizer(optimizer, tensors, info.pop("optimizer"))
    return info
