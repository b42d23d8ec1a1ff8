"""Malformed artifacts are rejected, each with an error naming the problem."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import tuners.artifact as artifact_module
from models.heads import resolve_head_config
from tests.conftest import small_backbone
from tuners import build_task_model
from tuners.artifact import (
    FORMAT_VERSION,
    LEGACY_HEAD_DEFAULTS,
    MANIFEST,
    WEIGHTS,
    _pieces,
    load_artifact,
    nonfinite,
    save_artifact,
)
from tuners.artifact import _sha256 as sha256
from tuners.base import TUNERS
from tuners.errors import ArtifactError, IncompatibleBackboneError, TunerError
from tuners.task_model import architecture_key

BACKBONE = small_backbone("resnet18")


@pytest.fixture
def artifact(tmp_path: Path) -> Path:
    model = build_task_model("cst", {}, BACKBONE, ["a", "b"])
    return save_artifact(model, BACKBONE, tmp_path / "task")


def _rewrite(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file(tensors, str(folder / WEIGHTS))
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["weights_sha256"] = sha256(folder / WEIGHTS)
    (folder / MANIFEST).write_text(json.dumps(manifest))


def _problems(folder: Path) -> str:
    with pytest.raises(ArtifactError) as info:
        load_artifact(folder, BACKBONE)
    return str(info.value)


def test_missing_extra_and_misshaped_keys_reported_together(artifact: Path) -> None:
    tensors = load_file(str(artifact / WEIGHTS))
    first, second = sorted(tensors)[:2]
    del tensors[first]
    tensors[second] = torch.zeros(3, 3)
    tensors["tuner.surprise"] = torch.zeros(1)
    _rewrite(artifact, tensors)
    message = _problems(artifact)
    assert (
        f"missing key {first}" in message and "extra key tuner.surprise" in message and f"{second}: shape" in message
    )


def test_nan_weights(artifact: Path) -> None:
    tensors = load_file(str(artifact / WEIGHTS))
    name = next(k for k, v in tensors.items() if v.is_floating_point() and v.numel() > 1)
    tensors[name][0] = float("nan")
    _rewrite(artifact, tensors)
    assert f"{name}: contains NaN or Inf" in _problems(artifact)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_nonfinite_checks_in_bounded_pieces_and_misses_no_element(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NaN and Inf are found anywhere, also across the pieces' edges, with each piece at most the bound:
    a check of a large task does not copy the whole task."""
    state = {"big": torch.zeros(10, 7, dtype=dtype), "small": torch.zeros(3, dtype=dtype), "n": torch.arange(4)}
    state["tail"] = torch.zeros(2, 5, dtype=dtype)
    monkeypatch.setattr(artifact_module, "CHECK_ELEMENTS", 16)
    pieces = list(_pieces([state["big"], state["small"], state["tail"]], 16))
    assert max(p.numel() for p in pieces) <= 16 and sum(p.numel() for p in pieces) == 70 + 3 + 10
    assert nonfinite(state) == []
    for name, index in (("big", (9, 6)), ("big", (2, 1)), ("small", (0,)), ("tail", (1, 4))):
        for bad in (float("nan"), float("inf"), -float("inf")):
            broken = {k: v.clone() for k, v in state.items()}
            broken[name][index] = bad
            assert nonfinite(broken) == [f"{name}: contains NaN or Inf"], (name, index, bad)


def test_wrong_fingerprint(artifact: Path) -> None:
    with pytest.raises(IncompatibleBackboneError, match="fingerprint"):
        load_artifact(artifact, small_backbone("mobilenet_v2"))


def test_pickle_renamed_to_safetensors_is_never_unpickled(artifact: Path) -> None:
    (artifact / WEIGHTS).write_bytes(pickle.dumps({"tuner.x": [1, 2, 3]}))
    message = _problems(artifact)
    assert "not a readable safetensors file" in message and "sha256 does not match" in message


