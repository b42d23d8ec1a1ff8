"""The real-photo faces set: every listed photo is installed, the stored boxes are MTCNN's (rerun
here: a pretrained model's output, not ground truth), and server-data writes it as a COCO split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.label_real_faces import label, label_lfw_crops
from tuners.data.cli import main as data_cli
from tuners.data.formats import read_coco
from tuners.data.real_faces import LABELS, PHOTOS, photo_path
from tuners.data.synth import LFW_BOXES


def test_the_stored_boxes_are_what_mtcnn_finds_today():
    pytest.importorskip("facenet_pytorch", reason="make install puts facenet-pytorch in place (--no-deps)")
    stored, fresh = json.loads(LABELS.read_text()), label()
    assert "not human ground truth" in stored["info"]["description"]
    assert [i["image"] for i in fresh["images"]] == [i["image"] for i in stored["images"]]
    assert len(fresh["annotations"]) == len(stored["annotations"]) >= 5
    for a, b in zip(fresh["annotations"], stored["annotations"]):
        assert a["image"] == b["image"] and a["bbox"] == pytest.approx(b["bbox"], abs=1.0)


def test_the_lfw_face_boxes_of_faces_photo_are_what_mtcnn_finds_today():
    pytest.importorskip("facenet_pytorch", reason="make install puts facenet-pytorch in place (--no-deps)")
    stored, fresh = json.loads(LFW_BOXES.read_text()), label_lfw_crops()
    assert "MTCNN" in stored["info"]["description"] and len(stored["boxes"]) == len(fresh["boxes"]) == 100
    for a, b in zip(fresh["boxes"], stored["boxes"]):
        assert a == pytest.approx(b, abs=0.01)
        assert b[2] - b[0] > 0.5 and b[3] - b[1] > b[2] - b[0]  # a face's box: taller than wide


def test_server_data_writes_the_set_as_a_coco_split(tmp_path: Path, capsys):
    assert all(photo_path(*p).is_file() for p in PHOTOS)
    assert data_cli(["real-faces", "--out", str(tmp_path / "real")]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["images"] == len(PHOTOS) and stats["boxes"] >= 5 and "MTCNN" in stats["description"]
    data = read_coco(tmp_path / "real")
    assert data.classes == ["face"] and sum(1 for r in data.records if not len(r.boxes)) >= 8  # photos without faces
    assert all((tmp_path / "real" / "images" / r.path.name).is_file() for r in data.records)
