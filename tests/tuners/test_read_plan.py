"""Reading weights with one system call (tuners.read_plan, tuners.artifact.read_weights): a reload of the
same layout fills exactly what the file holds, into the model's own tensors, and anything that breaks
the plan's assumptions takes the checked path instead."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tuners.artifact as artifact
from tests.conftest import needs_cuda, small_backbone
from tuners import build_task_model
from tuners.artifact import DTYPES, WEIGHTS, load_artifact, read_weights, save_artifact
from tuners.read_plan import PLAN, ReadPlan
from tuners.task_model import TaskModel

BACKBONE = small_backbone("resnet18")
NAMES = {dtype: name for name, dtype in DTYPES.items()}


def _task(seed: int, method: str = "cst") -> TaskModel:
    torch.manual_seed(seed)
    model = build_task_model(method, {}, BACKBONE, ["a", "b"])
    for t in model.state_dict().values():
        if t.is_floating_point():
            t.add_(0.01 * torch.rand_like(t))  # buffers too (BatchNorm variances stay positive): tasks differ in all
    return model.eval()


def _write(path: Path, tensors: dict[str, torch.Tensor], order: list[str], gap: int = 0) -> None:
    """A safetensors file by hand: entries in ``order`` in the header and in the data, ``gap`` bytes before each."""
    header, chunks, offset = {}, [], 0
    for key in order:
        data = tensors[key].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        chunks.append(b"\0" * gap + data)
        begin = offset + gap
        header[key] = {"dtype": NAMES[tensors[key].dtype], "shape": list(tensors[key].shape)}
        header[key]["data_offsets"] = [begin, begin + len(data)]
        offset = begin + len(data)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(chunks))


def _assert_holds(model: TaskModel, tensors: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert state.keys() == tensors.keys()
    for key, t in tensors.items():
        assert torch.equal(state[key], t), key


@pytest.fixture
def loaded(tmp_path: Path) -> tuple[TaskModel, Path]:
    """A model loaded from an artifact (its plan made by that load), and a second task's weights file."""
    first = save_artifact(_task(1), BACKBONE, tmp_path / "first")
    second = save_artifact(_task(2), BACKBONE, tmp_path / "second")
    return load_artifact(first, BACKBONE)[0], second / WEIGHTS