def test_truncated_file(artifact: Path) -> None:
    data = (artifact / WEIGHTS).read_bytes()
    (artifact / WEIGHTS).write_bytes(data[: len(data) // 2])
    assert "sha256 does not match" in _problems(artifact)


def test_unknown_method_and_invalid_json(artifact: Path) -> None:
    manifest = json.loads((artifact / MANIFEST).read_text())
    manifest["method"] = "magic"
    (artifact / MANIFEST).write_text(json.dumps(manifest))
    assert "unknown method 'magic'" in _problems(artifact)
    (artifact / MANIFEST).write_text("{broken")
    assert "not valid JSON" in _problems(artifact)


def test_json_nested_deeper_than_the_parser_recurses_is_unreadable_not_a_crash(artifact: Path) -> None:
    manifest = (artifact / MANIFEST).read_text()
    (artifact / MANIFEST).write_text("[" * 100_000 + "]" * 100_000)
    assert "nested too deeply" in _problems(artifact)
    (artifact / MANIFEST).write_text(manifest)
    header = b"[" * 50_000 + b"]" * 50_000
    (artifact / WEIGHTS).write_bytes(len(header).to_bytes(8, "little") + header + bytes(10 << 20))
    assert "not a readable safetensors file (the JSON is nested too deeply)" in _problems(artifact)


@pytest.mark.parametrize(
    "entry",
    [5, {"dtype": "F32", "shape": [2]}, {"dtype": "F32", "shape": [2], "data_offsets": [0, 4, 8]},
     {"dtype": 1, "shape": [2], "data_offsets": [0, 8]}, {"dtype": "F32", "shape": ["2"], "data_offsets": [0, 8]}],
)  # fmt: skip
def test_a_header_entry_that_is_not_a_tensor_entry_is_unreadable(artifact: Path, entry: object) -> None:
    header = json.dumps({"tuner.x": entry}).encode()
    (artifact / WEIGHTS).write_bytes(len(header).to_bytes(8, "little") + header + bytes(64))
    assert "not a readable safetensors file (the header's entry for 'tuner.x'" in _problems(artifact)


@pytest.mark.parametrize("head", [{"width": 20_000}, {"num_convs": 30}])
def test_options_the_weights_do_not_fit_are_refused_on_the_meta_device(
    artifact: Path, head: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Options that would take gigabytes are found out without allocating them."""
    devices: list[str] = []

    def spy(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        devices.append(torch.get_default_device().type)
        return build_task_model(*args, **kwargs)

    monkeypatch.setattr("tuners.artifact.build_task_model", spy)
    manifest = json.loads((artifact / MANIFEST).read_text())
    (artifact / MANIFEST).write_text(json.dumps({**manifest, "head": {**manifest["head"], **head}}))
    message = _problems(artifact)
    assert ("expected" in message or "missing key head.tower" in message) and devices == ["meta"]
    (artifact / MANIFEST).write_text(json.dumps(manifest))
    load_artifact(artifact, BACKBONE)
    assert devices == ["meta", "meta", "cpu"]


@pytest.mark.parametrize(
    ("option", "value"),
    [("width", -5), ("width", 64.5), ("num_convs", -1), ("num_convs", 2**70), ("prior_prob", 2.0)],
)
def test_head_options_out_of_range_name_the_option(artifact: Path, option: str, value: float) -> None:
    """2**70 layers: building them would never end, even on the meta device, so counts are bounded."""
    manifest = json.loads((artifact / MANIFEST).read_text())
    (artifact / MANIFEST).write_text(json.dumps({**manifest, "head": {**manifest["head"], option: value}}))
    assert f"head 'light': {option}: Input should be" in _problems(artifact)


@pytest.mark.parametrize(("method", "option"), [("hst", "depth"), ("dyn_adapter", "exit_convs")])
def test_tuner_layer_counts_are_bounded(method: str, option: str) -> None:
    with pytest.raises(TunerError, match=f"{option} must be"):
        TUNERS.get(method).config_cls.from_dict({option: 2**70})


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [("metrics", [], "'metrics' must be an object"), ("provenance", "x", "'provenance' must be an object"),
     ("provenance", {"created_at": 5}, "'provenance.created_at' must be a string"),
     ("kind", -1, "'kind' must be a string"), ("kind", "inline", "'kind' is 'inline', but cst tasks are 'side'"),
     ("labels", [], "'labels' must list one or more"), ("labels", ["a", 1], "'labels' must list one or more"),
     ("method", ["cst"], "'method' must be a string"), ("format_version", True, "'format_version' must be an integer"),
     ("weights_sha256", 5, "'weights_sha256' must be a string")],
)  # fmt: skip
def test_manifest_fields_the_server_cannot_use_are_refused(artifact: Path, field: str, value: object, says: str):
    """At upload, not later: a stored version whose ``metrics`` was a list made every task listing answer 500."""
    manifest = json.loads((artifact / MANIFEST).read_text())
    (artifact / MANIFEST).write_text(json.dumps({**manifest, field: value}))
    assert f"{MANIFEST}: {says}" in _problems(artifact)


def test_save_is_atomic_and_replaces(artifact: Path) -> None:
    model = build_task_model("linear_probe", {}, BACKBONE, ["x"])
    save_artifact(model, BACKBONE, artifact)
    assert json.loads((artifact / MANIFEST).read_text())["method"] == "linear_probe"
    assert sorted(p.name for p in artifact.parent.iterdir()) == ["task"]


def test_a_manifest_records_every_head_option(artifact: Path) -> None:
    head = json.loads((artifact / MANIFEST).read_text())["head"]
    assert head == resolve_head_config({}) and {"width", "num_convs", "prior_prob"} <= set(head)


@pytest.mark.parametrize("given", [{"name": "light"}, {"name": "light", "width": 32}, {}])
def test_a_version_1_artifact_loads_with_the_head_defaults_it_was_trained_with(tmp_path: Path, given: dict) -> None:
    """Version 1 recorded only the head options given at training; the defaults of that time fill in the
    rest, whatever the defaults are now."""
    trained_with = {**LEGACY_HEAD_DEFAULTS["light"], **given, "name": "light"}
    model = build_task_model("linear_probe", {}, BACKBONE, ["a", "b"], trained_with)
    folder = save_artifact(model, BACKBONE, tmp_path / "old")
    manifest = json.loads((folder / MANIFEST).read_text())
    (folder / MANIFEST).write_text(json.dumps({**manifest, "format_version": 1, "head": given}))
    loaded, read = load_artifact(folder, BACKBONE)
    assert read["format_version"] == FORMAT_VERSION and loaded.head_config == model.head_config
    assert loaded.architecture == model.architecture
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_an_unknown_format_version_is_refused(artifact: Path) -> None:
    manifest = json.loads((artifact / MANIFEST).read_text())
    (artifact / MANIFEST).write_text(json.dumps({**manifest, "format_version": FORMAT_VERSION + 1}))
    assert f"format_version {FORMAT_VERSION + 1} is not 1 or {FORMAT_VERSION}" in _problems(artifact)


def test_the_architecture_key_does_not_depend_on_which_defaults_were_written_out() -> None:
    assert architecture_key("cst", {}, {}, 2) == architecture_key("cst", {}, resolve_head_config({"name": "light"}), 2)
    assert architecture_key("cst", {}, {"width": 32}, 2) != architecture_key("cst", {}, {}, 2)
