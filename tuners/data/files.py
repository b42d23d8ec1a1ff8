"""Finding a dataset's files as tools and people leave them: images listed without the litter beside
them, text lists written on any system, and paths written for another folder or machine."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from pathlib import Path

from tuners.data.records import DatasetError

# Every format models.imaging reads, as Ultralytics lists its IMG_FORMATS.
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".mpo", ".avif"}


def listed(folder: Path, suffixes: Collection[str], recursive: bool = False) -> list[Path]:
    """The files of ``folder`` (and below it, when ``recursive``) whose suffix, in any case, is one of
    ``suffixes``, sorted; without hidden files and what macOS leaves in the archives it makes
    (``._a.jpg`` beside each file, a ``__MACOSX/`` folder), which look like images but are not."""
    found = folder.rglob("*") if recursive else folder.glob("*")
    return sorted(
        p
        for p in found
        if p.suffix.lower() in suffixes
        and not any(part.startswith(".") or part == "__MACOSX" for part in p.relative_to(folder).parts)
        and p.is_file()
    )


def read_lines(path: Path) -> list[str]:
    """A text file's non-empty lines, stripped of spaces, Windows line ends and a byte-order mark.

    Raises:
        DatasetError: the file cannot be read, or is not UTF-8 text.
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot read {path}: {e}") from e
    return [line.strip() for line in text.splitlines() if line.strip()]


def locate(folders: Sequence[Path], name: str) -> Path:
    """The file an annotation names (relative or absolute, maybe with Windows separators) in the first
    of ``folders`` that holds it, or holds the tail of its path (its last folders and file name, as a
    darknet list's ``data/obj_train_data/a.jpg`` is ``obj_train_data/a.jpg`` here); else where the
    first folder would hold it (validation then reports it missing)."""
    named = Path(name.replace("\\", "/"))
    parts = [p for p in named.parts if p not in (named.anchor, "")]
    for tail in [Path(*parts[k:]) for k in range(len(parts))]:
        for folder in folders:
            if (folder / tail).is_file():
                return folder / tail
    return folders[0] / named