def _count(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts plans made, system calls that read a whole file, and tensor-by-tensor reads."""
    calls = {"plans": 0, "preadv": 0, "each": 0}
    make, preadv, each = ReadPlan.make, os.preadv, artifact._read_each

    def counted(name: str, real):  # noqa: ANN001, ANN202
        return lambda *a: calls.__setitem__(name, calls[name] + 1) or real(*a)

    monkeypatch.setattr(ReadPlan, "make", staticmethod(counted("plans", make)))
    monkeypatch.setattr(os, "preadv", counted("preadv", preadv))
    monkeypatch.setattr(artifact, "_read_each", counted("each", each))
    return calls


def _reordered(source: Path, out: Path) -> Path:
    """``source`` with its header's entries listed in the opposite order; the data section unchanged."""
    raw = source.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    entries = json.loads(raw[8 : 8 + length])
    reordered = json.dumps(dict(reversed(list(entries.items())))).encode()
    assert reordered != raw[8 : 8 + length]
    out.write_bytes(struct.pack("<Q", len(reordered)) + reordered + raw[8 + length :])
    return out


def test_a_reload_of_the_same_layout_is_one_call_whatever_order_its_header_lists(
    loaded: tuple[TaskModel, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """safetensors writes header entries in no fixed order: the layout is matched on the parsed entries."""
    model, second = loaded
    assert PLAN in model.__dict__
    calls = _count(monkeypatch)
    for path in (second, _reordered(second, tmp_path / "reordered.safetensors")):
        assert read_weights(path, model) == []
        _assert_holds(model, load_file(str(second)))
    assert calls == {"plans": 0, "preadv": 2, "each": 0}


def test_a_refilled_model_computes_bit_for_bit_what_a_fresh_load_does(
    loaded: tuple[TaskModel, Path], tmp_path: Path
) -> None:
    """The tensors are filled where they are: their memory, and so the kernels' results, are a fresh model's."""
    model, second = loaded
    assert read_weights(second, model) == []
    fresh = load_artifact(second.parent, BACKBONE)[0]
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(BACKBONE, images).tensors, fresh(BACKBONE, images).tensors, rtol=0, atol=0)


def test_a_different_layout_is_checked_and_planned_again(
    loaded: tuple[TaskModel, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, second = loaded
    tensors = load_file(str(second))
    _write(tmp_path / "reversed.safetensors", tensors, sorted(tensors, reverse=True), gap=3)
    calls = _count(monkeypatch)
    assert read_weights(tmp_path / "reversed.safetensors", model) == []
    _assert_holds(model, tensors)
    assert calls == {"plans": 1, "preadv": 1, "each": 0}  # gaps between tensors are read into scratch
    tensors["tuner.surprise"] = torch.zeros(2)
    _write(tmp_path / "extra.safetensors", tensors, sorted(tensors))
    assert read_weights(tmp_path / "extra.safetensors", model) == ["extra key tuner.surprise"]


def test_overlapping_data_is_read_tensor_by_tensor(
    loaded: tuple[TaskModel, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two entries over the same bytes are valid safetensors, and one sequential read cannot fill both."""
    model, second = loaded
    tensors = load_file(str(second))
    first, twin = next((a, b) for a in tensors for b in tensors if a < b and tensors[a].shape == tensors[b].shape)
    tensors[twin] = tensors[first].clone()
    _write(tmp_path / "overlap.safetensors", tensors, sorted(tensors))
    raw = (tmp_path / "overlap.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    entries = json.loads(raw[8 : 8 + length])
    entries[twin]["data_offsets"] = entries[first]["data_offsets"]
    edited = json.dumps(entries).encode()
    (tmp_path / "overlap.safetensors").write_bytes(struct.pack("<Q", len(edited)) + edited + raw[8 + length :])
    calls = _count(monkeypatch)
    assert read_weights(tmp_path / "overlap.safetensors", model) == []
    _assert_holds(model, tensors)
    assert calls["each"] == 1 and calls["preadv"] == 0


def test_tensors_replaced_since_the_plan_are_filled_and_the_old_ones_left_alone(
    loaded: tuple[TaskModel, Path],
) -> None:
    """A move to another device replaces the tensors (``param.data``, new buffer objects); the plan looks
    them up at each read, so the new ones are filled and nothing writes through an old reference."""
    model, second = loaded
    old = {k: t.clone() for k, t in model.state_dict().items()}
    kept = dict(model.state_dict())
    for module in model.modules():
        for name, t in list(module._buffers.items()):
            if t is not None:
                module._buffers[name] = t.clone()
        for p in module._parameters.values():
            if p is not None:
                p.data = p.data.clone()
    assert read_weights(second, model) == []
    _assert_holds(model, load_file(str(second)))
    assert all(torch.equal(kept[k], old[k]) for k in old)


def test_a_file_cut_short_after_its_header_is_refused(loaded: tuple[TaskModel, Path], tmp_path: Path) -> None:
    model, second = loaded
    data = second.read_bytes()
    (tmp_path / "short.safetensors").write_bytes(data[:-4])
    problems = read_weights(tmp_path / "short.safetensors", model)
    assert len(problems) == 1 and "data offsets" in problems[0]


def test_tensors_numpy_cannot_view_are_read_once_through_a_staging_buffer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bfloat16 stands here for what a GPU holds: one read of the file into host memory, then a copy per
    tensor, never tensor by tensor; a file cut short leaves the tensors as they were."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)).to(torch.bfloat16)
    tensors = {k: torch.randn(t.shape).to(torch.bfloat16) for k, t in model.state_dict().items()}
    _write(tmp_path / "bf16.safetensors", tensors, sorted(tensors), gap=2)
    calls = _count(monkeypatch)
    staged, calls["staged"] = ReadPlan.read_staged, 0

    def counted(*args):  # noqa: ANN002, ANN202
        calls["staged"] += 1
        return staged(*args)

    monkeypatch.setattr(ReadPlan, "read_staged", counted)
    for _ in range(2):
        assert read_weights(tmp_path / "bf16.safetensors", model) == []
        _assert_holds(model, tensors)  # type: ignore[arg-type]
    assert calls == {"plans": 1, "preadv": 0, "each": 0, "staged": 2}
    before = {k: t.clone() for k, t in model.state_dict().items()}
    data = (tmp_path / "bf16.safetensors").read_bytes()
    (tmp_path / "short.safetensors").write_bytes(data[:-2])
    plan = ReadPlan.of(model, json.loads(data[8 : 8 + struct.unpack("<Q", data[:8])[0]]))
    with open(tmp_path / "short.safetensors", "rb") as f:
        assert plan is not None and plan.read_staged(f, 8 + struct.unpack("<Q", data[:8])[0]) == plan.nbytes - 2
    _assert_holds(model, before)


def test_a_non_contiguous_tensor_is_read_tensor_by_tensor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A weight that is a transposed view: neither one call nor the staging buffer can fill it in place."""
    model = torch.nn.Linear(4, 3)
    model.weight.data = torch.randn(4, 3).t()
    tensors = {"weight": torch.randn(3, 4), "bias": torch.randn(3)}
    _write(tmp_path / "strided.safetensors", tensors, sorted(tensors))
    calls = _count(monkeypatch)
    for _ in range(2):
        assert read_weights(tmp_path / "strided.safetensors", model) == []
        _assert_holds(model, tensors)  # type: ignore[arg-type]
    assert calls["each"] == 2 and calls["preadv"] == 0


def test_tied_tensors_stay_tied_and_are_read_in_one_call(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A module whose state lists one tensor under two keys keeps one tensor, which the call fills twice."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4, bias=False), torch.nn.Linear(4, 4, bias=False))
    model[1].weight = model[0].weight
    tensors = {"0.weight": torch.randn(4, 4)}
    tensors["1.weight"] = tensors["0.weight"].clone()
    _write(tmp_path / "tied.safetensors", tensors, sorted(tensors))
    calls = _count(monkeypatch)
    for _ in range(2):
        assert read_weights(tmp_path / "tied.safetensors", model) == []
        assert model[0].weight is model[1].weight and torch.equal(model[0].weight, tensors["0.weight"])
    assert calls == {"plans": 1, "preadv": 2, "each": 0}


@pytest.mark.parametrize("method", ["linear_probe", "lora", "hst", "full_finetune"])
def test_every_kind_of_task_is_reloaded_in_one_call(
    method: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Side and inline tuners, a head alone, and a tuner that carries a copy of backbone layers."""
    first = save_artifact(_task(1, method), BACKBONE, tmp_path / "first")
    second = save_artifact(_task(2, method), BACKBONE, tmp_path / "second")
    model = load_artifact(first, BACKBONE)[0]
    calls = _count(monkeypatch)
    assert read_weights(second / WEIGHTS, model) == []
    _assert_holds(model, load_file(str(second / WEIGHTS)))
    assert calls == {"plans": 0, "preadv": 1, "each": 0}


@needs_cuda
def test_a_cuda_model_is_refilled_from_one_staged_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _task(1).cuda()
    tensors = {k: v.cpu() for k, v in _task(2).state_dict().items()}
    _write(tmp_path / "second.safetensors", tensors, sorted(tensors))
    calls = _count(monkeypatch)
    for _ in range(2):
        assert read_weights(tmp_path / "second.safetensors", model) == []
        state = model.state_dict()
        assert all(state[k].is_cuda and torch.equal(state[k].cpu(), t) for k, t in tensors.items())
    assert calls == {"plans": 1, "preadv": 0, "each": 0}
