"""models.files: a file or folder replaced in place is the old one or the new one, and nothing is left beside it."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.files import replacing, replacing_folder, write_atomic


def test_a_replaced_file_is_whole_and_leaves_no_temporary_file(tmp_path: Path):
    target = tmp_path / "CURRENT"
    target.write_bytes(b"v1")
    with replacing(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".CURRENT.")  # hidden, beside it (same filesystem)
        tmp.write_bytes(b"v2")
        assert target.read_bytes() == b"v1"  # not replaced until the block ends
    assert target.read_bytes() == b"v2" and [p.name for p in tmp_path.iterdir()] == ["CURRENT"]
    write_atomic(target, b"v3")
    assert target.read_bytes() == b"v3" and [p.name for p in tmp_path.iterdir()] == ["CURRENT"]


def test_a_failed_write_keeps_the_old_file_and_removes_its_temporary_one(tmp_path: Path):
    target = tmp_path / "report.json"
    target.write_bytes(b"old")
    with pytest.raises(OSError, match="disk full"), replacing(target) as tmp:
        tmp.write_bytes(b"half")
        raise OSError("disk full")
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["report.json"]
    with pytest.raises(RuntimeError), replacing(tmp_path / "new.onnx"):
        raise RuntimeError("the exporter failed before writing anything")
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_a_replaced_folder_is_the_whole_new_one_and_a_failure_keeps_the_old(tmp_path: Path):
    folder = tmp_path / "best"
    (tmp_path / ".best.old").mkdir()  # left by a crash between the two renames of an earlier replacement
    with replacing_folder(folder) as tmp:
        (tmp / "tuner.json").write_text("1")
    with replacing_folder(folder) as tmp:
        (tmp / "tuner.json").write_text("2")
        assert (folder / "tuner.json").read_text() == "1"
    assert [p.name for p in folder.iterdir()] == ["tuner.json"] and (folder / "tuner.json").read_text() == "2"
    with pytest.raises(OSError), replacing_folder(folder) as tmp:
        (tmp / "tuner.json").write_text("half")
        raise OSError("disk full")
    assert (folder / "tuner.json").read_text() == "2" and [p.name for p in tmp_path.iterdir()] == ["best"]
