"""Datasets given as the zip file an annotation tool or a dataset site exports (Roboflow, CVAT, Label
Studio), unpacked once beside it, as Ultralytics unpacks a zip named by ``data=``.

``DATA.zip`` is unpacked into ``DATA/`` beside it, atomically (into a hidden temporary folder, then
renamed), and read from there; a later run reads that folder again without unpacking. The zip is
never changed or removed. An archive whose files would not fit on the disk is refused before any is
written; names that would land outside the folder (``../``, absolute) are made safe by
:mod:`zipfile`, which writes no links.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import zipfile
from pathlib import Path

from tuners.data.records import DatasetError

log = logging.getLogger(__name__)


def unpacked(archive: Path) -> Path:
    """The dataset folder of ``archive``: ``archive`` without its suffix, unpacked there on first use.
    An archive holding one top folder (and nothing else) gives that folder.

    Raises:
        DatasetError: the archive cannot be read, or would not fit on the disk.
    """
    folder = archive.with_suffix("")
    if not folder.exists():
        _unpack(archive, folder)
    else:
        log.info("reading %s, the folder beside %s (remove it to unpack the archive again)", folder, archive.name)
    inside = [p for p in folder.iterdir() if p.name != "__MACOSX" and not p.name.startswith(".")]
    return inside[0] if len(inside) == 1 and inside[0].is_dir() else folder


def _unpack(archive: Path, folder: Path) -> None:
    try:
        with zipfile.ZipFile(archive) as zf:
            needed = sum(info.file_size for info in zf.infolist())
            free = shutil.disk_usage(archive.parent).free
            if needed > free:
                raise DatasetError(f"{archive} holds {needed:,} bytes; {archive.parent} has {free:,} free")
            log.info("unpacking %s (%d files, %d bytes) into %s", archive, len(zf.infolist()), needed, folder)
            tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=archive.parent))
            try:
                zf.extractall(tmp)
                tmp.rename(folder)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    except (zipfile.BadZipFile, OSError, EOFError, RuntimeError) as e:  # RuntimeError: encrypted
        raise DatasetError(f"cannot unpack {archive}: {e}") from e
