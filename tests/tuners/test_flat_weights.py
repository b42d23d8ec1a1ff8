"""Reading weights into a model laid out as one buffer (tuners.flat_weights, tuners.artifact.read_weights):
the one-read path serves exactly what the file holds, and anything that breaks its assumptions takes
the checked path instead."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tuners.artifact as artifact
from tests.conftest import small_backbone
from tuners import build_task_model
from tuners.artifact import DTYPES, WEIGHTS, load_artifact, read_weights, save_artifact
from tuners.flat_weights import FLAT, FlatWeights
from tuners.task_model import TaskModel

BACKBONE = small_backbone("resnet18")
NAMES = {dtype: name for name, dtype in DTYPES.items()}


def _task(seed: int, method: str = "cst") -> TaskModel:
    torch.manual_seed(seed)
    model = build_task_model(method, {}, BACKBONE, ["a", "b"])
    for t in model.state_dict().values():
        if t.is_floating_point():
            t.normal_()  # buffers too (BatchNorm statistics), so every tensor tells the tasks apart
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
    """A model loaded from an artifact (laid out flat by that load), and a second task's weights file."""
    first = save_artifact(_task(1), BACKBONE, tmp_path / "first")
    second = save_artifact(_task(2), BACKBONE, tmp_path / "second")
    return load_artifact(first, BACKBONE)[0], second / WEIGHTS


