"""Datasets as annotation tools and public downloads lay them out, read without --format: COCO's own
download (and Detectron2's, CVAT's), Label Studio's result.json, LabelImg's and Roboflow's XML files
beside the images, the VOC2012 download with its ImageSets splits, YOLO segmentation labels, and text
files written on Windows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from tuners.data.cli import main as data_cli
from tuners.data.formats import read_dataset
from tuners.data.layouts import detect_format, is_split, read_splits
from tuners.data.records import DatasetError
from tuners.tools.common import image_paths


def image(path: Path, size: tuple[int, int] = (100, 80)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size).save(path)
    return path


def coco_doc(file_names: list[str], category: str = "hat") -> dict:
    """One ``[10, 10, 20, 20]`` (x, y, w, h) box of ``category`` per 100x80 image."""
    return {
        "categories": [{"id": 7, "name": category}],
        "images": [{"id": i, "file_name": n, "width": 100, "height": 80} for i, n in enumerate(file_names)],
        "annotations": [
            {"id": i, "image_id": i, "category_id": 7, "bbox": [10, 10, 20, 20]} for i in range(len(file_names))
        ],
    }


def voc_xml(filename: str, name: str = "hat", size: bool = True) -> str:
    part = "<part><name>head</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax><ymax>5</ymax></bndbox></part>"
    return (
        f"<annotation><filename>{filename}</filename>"
        + ("<size><width>100</width><height>80</height><depth>3</depth></size>" if size else "")
        + f"<object><name>\n\t{name}\n</name><bndbox><xmin>10</xmin><ymin>10</ymin><xmax>30</xmax>"
        f"<ymax>30</ymax></bndbox>{part}</object></annotation>"
    )


def test_the_coco_download_layout_reads_each_split_from_its_instances_file(tmp_path: Path) -> None:
    """annotations/instances_train2017.json + train2017/ (and val2017), as COCO, Detectron2 and CVAT lay it out;
    the captions and keypoints files beside them are not read."""
    (tmp_path / "annotations").mkdir()
    for split, count in (("train2017", 2), ("val2017", 1)):
        names = [f"{split}-{i}.jpg" for i in range(count)]
        for name in names:
            image(tmp_path / split / name)
        (tmp_path / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco_doc(names)))
    (tmp_path / "annotations" / "captions_train2017.json").write_text("{}")
    assert detect_format(tmp_path) == "coco" and not is_split(tmp_path, "coco")
    splits, fmt = read_splits(tmp_path)
    assert fmt == "coco" and {k: len(v.records) for k, v in splits.items()} == {"train": 2, "val": 1}
    assert splits["val"].records[0].path == tmp_path / "val2017" / "val2017-0.jpg"
    assert splits["train"].records[1].boxes.tolist() == [[10, 10, 30, 30]] and splits["train"].classes == ["hat"]


def test_a_cvat_export_with_one_instances_file_is_the_train_split(tmp_path: Path) -> None:
    image(tmp_path / "images" / "a.jpg")
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_default.json").write_text(json.dumps(coco_doc(["a.jpg"])))
    splits, _ = read_splits(tmp_path)
    assert list(splits) == ["train"] and splits["train"].records[0].path == tmp_path / "images" / "a.jpg"
    assert is_split(tmp_path, "coco")


def test_annotation_files_whose_split_cannot_be_told_are_refused_by_name(tmp_path: Path) -> None:
    (tmp_path / "annotations").mkdir()
    for name in ("instances_a.json", "instances_b.json"):
        (tmp_path / "annotations" / name).write_text(json.dumps(coco_doc([])))
    with pytest.raises(DatasetError, match="cannot tell which split instances_a.json is"):
        read_splits(tmp_path)


def test_label_studio_result_json_finds_images_named_with_their_folder(tmp_path: Path) -> None:
    """Label Studio names images "images/a.jpg" beside result.json; other tools give Windows paths."""
    image(tmp_path / "images" / "a.jpg")
    image(tmp_path / "images" / "b.jpg")
    doc = coco_doc(["images/a.jpg", "C:\\Users\\me\\labels\\b.jpg"])
    (tmp_path / "result.json").write_text(json.dumps(doc))
    for data in (read_splits(tmp_path)[0]["train"], read_splits(tmp_path / "result.json")[0]["train"]):
        assert [r.path for r in data.records] == [tmp_path / "images" / "a.jpg", tmp_path / "images" / "b.jpg"]
    assert is_split(tmp_path / "result.json", "coco")


def test_xml_files_beside_their_images_are_voc_splits_with_one_class_list(tmp_path: Path) -> None:
    """LabelImg saves each XML file beside its image; Roboflow's VOC export does so in train/ and valid/.
    A class seen in one split only must keep one index across splits."""
    image(tmp_path / "train" / "a.jpg")
    (tmp_path / "train" / "a.xml").write_text(voc_xml("a.jpg", "vest"))
    image(tmp_path / "train" / "b.jpg")
    (tmp_path / "train" / "b.xml").write_text(voc_xml("b.jpg", "hat"))
    image(tmp_path / "valid" / "c.jpg")
    (tmp_path / "valid" / "c.xml").write_text(voc_xml("c.jpg", "vest"))
    splits, fmt = read_splits(tmp_path)
    assert fmt == "voc" and splits["train"].classes == splits["val"].classes == ["hat", "vest"]
    assert splits["val"].records[0].labels.tolist() == [1] and splits["train"].records[1].labels.tolist() == [0]
    assert read_dataset(tmp_path / "train", "voc").records[0].boxes.tolist() == [[10, 10, 30, 30]]  # parts left out


def test_the_voc_download_splits_by_its_image_sets(tmp_path: Path) -> None:
    """VOC2012: ImageSets/Main/train.txt and val.txt name each split's files; <filename> may lack its
    suffix, and an image converted after labelling (a.png for a.jpg) is still found."""
    (tmp_path / "Annotations").mkdir()
    for stem, filename, suffix in (("a", "a.jpg", ".png"), ("b", "b", ".JPG"), ("c", "c.jpg", ".jpg")):
        image(tmp_path / "JPEGImages" / f"{stem}{suffix}")
        (tmp_path / "Annotations" / f"{stem}.xml").write_text(voc_xml(filename, size=False))
    (tmp_path / "ImageSets" / "Main").mkdir(parents=True)
    (tmp_path / "ImageSets" / "Main" / "trainval.txt").write_text("a\nb\n")
    (tmp_path / "ImageSets" / "Main" / "val.txt").write_text("c\n")
    assert not is_split(tmp_path, "voc")
    splits, _ = read_splits(tmp_path)
    assert [r.path.name for r in splits["train"].records] == ["a.png", "b.JPG"]
    assert [r.path.name for r in splits["val"].records] == ["c.jpg"] and splits["val"].classes == ["hat"]
    out = tmp_path / "as-yolo"
    assert data_cli(["convert", "--data", str(tmp_path), "--to", "yolo", "--out", str(out)]) == 0
    assert (out / "train" / "labels" / "b.txt").is_file() and (out / "val" / "labels" / "c.txt").is_file()


def test_a_file_an_image_set_names_that_is_missing_is_named(tmp_path: Path) -> None:
    (tmp_path / "Annotations").mkdir()
    (tmp_path / "ImageSets" / "Main").mkdir(parents=True)
    (tmp_path / "ImageSets" / "Main" / "train.txt").write_text("gone\n")
    with pytest.raises(DatasetError, match="gone.xml"):
        read_splits(tmp_path)


def test_class_lists_written_on_windows_are_read_as_their_names(tmp_path: Path) -> None:
    image(tmp_path / "voc" / "JPEGImages" / "a.jpg")
    (tmp_path / "voc" / "Annotations").mkdir()
    (tmp_path / "voc" / "Annotations" / "a.xml").write_text(voc_xml("a.jpg", "vest"))
    (tmp_path / "voc" / "classes.txt").write_bytes("\ufeffhat\r\nvest\r\n".encode())
    assert read_dataset(tmp_path / "voc", "voc").records[0].labels.tolist() == [1]
    yolo = tmp_path / "yolo"
    image(yolo / "images" / "a.jpg")
    (yolo / "labels").mkdir()
    (yolo / "labels" / "a.txt").write_bytes(b"1 0.5 0.5 0.2 0.2\r\n")
    (yolo / "classes.txt").write_bytes("\ufeffhat\r\nvest\r\n".encode())
    data = read_dataset(yolo, "yolo")
    assert data.classes == ["hat", "vest"] and data.records[0].labels.tolist() == [1]


@pytest.mark.parametrize(
    ("line", "box"),
    [("0 0.1 0.1 0.3 0.1 0.3 0.4 0.1 0.4", [10, 8, 30, 32]),  # a segmentation polygon, boxed
     ("0.0 0.5 0.5 0.2 0.2", [40, 32, 60, 48]),  # a class written as a float
     ("0 0.5 0.5 0.2 1.0000001", [40, 0, 60, 80])],  # rounding past 1, clipped
)  # fmt: skip
def test_yolo_lines_as_exporters_write_them_are_read(tmp_path: Path, line: str, box: list[float]) -> None:
    image(tmp_path / "images" / "a.jpg")
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "a.txt").write_text(line + "\n")
    (tmp_path / "classes.txt").write_text("hat\n")
    records = read_dataset(tmp_path, "yolo").records
    assert records[0].labels.tolist() == [0]
    assert records[0].boxes[0].tolist() == pytest.approx(box)


def test_a_darknet_obj_data_reads_its_lists_with_labels_beside_the_images(tmp_path: Path) -> None:
    """CVAT's "YOLO 1.1" export: obj.data names its files as darknet sees them, under data/."""
    for split, stem in (("train", "a"), ("valid", "b")):
        image(tmp_path / f"obj_{split}_data" / f"{stem}.jpg")
        (tmp_path / f"obj_{split}_data" / f"{stem}.txt").write_text("1 0.5 0.5 0.2 0.2\n")
        (tmp_path / f"{split}.txt").write_text(f"data/obj_{split}_data/{stem}.jpg\n")
    (tmp_path / "obj.names").write_text("hat\nvest\n")
    spec = "classes = 2\nnames = data/obj.names\ntrain = data/train.txt\nvalid = data/valid.txt  # optional\n"
    (tmp_path / "obj.data").write_text(spec + "backup = backup/\n")
    splits, fmt = read_splits(tmp_path)
    assert fmt == "darknet" and splits["val"].records[0].path == tmp_path / "obj_valid_data" / "b.jpg"
    assert splits["train"].classes == ["hat", "vest"] and splits["train"].records[0].labels.tolist() == [1]
    assert splits["train"].records[0].boxes.tolist() == [[40, 32, 60, 48]]


