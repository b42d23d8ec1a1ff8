from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models import ImageTransform, PreprocessSpec
from tuners.data import DatasetError, read_dataset
from tuners.data.cli import main as data_cli
from tuners.data.synth import SynthConfig, generate
from tuners.data.transforms import DetectionDataset


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("task", ["digits-low", "faces-photo"])
def test_synth_is_byte_for_byte_deterministic(tmp_path: Path, task: str) -> None:
    cfg = SynthConfig(task=task, images=6, size=96, min_scale=16, max_scale=32, seed=3)
    generate(cfg, tmp_path / "a")
    generate(cfg, tmp_path / "b")
    generate(SynthConfig(task=task, images=6, size=96, min_scale=16, max_scale=32, seed=4), tmp_path / "c")
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


@pytest.mark.parametrize("task", ["digits", "faces", "faces-photo", "digits-high"])
def test_synth_boxes_are_tight_around_ink(tmp_path: Path, task: str) -> None:
    splits = generate(SynthConfig(task=task, images=8, size=96, min_scale=16, max_scale=32), tmp_path)
    data = read_dataset(tmp_path / "train", "coco")
    assert data.classes == splits["train"].classes
    assert sum(len(r.labels) for r in data.records) > 0
    for r in data.records:
        assert (r.boxes[:, 2:] > r.boxes[:, :2]).all() and (r.boxes >= 0).all() and (r.boxes <= 96).all()


def test_faces_photo_boxes_run_forehead_to_chin_and_skip_face_backgrounds(tmp_path: Path) -> None:
    from tuners.data.synth import FACE_PHOTOS, TASKS, Sources, _background, backgrounds_for

    sources = Sources.load()
    assert FACE_PHOTOS <= set(sources.background_names)  # the astronaut is a background of the other tasks...
    white_faces = [np.full_like(b, 255 if n in FACE_PHOTOS else 0) for b, n in
                   zip(sources.backgrounds, sources.background_names)]  # fmt: skip
    marked = dataclasses.replace(sources, backgrounds=white_faces)
    rng = np.random.default_rng(0)
    digits = backgrounds_for(marked, TASKS["digits"], "train")
    faces = backgrounds_for(marked, TASKS["faces-photo"], "train")
    assert max(_background(digits, rng, 32).max() for _ in range(60)) == 255
    assert all(_background(faces, rng, 32).max() == 0 for _ in range(60))  # ...never here
    generate(SynthConfig(task="faces-photo", images=10, size=96, min_scale=16, max_scale=40, seed=0), tmp_path)
    boxes = torch.cat([r.boxes for r in read_dataset(tmp_path / "train", "coco").records])
    heights, widths = boxes[:, 3] - boxes[:, 1], boxes[:, 2] - boxes[:, 0]
    assert (heights > widths).float().mean() > 0.8  # taller than the square crop, unless clipped at an edge


def test_clutter_task_holds_its_test_backgrounds_out_of_train_and_val(tmp_path: Path) -> None:
    from tuners.data.synth import TASKS, Sources, backgrounds_for

    sources, task = Sources.load(), TASKS["digits-clutter"]
    for split in ("train", "val", "test"):
        names = {id(b): n for b, n in zip(sources.backgrounds, sources.background_names)}
        used = {names[id(b)] for b in backgrounds_for(sources, task, split)}
        assert used and (used <= task.test_backgrounds) == (split == "test")
        assert split == "test" or not used & task.test_backgrounds
    cfg = SynthConfig(task="digits-clutter", images=6, size=96, min_scale=10, max_scale=24, max_objects=8, seed=1)
    generate(cfg, tmp_path / "a")
    splits = generate(dataclasses.replace(cfg, test_images=4), tmp_path / "b")
    assert set(splits) == {"train", "val", "test"} and len(splits["test"].records) == 4
    assert _digest(tmp_path / "a") == {k: v for k, v in _digest(tmp_path / "b").items() if not k.startswith("test")}
    boxes = torch.cat([r.boxes for r in read_dataset(tmp_path / "b" / "test", "coco").records])
    assert len(boxes) and ((boxes[:, 2:] - boxes[:, :2]).max(1).values <= 24).all()  # small digits only


