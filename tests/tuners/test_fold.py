"""Folding an affine calibration (``cst``, ``side_tuning``) into the light head's laterals: exact,
only where it pays, only in the export."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch
from torch import nn

from tuners import build_task_model
from tuners.compiled import CompiledTask
from tuners.fold import fold_calibration

FOLDING = ["cst", "side_tuning"]


def _task(backbone, method: str, head: dict | None = None, seed: int = 0, **config):  # noqa: ANN001, ANN202
    """A task with every parameter and BatchNorm statistic perturbed, so each term of the fold matters."""
    torch.manual_seed(seed)
    model = build_task_model(method, config, backbone, ["a", "b"], head or {"name": "light", "width": 32})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _inputs(backbone, model) -> tuple[dict[str, torch.Tensor], torch.Tensor]:  # noqa: ANN001
    torch.manual_seed(1)
    images = torch.randn(2, 3, 128, 128)
    with torch.inference_mode():
        return backbone(images, model.required_taps()), images


@pytest.mark.parametrize("method", FOLDING)
def test_folded_graph_gives_the_model_outputs(mobilenet, method: str) -> None:
    model = _task(mobilenet, method)
    folded = fold_calibration(model)
    assert folded is not None
    assert folded.folded == [False, True, True]  # c3 (32 channels) is no wider than the head (32); c4, c5 are
    taps, images = _inputs(mobilenet, model)
    with torch.inference_mode():
        want, got = model.head_outputs(taps, images), folded(taps, images)
    assert got.level_shapes == want.level_shapes
    for k, v in want.tensors.items():
        torch.testing.assert_close(got.tensors[k], v, rtol=1e-4, atol=1e-4)


def test_only_affine_calibrations_on_the_light_head_fold_and_only_wide_taps(mobilenet) -> None:
    assert fold_calibration(_task(mobilenet, "cst", calibration="max")) is None
    assert fold_calibration(_task(mobilenet, "cst", calibration="gate")) is None
    assert fold_calibration(_task(mobilenet, "cst", {"name": "fcos", "width": 32, "num_convs": 1})) is None
    for method in ("linear_probe", "e3va"):
        assert fold_calibration(_task(mobilenet, method)) is None
    for method in FOLDING:  # the default width, 96: only c5 (1280 channels) is wider
        default = fold_calibration(_task(mobilenet, method, {"name": "light"}))
        assert default is not None and default.folded == [False, False, True]


@pytest.mark.parametrize("method", FOLDING)
def test_compiled_graph_is_folded_and_agrees_with_torch(mobilenet, tmp_path: Path, method: str) -> None:
    model = _task(mobilenet, method, seed=2)
    compiled = CompiledTask(model, mobilenet, tmp_path / "folded.onnx", "cpu")
    assert compiled.folded_levels == 2
    taps, images = _inputs(mobilenet, model)
    with torch.inference_mode():
        want = model.head_outputs(taps, images)
    got = compiled({t: v.clone() for t, v in taps.items()}, images)
    for k, v in want.tensors.items():
        torch.testing.assert_close(got.tensors[k], v, rtol=1e-3, atol=1e-3)
    plain = CompiledTask(model, mobilenet, tmp_path / "plain.onnx", "cpu", fold=False)
    assert plain.folded_levels == 0

    def convs(path: Path) -> int:
        return sum(node.op_type == "Conv" for node in onnx.load(str(path)).graph.node)

    assert convs(tmp_path / "folded.onnx") == convs(tmp_path / "plain.onnx") - 2  # each fold drops a projection


CALIBRATIONS = [("cst", "mtc"), ("cst", "max"), ("cst", "gate"), ("side_tuning", "")]


@pytest.mark.parametrize(("method", "calibration"), CALIBRATIONS)
def test_forward_is_the_calibrated_side_maps(mobilenet, method: str, calibration: str) -> None:
    model = _task(mobilenet, method, **({"calibration": calibration} if calibration else {}))
    taps, images = _inputs(mobilenet, model)
    with torch.inference_mode():
        pairs = model.tuner.side_maps(taps, images)
        outputs = model.tuner(taps, images)
        for i, ((c, s), out) in enumerate(zip(pairs, outputs)):
            assert torch.equal(model.tuner.calibrate(i, c, s), out)
            affine = model.tuner.calibration_affine(i)
            if calibration in ("max", "gate"):
                assert affine is None
                continue
            d, m, b = affine
            expected = d[:, None, None] * c + torch.einsum("cw,bwhx->bchx", m, s) + b[:, None, None]
            torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