def test_an_image_list_naming_a_missing_image_is_refused_naming_it(tmp_path: Path) -> None:
    """Before, an Ultralytics train.txt naming a missing image raised FileNotFoundError."""
    image(tmp_path / "images" / "train" / "a.jpg")
    (tmp_path / "labels" / "train").mkdir(parents=True)
    (tmp_path / "data.yaml").write_text("path: .\ntrain: train.txt\nnames: [hat]\n")
    (tmp_path / "train.txt").write_text("images/train/a.jpg\nimages/train/gone.jpg\n")
    with pytest.raises(DatasetError, match="gone.jpg: the image file is missing"):
        read_splits(tmp_path)


def test_label_studio_voc_and_a_coco_file_without_sizes_are_read(tmp_path: Path) -> None:
    """Label Studio's VOC export keeps its images in images/, not JPEGImages/; some COCO writers give no
    image size, which is then read from the image."""
    image(tmp_path / "voc" / "images" / "a.jpg")
    (tmp_path / "voc" / "Annotations").mkdir()
    (tmp_path / "voc" / "Annotations" / "a.xml").write_text(voc_xml("a.jpg"))
    assert read_dataset(tmp_path / "voc", "voc").records[0].path == tmp_path / "voc" / "images" / "a.jpg"
    image(tmp_path / "coco" / "images" / "a.jpg")
    doc = coco_doc(["a.jpg"])
    del doc["images"][0]["width"]
    (tmp_path / "coco" / "annotations.json").write_text(json.dumps(doc))
    record = read_dataset(tmp_path / "coco", "coco").records[0]
    assert (record.width, record.height) == (100, 80)