def test_convert_round_trips_boxes_through_all_formats(tmp_path: Path) -> None:
    generate(SynthConfig(task="digits", images=6, size=96, min_scale=16, max_scale=32), tmp_path / "synth")
    src = tmp_path / "synth" / "train"
    steps = [("coco", "voc"), ("voc", "yolo"), ("yolo", "coco")]
    current = src
    for i, (a, b) in enumerate(steps):
        out = tmp_path / f"step{i}"
        assert data_cli(["convert", "--data", str(current), "--from", a, "--to", b, "--out", str(out)]) == 0
        current = out
    original, final = read_dataset(src, "coco"), read_dataset(current, "coco")
    assert final.classes == original.classes
    assert [r.path.name for r in final.records] == [r.path.name for r in original.records]
    for r0, r1 in zip(original.records, final.records):
        torch.testing.assert_close(r1.boxes, r0.boxes, rtol=0, atol=1e-9)  # YOLO's normalised floats
        assert torch.equal(r1.labels, r0.labels)


def test_stats_and_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    generate(SynthConfig(task="faces", images=4, size=96, min_scale=16, max_scale=32), tmp_path)
    assert data_cli(["stats", "--data", str(tmp_path / "train")]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["images"] == 3 and set(stats["per_class"]) == {"face"}
    (tmp_path / "train" / "annotations.json").write_text("{not json")
    with pytest.raises(DatasetError, match="cannot read"):
        read_dataset(tmp_path / "train", "coco")
    assert data_cli(["stats", "--data", str(tmp_path / "missing")]) == 2


IMAGE = {"id": 1, "file_name": "a.jpg", "width": 8, "height": 8}
MALFORMED_COCO = [
    [1, 2],
    {"images": [], "annotations": []},
    {"categories": 5, "images": [], "annotations": []},
    {"categories": [{"id": 1}], "images": [], "annotations": []},
    {"categories": [{"id": 1, "name": "a"}], "images": [{"id": 1}], "annotations": []},
    {"categories": [{"id": 1, "name": "a"}], "images": [IMAGE], "annotations": [{"image_id": 1, "category_id": 1}]},
    {"categories": [{"id": 1, "name": "a"}], "images": [IMAGE],
     "annotations": [{"image_id": 1, "category_id": 1, "bbox": [1, 2, "a", 4]}]},
    {"categories": [{"id": 1, "name": "a"}], "images": [IMAGE],
     "annotations": [{"image_id": 2, "category_id": 1, "bbox": [1, 2, 3, 4]}]},
]  # fmt: skip


@pytest.mark.parametrize("doc", MALFORMED_COCO)
def test_a_malformed_coco_document_is_a_dataset_error_naming_the_file(tmp_path: Path, doc: object) -> None:
    (tmp_path / "annotations.json").write_text(json.dumps(doc))
    with pytest.raises(DatasetError, match="annotations.json is not a COCO document"):
        read_dataset(tmp_path, "coco")


def test_a_coco_file_nested_deeper_than_the_parser_recurses_cannot_be_read(tmp_path: Path) -> None:
    (tmp_path / "annotations.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DatasetError, match="cannot read"):
        read_dataset(tmp_path, "coco")


def test_a_missing_image_file_is_found_when_the_dataset_is_read(tmp_path: Path) -> None:
    generate(SynthConfig(task="digits", images=4, size=64, min_scale=16, max_scale=32), tmp_path)
    missing = sorted((tmp_path / "train" / "images").iterdir())[0]
    missing.unlink()
    with pytest.raises(DatasetError, match=f"{missing}: the image file is missing"):
        read_dataset(tmp_path / "train", "coco")


@pytest.mark.parametrize(
    "line", ["0 abc 0.5 0.2 0.2", "0.5 0.5 0.5 0.2 0.2", "0 0.5 0.5 0.2", "0 0.1 0.1 0.3 0.1 0.3"]
)
def test_a_malformed_yolo_line_is_a_dataset_error_quoting_it(tmp_path: Path, line: str) -> None:
    with pytest.raises(DatasetError, match=f"x.txt: expected 'class cx cy w h' .*, got '{line}'"):
        read_dataset(yolo_split(tmp_path, f"0 0.5 0.5 0.2 0.2\n{line}\n"), "yolo")


def yolo_split(folder: Path, labels: str) -> Path:
    """One 20x10 image, class ``a``, and ``labels`` as its label file."""
    (folder / "images").mkdir()
    (folder / "labels").mkdir()
    (folder / "classes.txt").write_text("a\n")
    Image.new("RGB", (20, 10)).save(folder / "images" / "x.jpg")
    (folder / "labels" / "x.txt").write_text(labels)
    return folder


@pytest.mark.parametrize(
    ("xml", "words"),
    [("<annotation><size><width>abc</width></size></annotation>", "the size is not two integers"),
     ("<annotation><object><name>a</name></object></annotation>", "an object has no readable bndbox"),
     ("<annotation", "a.xml: "),],
)  # fmt: skip
def test_a_malformed_voc_file_is_a_dataset_error_naming_it(tmp_path: Path, xml: str, words: str) -> None:
    (tmp_path / "Annotations").mkdir()
    (tmp_path / "Annotations" / "a.xml").write_text(xml)
    with pytest.raises(DatasetError, match=words):
        read_dataset(tmp_path, "voc")


def test_an_object_with_no_class_name_is_a_dataset_error(tmp_path: Path) -> None:
    (tmp_path / "Annotations").mkdir()
    Image.new("RGB", (20, 10)).save(tmp_path / "a.jpg")
    box = "<bndbox><xmin>1</xmin><ymin>1</ymin><xmax>9</xmax><ymax>9</ymax></bndbox>"
    (tmp_path / "Annotations" / "a.xml").write_text(f"<annotation><object><name> </name>{box}</object></annotation>")
    with pytest.raises(DatasetError, match="a class with no name"):
        read_dataset(tmp_path, "voc")


def test_augmented_samples_keep_valid_canvas_boxes(tmp_path: Path) -> None:
    generate(SynthConfig(task="digits", images=6, size=96, min_scale=16, max_scale=32), tmp_path)
    data = read_dataset(tmp_path / "train", "coco")
    transform = ImageTransform(PreprocessSpec(size=64))
    for name in ("none", "flip", "standard"):
        ds = DetectionDataset(data, transform, name)
        torch.manual_seed(0)
        for i in range(len(ds)):
            s = ds[i]
            assert s.image.shape == (3, 64, 64)
            b = s.target.boxes
            assert len(b) == len(s.target.labels)
            assert (b[:, 2:] > b[:, :2]).all() and (b >= 0).all() and (b <= 64 + 1e-4).all()
    plain = DetectionDataset(data, transform, "none")[0]
    torch.testing.assert_close(plain.target.boxes, data.records[0].boxes.float() * (64 / 96))


@pytest.mark.parametrize("augmentation", ["none", "standard"])
def test_an_image_whose_pixels_are_cut_short_names_its_file(tmp_path: Path, augmentation: str) -> None:
    """Its header reads, so the dataset is accepted; decoding it in training says which file it is."""
    generate(SynthConfig(task="digits", images=4, size=96, min_scale=16, max_scale=32), tmp_path)
    data = read_dataset(tmp_path / "train", "coco")
    path = data.records[0].path
    path.write_bytes(path.read_bytes()[:400])
    with pytest.raises(DatasetError, match=f"{path}: the image is truncated or corrupt"):
        DetectionDataset(data, ImageTransform(PreprocessSpec(size=64)), augmentation)[0]


def coco_split(
    folder: Path, boxes: list[list[float]], size: tuple[int, int] = (100, 80), orientation: int = 1
) -> Path:
    """One 100x80 image (stored size) and its boxes (COCO x, y, w, h), with ``size`` in the document."""
    (folder / "images").mkdir(parents=True)
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    Image.new("RGB", (100, 80)).save(folder / "images" / "a.jpg", exif=exif)
    doc = {
        "categories": [{"id": 1, "name": "a"}],
        "images": [{"id": 1, "file_name": "a.jpg", "width": size[0], "height": size[1]}],
        "annotations": [{"id": i, "image_id": 1, "category_id": 1, "bbox": b} for i, b in enumerate(boxes)],
    }
    (folder / "annotations.json").write_text(json.dumps(doc))
    return folder


def test_boxes_reaching_outside_the_image_are_clipped_and_empty_ones_dropped(tmp_path: Path, caplog) -> None:
    """Real exports hold boxes a fraction of a pixel past the border, and boxes of no width: they used to
    refuse the whole dataset. Ultralytics, Detectron2 and MMDetection clip and drop them."""
    boxes = [[10, 10, 20, 20], [-0.5, 5, 10.5, 10], [90, 70, 10.4, 10.6], [10, 10, 0, 20], [150, 10, 20, 20]]
    with caplog.at_level("WARNING", logger="tuners.data.records"):
        record = read_dataset(coco_split(tmp_path, boxes), "coco").records[0]
    assert record.boxes.tolist() == [[10, 10, 30, 30], [0, 5, 10, 15], [90, 70, 100, 80]]
    assert record.labels.tolist() == [0, 0, 0] and record.crowd.tolist() == [False] * 3
    assert "2 boxes reach outside their image and were clipped to it; 2 with no area inside it" in caplog.text


@pytest.mark.parametrize(
    ("boxes", "size", "words"),
    [([[30, 10, -20, 20]], (100, 80), r"1 boxes end before they start, as \[30.0, 10.0, 10.0, 30.0\]"),
     ([[10, 10, float("nan"), 20]], (100, 80), "box coordinates that are not finite numbers"),
     ([[10, 10, 20, 20]], (200, 160), "the annotations give 200x160 pixels, the image is 100x80")],
)  # fmt: skip
def test_boxes_no_format_can_mean_and_a_resized_image_are_refused(tmp_path: Path, boxes, size, words: str) -> None:
    with pytest.raises(DatasetError, match=words):
        read_dataset(coco_split(tmp_path, boxes, size), "coco")


def test_the_size_comes_from_the_upright_image(tmp_path: Path) -> None:
    """An EXIF-turned photo whose document gives its stored size; a VOC file with no size at all."""
    record = read_dataset(coco_split(tmp_path / "coco", [[10, 50, 60, 40]], orientation=6), "coco").records[0]
    assert (record.width, record.height) == (80, 100) and record.boxes.tolist() == [[10, 50, 70, 90]]
    voc = tmp_path / "voc"
    (voc / "Annotations").mkdir(parents=True)
    (voc / "JPEGImages").mkdir()
    Image.new("RGB", (100, 80)).save(voc / "JPEGImages" / "a.jpg")
    box = "<bndbox><xmin>10</xmin><ymin>10</ymin><xmax>30</xmax><ymax>30</ymax></bndbox>"
    xml = f"<annotation><filename>a.jpg</filename><object><name>a</name>{box}</object></annotation>"
    (voc / "Annotations" / "a.xml").write_text(xml)
    record = read_dataset(voc, "voc").records[0]
    assert (record.width, record.height) == (100, 80) and record.boxes.tolist() == [[10, 10, 30, 30]]


@pytest.mark.parametrize("line", ["0 12 30 4 4", "0 0.5 -0.1 0.2 0.2", "0 0.5 0.5 nan 0.2"])
def test_yolo_coordinates_outside_0_1_are_refused(tmp_path: Path, line: str) -> None:
    """Pixel coordinates in a YOLO file (a common mix-up) must not be read as fractions, nor clipped away."""
    with pytest.raises(DatasetError, match=r"numbers in \[0, 1\]"):
        read_dataset(yolo_split(tmp_path, f"{line}\n"), "yolo")


def test_a_yolo_split_of_tiff_images_is_read(tmp_path: Path) -> None:
    """Industrial cameras write TIFF; a split of them read as empty ("no images") before."""
    yolo_split(tmp_path, "0 0.5 0.5 0.2 0.2\n")
    Image.open(tmp_path / "images" / "x.jpg").save(tmp_path / "images" / "y.tiff")
    (tmp_path / "labels" / "y.txt").write_text("0 0.5 0.5 0.4 0.4\n")
    records = read_dataset(tmp_path, "yolo").records
    assert [r.path.name for r in records] == ["x.jpg", "y.tiff"] and records[1].boxes.tolist() == [[6, 3, 14, 7]]
