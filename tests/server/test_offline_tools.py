"""server-predict, server-val and server-export on an artifact with no server, against a live server
on the same image: the same decode, preprocess and postprocess give the same detections (1e-4 with
torch on both sides), the exported ONNX graph gives them within 1e-3, and --merge folds LoRA in."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from clients import SidecarClient
from models import PostprocessConfig
from models.imaging import decode, read_image
from models.postprocess import from_dense
from models.runtime.onnx import make_session
from models.transform import ImageTransform
from models.types import Detections
from server.main import create_app
from tests.server.conftest import LiveServer, server_backbone, settings
from tuners.artifact import load_artifact
from tuners.data.formats import write_coco
from tuners.data.records import DetectionData, ImageRecord
from tuners.tools.export import main as export_main
from tuners.tools.predict import main as predict_main
from tuners.tools.val import main as val_main
from tuners.trainer.evaluate import coco_map

TORCH = {"runtime": "torch", "task_runtime": "torch"}  # the server's math path without ORT


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, backbone, artifacts):
    app = create_app(settings(tmp_path_factory.mktemp("store"), **TORCH), backbone=backbone)
    with LiveServer(app) as live, SidecarClient(live.url) as client:
        client.upload_task("t", artifacts["side1"])
        yield client


def _same(offline: list[dict], server: list, box_tol: float, score_tol: float) -> None:
    assert len(offline) == len(server) and offline
    key = lambda d: (d["label"], round(d["score"], 2), d["box"][0])  # noqa: E731
    for a, b in zip(sorted(offline, key=key), sorted((d.model_dump() for d in server), key=key)):
        assert a["label"] == b["label"] and a["score"] == pytest.approx(b["score"], abs=score_tol)
        assert a["box"] == pytest.approx(b["box"], abs=box_tol)


def _phone_jpeg(photo_bytes: bytes) -> bytes:
    """The photo at 1600 x 1200 as a JPEG, which the server and server-predict decode at 1/4 scale."""
    buffer = io.BytesIO()
    Image.open(io.BytesIO(photo_bytes)).convert("RGB").resize((1600, 1200)).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.mark.parametrize("name", ["photo.png", "phone.jpg"])
def test_predict_equals_the_server(served, artifacts, photo_bytes, tmp_path: Path, capsys, name: str):
    data = photo_bytes if name.endswith(".png") else _phone_jpeg(photo_bytes)
    (tmp_path / name).write_bytes(data)
    out = tmp_path / "pred"
    args = [str(artifacts["side1"]), str(tmp_path / name), "--weights", "random", "--out", str(out),
            "--save-images", "--score-threshold", "0.3"]  # fmt: skip
    assert predict_main(args) == 0
    answer = json.loads(capsys.readouterr().out)
    response = served.detect(data, "t", score_threshold=0.3)
    _same(answer["results"][0]["detections"], response.results[0].detections, 1e-4 + 0.01, 1e-4)  # both rounded
    assert json.loads((out / "predictions.json").read_text()) == answer
    full = read_image(tmp_path / name)  # boxes and sizes are the full image's, whatever scale it decoded at
    assert (answer["results"][0]["height"], answer["results"][0]["width"]) == tuple(full.shape[-2:])
    assert (response.image.height, response.image.width) == tuple(full.shape[-2:])
    with Image.open(out / f"{Path(name).stem}.jpg") as drawn:
        assert drawn.size == (answer["results"][0]["width"], answer["results"][0]["height"])


def test_val_scores_what_the_server_answers(served, artifacts, photos, tmp_path: Path, capsys):
    records = []
    for i, data in enumerate(photos[:3]):
        (tmp_path / "images").mkdir(exist_ok=True)
        (tmp_path / "images" / f"{i}.jpg").write_bytes(data)
        h, w = read_image(tmp_path / "images" / f"{i}.jpg").shape[-2:]
        boxes = torch.tensor([[w * 0.1, h * 0.1, w * 0.5, h * 0.6], [w * 0.4, h * 0.3, w * 0.9, h * 0.9]])
        records.append(ImageRecord(tmp_path / "images" / f"{i}.jpg", w, h, boxes.double(), torch.tensor([0, 1])))
    data = DetectionData(["cat", "dog"], records)
    write_coco(data, tmp_path / "split", copy_images=True)
    out = tmp_path / "val"
    assert val_main([str(artifacts["side1"]), "--data", str(tmp_path / "split"), "--weights", "random",
                     "--out", str(out)]) == 0  # fmt: skip
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["format"] == "coco" and metrics["images"] == 3
    answers = [served.detect(p, "t", score_threshold=0.05).results[0].detections for p in photos[:3]]
    server = [Detections(torch.tensor([d.box for d in a]), torch.tensor([d.score for d in a]),
                         torch.tensor([d.class_id for d in a])) for a in answers]  # fmt: skip
    assert metrics["AP"] == pytest.approx(coco_map(data, server)["AP"], abs=2e-3)  # the server's boxes are rounded
    for name in ("pr_curve.png", "confusion_matrix.png", "val_predictions.jpg", "metrics.json"):
        assert (out / name).is_file()


def test_the_exported_graph_answers_as_the_server(served, artifacts, photo_bytes, tmp_path: Path, capsys):
    assert export_main([str(artifacts["side1"]), "--weights", "random", "--out", str(tmp_path / "t.onnx")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["max_abs_difference_vs_torch"] <= 1e-3
    backbone = server_backbone()
    canvas, metas = ImageTransform(backbone.preprocess)([decode(photo_bytes)])
    boxes, scores = make_session(tmp_path / "t.onnx", "cpu").run(None, {"images": canvas.numpy()})
    size = canvas.shape[-2:]
    det = from_dense(torch.from_numpy(boxes), torch.from_numpy(scores), (size[0], size[1]),
                     [PostprocessConfig(score_thresh=0.3)])[0]  # fmt: skip
    det = ImageTransform.to_original(det, metas[0])
    offline = [{"box": b, "label": ["cat", "dog"][c], "score": s}
               for b, s, c in zip(det.boxes.tolist(), det.scores.tolist(), det.labels.tolist())]  # fmt: skip
    _same(offline, served.detect(photo_bytes, "t", score_threshold=0.3).results[0].detections, 1e-3 + 0.01, 1e-3)


def test_merge_folds_lora_into_a_standalone_backbone(artifacts, photo_bytes, tmp_path: Path, capsys):
    out = tmp_path / "lora.onnx"
    assert export_main([str(artifacts["inline0"]), "--weights", "random", "--out", str(out), "--merge"]) == 0
    assert json.loads(capsys.readouterr().out)["max_abs_difference_vs_torch"] <= 1e-3
    backbone = server_backbone()
    model, _ = load_artifact(artifacts["inline0"], backbone)
    merged = server_backbone()
    merged.load_state_dict(load_file(str(out.with_suffix(".backbone.safetensors"))))
    canvas, _ = ImageTransform(backbone.preprocess)([decode(photo_bytes)])
    with torch.no_grad():
        want = model.tuner.backbone_forward(backbone, canvas)
        got = merged(canvas, list(want))
    for tap in want:
        torch.testing.assert_close(got[tap], want[tap], rtol=0, atol=1e-4)
    assert export_main([str(artifacts["side0"]), "--weights", "random", "--out", str(tmp_path / "x.onnx"),
                        "--merge"]) == 2  # a side task has nothing to merge  # fmt: skip


def test_a_folder_of_images_and_a_bad_artifact(artifacts, photos, tmp_path: Path, capsys):
    (tmp_path / "photos").mkdir()
    for i, data in enumerate(photos[:2]):
        (tmp_path / "photos" / f"{i}.jpg").write_bytes(data)
    assert predict_main([str(artifacts["side0"]), str(tmp_path / "photos"), "--weights", "random"]) == 0
    assert len(json.loads(capsys.readouterr().out)["results"]) == 2
    assert predict_main([str(tmp_path), str(tmp_path / "photos"), "--weights", "random"]) == 2
    assert "no tuner.json" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flag", "words"),
    [(["--batch-size", "0"], "--batch-size: must be at least 1, got 0"),
     (["--score-threshold", "nan"], "--score-threshold: must be in [0, 1], got nan"),
     (["--max-detections", "-5"], "--max-detections: must be at least 1, got -5")],
)  # fmt: skip
def test_predict_refuses_options_the_server_would(artifacts, photo_bytes, tmp_path: Path, capsys, flag, words):
    """--batch-size 0 was a traceback; a NaN threshold or no detections at all ran without a word."""
    (tmp_path / "a.png").write_bytes(photo_bytes)
    with pytest.raises(SystemExit) as exit_:
        predict_main([str(artifacts["side1"]), str(tmp_path / "a.png"), "--weights", "random", *flag])
    assert exit_.value.code == 2 and words in capsys.readouterr().err


def test_predict_names_the_file_it_cannot_decode(artifacts, photo_bytes, tmp_path: Path, capsys):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(photo_bytes)
    (tmp_path / "images" / "b.jpg").write_bytes(b"not a picture")
    assert predict_main([str(artifacts["side1"]), str(tmp_path / "images"), "--weights", "random"]) == 1
    assert f"{tmp_path / 'images' / 'b.jpg'}: the data is not an image" in capsys.readouterr().err