@pytest.mark.parametrize(
    "spec",
    ["train: ../train/images\nval: ../valid/images\nnc: 1\nnames: ['hat']\nroboflow:\n  version: 1\n",
     "path: /content/datasets/hats\ntrain: train/images\nval: valid/images\nnames:\n  0: hat\n",
     "train: hats-1/train/images\nval: hats-1/valid/images\nnames: [hat]\n",
     "path: .\ntrain: train.txt\nval: valid/images\nnames: [hat]\n"],
)  # fmt: skip
def test_data_yaml_entries_written_for_another_folder_are_found(tmp_path: Path, spec: str) -> None:
    """Roboflow's YOLO exports name ../train/images (Ultralytics strips the ../); notebooks leave a Colab
    path or the download's folder name in front; a list may give another machine's absolute paths."""
    for split in ("train", "valid"):
        image(tmp_path / split / "images" / f"{split}.jpg")
        (tmp_path / split / "labels").mkdir()
        (tmp_path / split / "labels" / f"{split}.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    (tmp_path / "train.txt").write_text("/content/hats/train/images/train.jpg\n")
    (tmp_path / "data.yaml").write_text(spec)
    splits, fmt = read_splits(tmp_path)
    assert fmt == "ultralytics" and splits["val"].records[0].path == tmp_path / "valid" / "images" / "valid.jpg"
    assert splits["train"].records[0].path == tmp_path / "train" / "images" / "train.jpg"
    assert [len(r.boxes) for r in splits["train"].records + splits["val"].records] == [1, 1]


def test_a_data_yaml_entry_found_nowhere_is_still_refused(tmp_path: Path) -> None:
    image(tmp_path / "images" / "a.jpg")
    (tmp_path / "data.yaml").write_text("train: ../elsewhere/images\nnames: [hat]\n")
    with pytest.raises(DatasetError, match="data.yaml names '../elsewhere/images'"):
        read_splits(tmp_path)


def test_what_macos_leaves_in_an_archive_is_not_read_as_images_or_annotations(tmp_path: Path) -> None:
    """A zip made on a Mac holds ._a.jpg beside a.jpg and a __MACOSX/ copy of the tree: AppleDouble files
    that end in .jpg or .xml but are not images or XML. Before, they refused the whole dataset."""
    litter = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        "
    yolo = tmp_path / "yolo"
    image(yolo / "images" / "a.jpg")
    (yolo / "labels").mkdir()
    (yolo / "labels" / "a.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    (yolo / "classes.txt").write_text("hat\n")
    (yolo / "images" / "._a.jpg").write_bytes(litter)
    assert [r.path.name for r in read_dataset(yolo, "yolo").records] == ["a.jpg"]
    labelimg = tmp_path / "labelimg"
    image(labelimg / "a.jpg")
    (labelimg / "a.xml").write_text(voc_xml("a.jpg"))
    (labelimg / "._a.xml").write_bytes(litter)
    assert len(read_splits(labelimg)[0]["train"].records) == 1
    ultralytics = tmp_path / "ultralytics"
    image(ultralytics / "images" / "train" / "a.jpg")
    (ultralytics / "__MACOSX" / "images" / "train").mkdir(parents=True)
    (ultralytics / "images" / "train" / "._a.jpg").write_bytes(litter)
    (ultralytics / "data.yaml").write_text("path: .\ntrain: images/train\nnames: [hat]\n")
    assert len(read_splits(ultralytics)[0]["train"].records) == 1
    assert image_paths([ultralytics]) == [ultralytics / "images" / "train" / "a.jpg"]


def test_a_zip_export_is_unpacked_beside_itself_once_and_read(tmp_path: Path) -> None:
    """Roboflow and CVAT hand out zips; --data export.zip reads them as Ultralytics' data= does. A zip
    made on a Mac holds one top folder and __MACOSX/ beside it."""
    import zipfile

    source = tmp_path / "src"
    for split in ("train", "valid"):
        image(source / split / "a.jpg")
        (source / split / "a.xml").write_text(voc_xml("a.jpg"))
    archive = tmp_path / "hats.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(source.rglob("*")):
            zf.write(path, Path("hats-voc") / path.relative_to(source))
        zf.writestr("__MACOSX/hats-voc/._train", b"\x00")
    size = archive.stat().st_size
    splits, fmt = read_splits(archive)
    assert fmt == "voc" and set(splits) == {"train", "val"} and not is_split(archive, fmt)
    assert splits["val"].records[0].path == tmp_path / "hats" / "hats-voc" / "valid" / "a.jpg"
    assert archive.stat().st_size == size and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    (tmp_path / "hats" / "hats-voc" / "train" / "a.xml").write_text(voc_xml("a.jpg", "vest"))
    again = read_splits(archive)[0]["train"]  # the unpacked folder is read again, not unpacked over
    assert again.classes == ["hat", "vest"] and again.records[0].labels.tolist() == [1]
    out = tmp_path / "as-coco"
    assert data_cli(["convert", "--data", str(archive), "--to", "coco", "--out", str(out)]) == 0
    assert (out / "train" / "annotations.json").is_file() and (out / "val" / "annotations.json").is_file()


def test_a_zip_that_is_not_one_is_refused_and_leaves_nothing(tmp_path: Path) -> None:
    (tmp_path / "broken.zip").write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(DatasetError, match="cannot unpack .*broken.zip"):
        read_splits(tmp_path / "broken.zip")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.zip"]


def test_server_train_takes_every_format_the_readers_read() -> None:
    """Before, server-train's --format lacked a layout the readers had (darknet)."""
    from pydantic import ValidationError

    from tuners.data.layouts import DATASET_FORMATS
    from tuners.trainer.config import TrainConfig

    assert [TrainConfig(data=Path("d"), format=fmt).format for fmt in DATASET_FORMATS] == list(DATASET_FORMATS)
    with pytest.raises(ValidationError):
        TrainConfig(data=Path("d"), format="labelme")


def test_a_coco_annotation_without_bbox_is_boxed_from_its_polygon(tmp_path: Path) -> None:
    """Segmentation tools may leave bbox out (pycocotools derives it); an RLE mask cannot be boxed here."""
    image(tmp_path / "images" / "a.jpg")
    doc = coco_doc(["a.jpg"])
    doc["annotations"][0] = {"id": 0, "image_id": 0, "category_id": 7, "segmentation": [[10, 8, 30, 8, 30, 32]]}
    (tmp_path / "annotations.json").write_text(json.dumps(doc))
    assert read_dataset(tmp_path, "coco").records[0].boxes.tolist() == [[10, 8, 30, 32]]
    doc["annotations"][0]["segmentation"] = {"counts": "abc", "size": [80, 100]}
    (tmp_path / "annotations.json").write_text(json.dumps(doc))
    with pytest.raises(DatasetError, match="annotation 0 has no bbox, nor a polygon segmentation"):
        read_dataset(tmp_path, "coco")


@pytest.mark.parametrize(("key", "words"), [("image_id", "names image 5"), ("category_id", "names category 5")])
def test_a_coco_annotation_naming_what_is_not_listed_is_refused_saying_so(tmp_path: Path, key: str, words: str):
    image(tmp_path / "images" / "a.jpg")
    doc = coco_doc(["a.jpg"])
    doc["annotations"][0][key] = 5
    (tmp_path / "annotations.json").write_text(json.dumps(doc))
    with pytest.raises(DatasetError, match=f"annotation 0 {words}, which is not listed"):
        read_dataset(tmp_path, "coco")


@pytest.mark.parametrize(
    ("spec", "words"),
    [(b"train: images\nnames: [h\xb5t]\n", "cannot read"),
     (b"train: images\nnames:\n", "'names' must be a list"),
     (b"train: images\nnames: {0: a, 2: b}\n", "'names' must be a list"),
     (b"train: 5\nnames: [a]\n", "'train' must be a folder")],
)  # fmt: skip
def test_a_malformed_data_yaml_is_a_dataset_error(tmp_path: Path, spec: bytes, words: str) -> None:
    """Found by fuzzing the readers: these raised UnicodeDecodeError or TypeError."""
    image(tmp_path / "images" / "a.jpg")
    (tmp_path / "data.yaml").write_bytes(spec)
    with pytest.raises(DatasetError, match=words):
        read_splits(tmp_path)


def test_an_image_set_line_with_a_nul_is_a_dataset_error(tmp_path: Path) -> None:
    (tmp_path / "Annotations").mkdir()
    (tmp_path / "ImageSets" / "Main").mkdir(parents=True)
    (tmp_path / "ImageSets" / "Main" / "train.txt").write_bytes(b"a\x00b\n")
    with pytest.raises(DatasetError, match="embedded null"):
        read_splits(tmp_path)


@pytest.mark.parametrize("fmt", ["voc", "yolo", "coco", "roboflow", "ultralytics", "darknet"])
def test_a_format_given_for_what_it_does_not_read_is_a_dataset_error(tmp_path: Path, fmt: str) -> None:
    """A file where --format names a folder layout raised NotADirectoryError; an empty Roboflow read passed."""
    (tmp_path / "notes.json").write_text("{}")
    with pytest.raises(DatasetError):
        read_splits(tmp_path / "notes.json" if fmt != "roboflow" else tmp_path, fmt)
