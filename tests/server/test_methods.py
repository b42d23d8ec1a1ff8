"""Every registered method is servable: its artifact passes upload validation and the engine answers
with it, and serving it leaves the shared backbone byte-identical (invariant 1)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models.runtime import build_runtime
from server.executor import Executor, WorkItem
from server.imaging import decode_image
from server.metrics import Metrics
from server.store import TaskStore
from tests.conftest import small_backbone
from tests.server.conftest import make_artifact
from tuners import TUNERS, list_tuners
from tuners.artifact import MANIFEST, WEIGHTS, load_artifact, save_artifact
from tuners.errors import ArtifactError

VIT_ONLY = {"hst_full"}


@pytest.fixture(scope="module")
def vit():  # noqa: ANN201
    return small_backbone("vit_b_16")


@pytest.mark.parametrize("method", list_tuners())
def test_every_method_passes_upload_validation_and_serves(method: str, tmp_path: Path, backbone, vit, photos):
    served = vit if method in VIT_ONLY else backbone
    engine = Executor(served, build_runtime(served, "torch", "cpu"), Metrics())
    artifact = make_artifact(served, tmp_path, method, seed=7)
    before = {k: v.clone() for k, v in served.state_dict().items()}
    store = TaskStore(tmp_path / "store")
    version = store.publish(
        "t",
        (artifact / WEIGHTS).read_bytes(),
        (artifact / MANIFEST).read_bytes(),
        lambda folder: engine.dry_run(load_artifact(folder, served)[0]),
    )
    model, _ = load_artifact(version.path, served)
    images = [decode_image(p, 1 << 24, 1 << 26) for p in photos[:2]]
    result = engine.run([WorkItem(image, str(i), {"t": model}) for i, image in enumerate(images)])
    shared = TUNERS.get(method).kind == "side"
    assert result.backbone_passes == (2 if shared else 0)  # inline tasks run their own pass
    for image, detections in zip(images, result.detections):
        boxes = detections["t"].boxes
        assert len(boxes) > 0
        assert (boxes[:, 2:] <= torch.tensor([image.shape[2], image.shape[1]]) + 1e-3).all()  # original pixels
    assert all(torch.equal(before[k], v) for k, v in served.state_dict().items())


def test_dry_run_refuses_weights_that_overflow(tmp_path: Path, backbone):
    """Finite weights pass the tensor checks; the dry run catches a forward pass that overflows to Inf."""
    engine = Executor(backbone, build_runtime(backbone, "torch", "cpu"), Metrics())
    model, _ = load_artifact(make_artifact(backbone, tmp_path, "cst", seed=1), backbone)
    with torch.no_grad():
        model.head.predictor.weight.fill_(3e38)
    save_artifact(model, backbone, tmp_path / "overflow")
    loaded, _ = load_artifact(tmp_path / "overflow", backbone)
    with pytest.raises(ArtifactError, match="NaN or Inf"):
        engine.dry_run(loaded)