def _count_layouts(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = FlatWeights.lay_out
    monkeypatch.setattr(FlatWeights, "lay_out", staticmethod(lambda *a: calls.append(1) or real(*a)))
    return calls


def test_a_load_lays_the_model_out_as_views_of_one_buffer(loaded: tuple[TaskModel, Path]) -> None:
    model, _ = loaded
    flat = model.__dict__[FLAT]
    storage = flat.buffer.untyped_storage().data_ptr()
    assert all(t.untyped_storage().data_ptr() == storage for t in model.state_dict().values())
    assert flat.buffer.numel() >= sum(t.numel() * t.element_size() for t in model.state_dict().values())


def test_a_file_of_the_same_layout_is_one_read_whatever_order_its_header_lists(
    loaded: tuple[TaskModel, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """safetensors writes header entries in no fixed order: the layout is matched on the parsed entries."""
    model, second = loaded
    raw = second.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    reordered = json.dumps(dict(reversed(list(header.items())))).encode()
    assert reordered != raw[8 : 8 + length]
    (tmp_path / "reordered.safetensors").write_bytes(struct.pack("<Q", len(reordered)) + reordered + raw[8 + length :])
    layouts = _count_layouts(monkeypatch)
    monkeypatch.setattr(artifact, "_read_each", lambda *a: pytest.fail("read tensor by tensor"))
    for path in (second, tmp_path / "reordered.safetensors"):
        assert read_weights(path, model) == []
        _assert_holds(model, load_file(str(second)))
    assert layouts == []


def test_a_different_layout_is_checked_and_laid_out_again(
    loaded: tuple[TaskModel, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, second = loaded
    tensors = load_file(str(second))
    _write(tmp_path / "reversed.safetensors", tensors, sorted(tensors, reverse=True), gap=8)
    layouts = _count_layouts(monkeypatch)
    assert read_weights(tmp_path / "reversed.safetensors", model) == []
    _assert_holds(model, tensors)
    assert layouts == [1]
    tensors["tuner.surprise"] = torch.zeros(2)
    _write(tmp_path / "extra.safetensors", tensors, sorted(tensors))
    assert read_weights(tmp_path / "extra.safetensors", model) == ["extra key tuner.surprise"]


def test_a_layout_the_buffer_cannot_hold_is_read_tensor_by_tensor(
    loaded: tuple[TaskModel, Path], tmp_path: Path
) -> None:
    """Data offsets that are not multiples of a float's size cannot be views of one buffer."""
    model, second = loaded
    tensors = load_file(str(second))
    _write(tmp_path / "odd.safetensors", tensors, sorted(tensors), gap=1)
    before = model.__dict__[FLAT]
    assert read_weights(tmp_path / "odd.safetensors", model) == []
    _assert_holds(model, tensors)
    assert model.__dict__[FLAT] is before  # the model was left as it was, and read into in place


def test_a_model_whose_tensors_moved_is_never_read_through_its_old_buffer(loaded: tuple[TaskModel, Path]) -> None:
    """A move to another device replaces the tensors (``param.data``, new buffer objects); the old
    buffer no longer backs them, so a read must not go there."""
    model, second = loaded
    for module in model.modules():
        for name, t in list(module._buffers.items()):
            if t is not None:
                module._buffers[name] = t.clone()
        for p in module._parameters.values():
            if p is not None:
                p.data = p.data.clone()
    assert read_weights(second, model) == []
    _assert_holds(model, load_file(str(second)))


def test_a_file_cut_short_after_its_header_is_refused(loaded: tuple[TaskModel, Path], tmp_path: Path) -> None:
    model, second = loaded
    data = second.read_bytes()
    (tmp_path / "short.safetensors").write_bytes(data[:-4])
    problems = read_weights(tmp_path / "short.safetensors", model)
    assert len(problems) == 1 and "data offsets" in problems[0]


@pytest.mark.parametrize("method", ["linear_probe", "lora", "hst", "full_finetune"])
def test_every_kind_of_task_reads_and_saves_through_its_buffer(method: str, tmp_path: Path) -> None:
    """Side and inline tuners, a head alone, a tuner that carries a copy of backbone layers; and a
    model read this way saves as it did (safetensors refuses tensors that share memory)."""
    first = save_artifact(_task(1, method), BACKBONE, tmp_path / "first")
    second = save_artifact(_task(2, method), BACKBONE, tmp_path / "second")
    model = load_artifact(first, BACKBONE)[0]
    assert FLAT in model.__dict__
    assert read_weights(second / WEIGHTS, model) == []
    _assert_holds(model, load_file(str(second / WEIGHTS)))
    again = save_artifact(model, BACKBONE, tmp_path / "again")
    _assert_holds(load_artifact(again, BACKBONE)[0], load_file(str(second / WEIGHTS)))


def test_overlapping_data_is_read_into_tensors_that_stay_apart(loaded: tuple[TaskModel, Path], tmp_path: Path) -> None:
    """Two entries over the same bytes are valid safetensors; as views they would alias two tensors, and a
    model with aliased tensors no longer saves (safetensors refuses shared memory)."""
    model, second = loaded
    tensors = load_file(str(second))
    first, twin = next((a, b) for a in tensors for b in tensors if a < b and tensors[a].shape == tensors[b].shape)
    tensors[twin] = tensors[first].clone()
    _write(tmp_path / "overlap.safetensors", tensors, sorted(tensors))
    raw = (tmp_path / "overlap.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    header[twin]["data_offsets"] = header[first]["data_offsets"]
    edited = json.dumps(header).encode()
    (tmp_path / "overlap.safetensors").write_bytes(struct.pack("<Q", len(edited)) + edited + raw[8 + length :])
    assert read_weights(tmp_path / "overlap.safetensors", model) == []
    _assert_holds(model, tensors)
    assert model.state_dict()[first].data_ptr() != model.state_dict()[twin].data_ptr()
    save_artifact(model, BACKBONE, tmp_path / "saved")


def test_tied_tensors_stay_tied(tmp_path: Path) -> None:
    """A module whose state lists one tensor under two keys is read in place, not split into two views."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4, bias=False), torch.nn.Linear(4, 4, bias=False))
    model[1].weight = model[0].weight
    tensors = {"0.weight": torch.randn(4, 4), "1.weight": torch.randn(4, 4)}
    tensors["1.weight"] = tensors["0.weight"].clone()
    _write(tmp_path / "tied.safetensors", tensors, sorted(tensors))
    assert read_weights(tmp_path / "tied.safetensors", model) == []
    assert model[0].weight is model[1].weight and torch.equal(model[0].weight, tensors["0.weight"])
    assert FLAT not in model.__dict__
