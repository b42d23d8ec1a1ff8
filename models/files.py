"""Durable and atomic file writes: the one way a file is written where a reader, or the next start
after a crash, may find it.

:func:`replacing` is how a file is replaced in place: the store's ``CURRENT`` pointers, objects in
a shared store, exported ONNX graphs, a run's report and plots. The new content goes to a temporary
file beside the target, is flushed to disk, then renamed over the target, and the folder is synced
so that the rename survives a power cut. A reader sees the old file or the new one, never part of
either; a failed write leaves the old file and no temporary one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """fsync a folder, so that a rename or a new file inside it is durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_synced(path: Path, data: bytes) -> None:
    """Writes ``path`` and flushes it to disk (not atomic: for a file in a folder that is renamed into
    place afterwards, or for the temporary file of :func:`replacing`)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` for the caller to write by any means (bytes, ``torch.onnx.export``,
    ``savefig``); when the block ends without error it is synced and renamed over ``path``, and
    ``path``'s folder synced. On an error it is removed and ``path`` is left as it was. Its name,
    ``.<name>.<random>.tmp``, is hidden and unique, so concurrent writers never share one."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def replacing_folder(folder: Path) -> Iterator[Path]:
    """A new temporary folder beside ``folder`` for the caller to fill; when the block ends without error
    its files are synced and it takes ``folder``'s place, and the parent is synced. On an error it is
    removed and ``folder`` is left as it was.

    A folder that exists is first renamed aside (``.<name>.old``, removed afterwards, or by the next
    replacement after a crash): POSIX cannot rename a folder over a non-empty one, so between the two
    renames ``folder`` is briefly missing, never partly written.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    old = folder.with_name(f".{folder.name}.old")
    try:
        yield tmp
        for path in tmp.iterdir():
            with open(path, "rb+") as f:
                os.fsync(f.fileno())
        shutil.rmtree(old, ignore_errors=True)
        if folder.exists():
            os.replace(folder, old)
        os.replace(tmp, folder)
        fsync_dir(folder.parent)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_atomic(path: Path, data: bytes) -> None:
    """Replaces ``path``'s content with ``data``, atomically and durably (:func:`replacing`)."""
    with replacing(path) as tmp:
        tmp.write_bytes(data)
