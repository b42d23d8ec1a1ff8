"""Every registered method, on small random backbones: shapes, frozen backbone, round trip, sharing, isolation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models import Target
from tests.conftest import small_backbone
from tuners import TUNERS, build_task_model, list_tuners
from tuners.artifact import load_artifact, save_artifact
from tuners.errors import TunerError

CASES = [
    (m, b)
    for m in list_tuners()
    for b in ("mobilenet_v2", "resnet18", "vit_b_16")
    if not (m == "cst" and b == "vit_b_16") and not (m == "hst_full" and b != "vit_b_16")
]
BACKBONES = {name: small_backbone(name) for name in ("mobilenet_v2", "resnet18", "vit_b_16")}
TARGETS = [
    Target(torch.tensor([[4.0, 6.0, 30.0, 40.0]]), torch.tensor([1])),
    Target(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)),
]


def _model(method: str, backbone_name: str, seed: int = 0):  # noqa: ANN202
    torch.manual_seed(seed)
    return build_task_model(method, {}, BACKBONES[backbone_name], ["a", "b"])


@pytest.mark.parametrize(("method", "backbone_name"), CASES)
def test_shapes_grads_and_frozen_backbone(method: str, backbone_name: str) -> None:
    backbone = BACKBONES[backbone_name]
    model = _model(method, backbone_name)
    assert len(model.tuner.out_channels) == len(model.tuner.out_strides)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    images = torch.randn(2, 3, 64, 64)
    out = model(backbone, images)
    assert out.tensors["cls_logits"].shape == (2, 84, 2)
    terms = model.training_loss(backbone, images, TARGETS, progress=0.5)
    assert all(torch.isfinite(v) for v in terms.values())
    assert out.tensors["bbox_regression"].shape == (2, 84, 4)
    assert all(not p.requires_grad for p in backbone.parameters())
    owned = {id(p) for p in model.parameters()}
    assert model.trainable_parameters() and all(id(p) in owned for p in model.trainable_parameters())
    opt = torch.optim.SGD(model.trainable_parameters(), lr=0.1)
    sum(terms.values()).backward()
    opt.step()
    assert all(p.grad is None for p in backbone.parameters())
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())


@pytest.mark.parametrize(("method", "backbone_name"), CASES)
def test_save_load_round_trip_is_bit_exact(method: str, backbone_name: str, tmp_path: Path) -> None:
    backbone = BACKBONES[backbone_name]
    model = _model(method, backbone_name).eval()
    for p in model.parameters():  # move away from the initialisation so the check means something
        p.data.add_(torch.randn_like(p) * 0.01)
    save_artifact(model, backbone, tmp_path / "task", metrics={"AP": 0.5})
    loaded, manifest = load_artifact(tmp_path / "task", backbone)
    assert manifest["method"] == method and manifest["kind"] == model.kind
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(backbone, images).tensors, loaded(backbone, images).tensors, rtol=0, atol=0)


@pytest.mark.parametrize(("method", "backbone_name"), [c for c in CASES if TUNERS.get(c[0]).kind == "side"])
def test_side_shared_pass_equals_own_pass(method: str, backbone_name: str) -> None:
    backbone = BACKBONES[backbone_name]
    model = _model(method, backbone_name).eval()
    other = _model("linear_probe", backbone_name)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        shared = backbone(images, sorted(set(model.required_taps()) | set(other.required_taps())))
        torch.testing.assert_close(
            model(backbone, images, shared).tensors, model(backbone, images).tensors, rtol=0, atol=0
        )


@pytest.mark.parametrize(("method", "backbone_name"), [c for c in CASES if TUNERS.get(c[0]).kind == "inline"])
def test_inline_tasks_never_see_each_other(method: str, backbone_name: str) -> None:
    backbone = BACKBONES[backbone_name]
    first, second = _model(method, backbone_name, 1).eval(), _model(method, backbone_name, 2).eval()
    for p in second.tuner.parameters():
        p.data.add_(torch.randn_like(p) * 0.5)
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        alone = first.tuner.backbone_forward(backbone, images)
        second.tuner.backbone_forward(backbone, images)
        after = first.tuner.backbone_forward(backbone, images)
        plain = backbone(images, first.required_taps())
        theirs = second.tuner.backbone_forward(backbone, images)
    for tap in alone:
        torch.testing.assert_close(after[tap], alone[tap], rtol=0, atol=0)
    assert any(not torch.allclose(theirs[t], plain[t]) for t in plain), "the second task's tuner changed nothing"


def test_unknown_config_keys_are_rejected() -> None:
    with pytest.raises(TunerError, match="valid keys"):
        build_task_model("cst", {"reduction": 4, "widht": 3}, BACKBONES["resnet18"], ["a"])
    with pytest.raises(TunerError, match="CNN"):
        build_task_model("cst", {}, BACKBONES["vit_b_16"], ["a"])


@pytest.mark.parametrize("backbone_name", ["mobilenet_v2", "resnet18", "resnet50", "vit_b_16"])
def test_conv_adapter_starts_at_the_pretrained_function(backbone_name: str) -> None:
    """With scales at 0 the re-implemented block forwards must equal the frozen blocks exactly."""
    backbone = BACKBONES.get(backbone_name) or small_backbone(backbone_name)
    model = build_task_model("conv_adapter", {}, backbone, ["a"])
    assert len(model.tuner.adapters) > 0
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours, plain = model.tuner.backbone_forward(backbone, images), backbone(images, model.required_taps())
    for tap in plain:
        torch.testing.assert_close(ours[tap], plain[tap], rtol=1e-5, atol=1e-5)


def test_dyn_adapter_exits_early_and_reports_depth() -> None:
    from models.postprocess import PostprocessConfig
    from models.transform import ImageMeta

    backbone = BACKBONES["mobilenet_v2"]
    model = build_task_model("dyn_adapter", {"exit_threshold": 0.5}, backbone, ["a", "b"]).eval()
    with torch.no_grad():  # make the first exit sure of one class everywhere
        model.tuner.exit_heads[0].predictor.bias[:2] = 20.0
    images, metas = torch.randn(2, 3, 64, 64), [ImageMeta((64, 64), 1.0)] * 2
    ran = []
    hook = backbone.blocks[-1].register_forward_hook(lambda *_: ran.append(1))  # a block no adapter replaces
    early = model.predict(backbone, images, metas, PostprocessConfig(score_thresh=0.3))
    assert ran == []  # the last block never ran
    first_exit = model.tuner.blocks_run[model.tuner.exit_taps[0]]
    assert all(d.depth == first_exit for d in early) and first_exit < len(backbone.blocks)
    model.tuner.config.exit_threshold = 0.0
    full = model.predict(backbone, images, metas, PostprocessConfig(score_thresh=0.3))
    hook.remove()
    assert all(d.depth is None for d in full) and ran == [1]


def test_hst_full_meta_tokens_change_every_patch_token() -> None:
    backbone = BACKBONES["vit_b_16"]
    model = build_task_model("hst_full", {}, backbone, ["a"])
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ours, plain = model.tuner.backbone_forward(backbone, images), backbone(images, ["z1", "z12"])
    assert ours["meta"].shape == (1, 12, 32)
    assert not torch.allclose(ours["z1"], plain["z1"])
    assert {n for n, p in model.named_parameters() if p.requires_grad} >= {"tuner.meta", "tuner.ln_weight"}
