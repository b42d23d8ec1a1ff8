"""Optional backbone feature cache: image content hash -> taps, LRU, bounded in bytes.

A second request about the same image (other tasks, or a client polling a still frame) skips
the backbone. Entries are CPU tensors; a request whose taps are not all cached runs the backbone.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from torch import Tensor


class FeatureCache:
    """``get``/``put`` by image hash; never holds more than ``budget_bytes`` of tap tensors."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self.bytes = 0
        self._entries: OrderedDict[str, dict[str, Tensor]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str, taps: list[str]) -> dict[str, Tensor] | None:
        """``{tap: [1, C, h, w]}`` when every tap in ``taps`` is cached for ``key``."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or not all(t in entry for t in taps):
                return None
            self._entries.move_to_end(key)
            return {t: entry[t] for t in taps}

    def put(self, key: str, taps: dict[str, Tensor]) -> None:
        # A copy: a row of a batch's taps is a view that would keep the whole batch alive, uncounted.
        stored = {t: v.detach().to("cpu", copy=True).contiguous() for t, v in taps.items()}
        size = sum(v.numel() * v.element_size() for v in stored.values())
        if size > self.budget_bytes:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.bytes -= sum(v.numel() * v.element_size() for v in old.values())
                stored = {**old, **stored}
                size = sum(v.numel() * v.element_size() for v in stored.values())
            while self._entries and self.bytes + size > self.budget_bytes:
                _, evicted = self._entries.popitem(last=False)
                self.bytes -= sum(v.numel() * v.element_size() for v in evicted.values())
            if self.bytes + size <= self.budget_bytes:
                self._entries[key] = stored
                self.bytes += size
