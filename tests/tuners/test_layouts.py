"""Datasets as users have them: Ultralytics data.yaml and Roboflow COCO exports written by
``server-data convert``, detected without --format and trained on; iscrowd and VOC difficult boxes
ignored by the evaluator; EXIF orientation applied by the one decoder everything uses."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from models.imaging import decode, read_image, upright_size
from models.types import Detections
from server.imaging import decode_image
from tuners.data.cli import main as data_cli
from tuners.data.formats import read_coco, read_voc, write_voc
from tuners.data.layouts import detect_format, read_splits
from tuners.data.records import DatasetError, DetectionData, ImageRecord
from tuners.data.synth import SynthConfig, generate
from tuners.trainer.config import build_config
from tuners.trainer.evaluate import coco_map
from tuners.trainer.loop import Trainer


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    generate(SynthConfig(task="digits", images=10, size=96, min_scale=20, max_scale=40, val_fraction=0.3), out)
    return out


@pytest.mark.parametrize("layout", ["ultralytics", "roboflow", "darknet"])
def test_a_converted_layout_is_detected_read_back_and_trains_without_format(synth: Path, tmp_path: Path, layout: str):
    out = tmp_path / layout
    assert data_cli(["convert", "--data", str(synth), "--to", layout, "--out", str(out)]) == 0
    if layout == "ultralytics":
        spec = yaml.safe_load((out / "data.yaml").read_text())
        assert spec["train"] == "images/train" and spec["names"][0] == "0" and (out / "labels" / "val").is_dir()
    elif layout == "darknet":
        assert "valid = valid.txt" in (out / "obj.data").read_text() and (out / "obj_valid_data").is_dir()
    else:
        assert (out / "train" / "_annotations.coco.json").is_file() and (out / "valid").is_dir()
    assert detect_format(out) == layout
    original, _ = read_splits(synth)
    found, fmt = read_splits(out)
    assert fmt == layout and set(found) == {"train", "val"} and found["train"].classes == original["train"].classes
    for split in ("train", "val"):
        for a, b in zip(original[split].records, found[split].records):
            assert a.path.name == b.path.name and torch.equal(a.labels, b.labels)
            torch.testing.assert_close(b.boxes, a.boxes, rtol=0, atol=1e-6)
    config = build_config({"method": "linear_probe", "data": out, "epochs": 1, "image_size": 96, "batch_size": 4,
                           "augmentation": "none", "out": tmp_path / "run", "progress": False})  # fmt: skip
    assert config.format == "auto"
    report = Trainer(config).fit()
    assert report["best_epoch"] == 1 and (tmp_path / "run" / "best" / "tuner.json").is_file()


def test_a_roboflow_group_category_without_boxes_is_left_out(synth: Path, tmp_path: Path):
    out = tmp_path / "rf"
    data_cli(["convert", "--data", str(synth), "--to", "roboflow", "--out", str(out)])
    path = out / "train" / "_annotations.coco.json"
    doc = json.loads(path.read_text())
    for c in doc["categories"]:
        c["supercategory"] = "digits"
    doc["categories"].insert(0, {"id": 0, "name": "digits", "supercategory": "none"})
    path.write_text(json.dumps(doc))
    found, _ = read_splits(out, "roboflow")
    assert found["train"].classes == [str(d) for d in range(10)]
    assert torch.equal(found["train"].records[0].labels, read_coco(synth / "train").records[0].labels)


def test_a_roboflow_supercategory_of_any_json_type_is_read(synth: Path, tmp_path: Path):
    out = tmp_path / "rf"
    data_cli(["convert", "--data", str(synth), "--to", "roboflow", "--out", str(out)])
    path = out / "train" / "_annotations.coco.json"
    doc = json.loads(path.read_text())
    for c, group in zip(doc["categories"], [["a", "list"], {"a": "map"}, 3, None] * 3):
        c["supercategory"] = group
    path.write_text(json.dumps(doc))
    assert read_splits(out, "roboflow")[0]["train"].classes == [str(d) for d in range(10)]


def test_crowd_and_difficult_boxes_are_ignored_by_evaluation(tmp_path: Path):
    boxes = torch.tensor([[10, 10, 40, 40], [60, 60, 90, 90]], dtype=torch.float64)
    record = ImageRecord(tmp_path / "a.png", 100, 100, boxes, torch.tensor([0, 0]), torch.tensor([False, True]))
    data = DetectionData(["thing"], [record])
    hit_both = Detections(boxes.float(), torch.tensor([0.9, 0.8]), torch.tensor([0, 0]))
    assert coco_map(data, [hit_both])["AP50"] == pytest.approx(1.0)  # the crowd hit is not a false positive
    Image.new("RGB", (100, 100)).save(tmp_path / "a.png")
    write_voc(data, tmp_path / "voc")
    assert "<difficult>1</difficult>" in (tmp_path / "voc" / "Annotations" / "a.xml").read_text()
    assert read_voc(tmp_path / "voc").records[0].crowd.tolist() == [False, True]


def test_exif_orientation_is_applied_the_same_way_in_training_and_serving(tmp_path: Path):
    picture = Image.new("RGB", (60, 40), "white")
    picture.paste((255, 0, 0), (0, 0, 10, 10))  # a red corner, to see where it ends up
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view"
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", exif=exif, quality=95)
    (tmp_path / "phone.jpg").write_bytes(buffer.getvalue())
    trained = read_image(tmp_path / "phone.jpg")
    assert tuple(trained.shape) == (3, 60, 40) and upright_size(tmp_path / "phone.jpg") == (40, 60)
    assert torch.equal(trained, decode_image(buffer.getvalue(), 1 << 20, 1 << 20)) and torch.equal(
        trained, decode(buffer.getvalue())
    )
    assert trained[0, :10, -10:].float().mean() > 200 and trained[1, :10, -10:].float().mean() < 80  # top right


def test_a_missing_or_unknown_dataset_says_what_it_expected(tmp_path: Path):
    with pytest.raises(DatasetError, match="does not exist"):
        read_splits(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="pass --format"):
        read_splits(tmp_path / "empty")
