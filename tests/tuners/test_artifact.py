"""Malformed artifacts are rejected, each with an error naming the problem."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from models.heads import resolve_head_config
from tests.conftest import small_backbone
from tuners import build_task_model
from tuners.artifact import FORMAT_VERSION, LEGACY_HEAD_DEFAULTS, MANIFEST, WEIGHTS, load_artifact, save_artifact
from tuners.artifact import _sha256 as sha256
from tuners.errors import ArtifactError, IncompatibleBackboneError
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
