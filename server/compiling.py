"""Tiered compilation of the tuner cache's side tasks, as JITs tier: a task is served in torch at
once, and compiled (an ONNX Runtime graph of its tuner and head) on a thread of its own once it has
served ``after`` requests while resident, so that tasks churning through the cache never pay for it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from server.cache_entries import Entry
from tuners.compiled import CompiledTask
from tuners.task_model import TaskModel

log = logging.getLogger(__name__)
Compiler = Callable[[TaskModel, dict[str, Any]], CompiledTask]


def trim_graphs(used: Path, keep_bytes: int) -> None:
    """Marks graph ``used`` as just used, then removes the least recently used ``.onnx`` graphs beside
    it until they hold at most ``keep_bytes`` (``used`` stays). Graphs are named by their content, so
    those of versions pruned or deleted would otherwise pile up; a removed graph is exported again
    when a task needs it. Another process removing the same files meanwhile is harmless."""
    try:
        os.utime(used)
        total = used.stat().st_size
    except OSError:  # removed meanwhile by another process: it is in memory, and exported again if needed
        total = 0
    graphs = []
    with os.scandir(used.parent) as entries:
        for entry in entries:
            if entry.name.endswith(".onnx") and not entry.name.startswith(".") and entry.path != str(used):
                with contextlib.suppress(OSError):  # removed meanwhile
                    stat = entry.stat()
                    graphs.append((stat.st_mtime_ns, stat.st_size, entry.path))
    total += sum(size for _, size, _ in graphs)
    for _, size, path in sorted(graphs):
        if total <= keep_bytes:
            break
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        total -= size


class BackgroundCompiler:
    """Compiles entries with ``compiler`` (``None``: never) on one background thread."""

    def __init__(self, compiler: Compiler | None, after: int = 2) -> None:
        self.compiler, self.after = compiler, after
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tuner-compiler")

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def used(self, entry: Entry, snapshot: Callable[[Entry], TaskModel | None]) -> None:
        """Called at each use of ``entry``: at its ``after``-th, compiles it (see :meth:`compile`)."""
        if entry.uses == self.after:
            self.compile(entry, snapshot)

    def compile(self, entry: Entry, snapshot: Callable[[Entry], TaskModel | None]) -> None:
        """Compiles a side entry on the background thread, from ``snapshot(entry)``: a copy of its model
        taken while it is resident (``None`` once it has left the cache: nothing to compile). A failed
        compile is logged, and the task goes on serving in torch."""
        if self.compiler is None or entry.compiled is not None or entry.model.kind != "side":
            return
        compiler = self.compiler

        def run() -> None:
            model = snapshot(entry)
            if model is None:
                return
            try:
                entry.compiled = compiler(model, entry.manifest)
            except Exception:  # noqa: BLE001  (the task keeps serving in torch)
                log.exception("compiling task %s v%d failed; it is served in torch", *entry.key)

        self._pool.submit(run)

    def drain(self) -> None:
        """Waits for the compiles queued so far (tests)."""
        self._pool.submit(lambda: None).result()
