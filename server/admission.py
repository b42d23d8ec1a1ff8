"""The queue for room in the device tier of the tuner cache.

A request that finds the device tier full of task models that other requests are using does not
fail at once. It waits here until releases free the room it needs, or until ``wait_s`` has passed;
LoRA servers (S-LoRA, vLLM) likewise keep a request queued until its adapters fit. One request
waits at a time, and requests that arrive meanwhile queue behind it in arrival order, so the
biggest fan-out is not starved by smaller ones. A waiting request holds no lease, so no two
requests can wait for each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

from server.exceptions import CacheBudget, Overloaded

MiB = 1 << 20


class NoRoom(Overloaded):
    """A tier has no room for ``nbytes`` more, for ``tasks`` task models: every entry in it is pinned or in use."""

    def __init__(self, message: str, nbytes: int = 0, tasks: int = 1) -> None:
        super().__init__(message)
        self.nbytes, self.tasks = nbytes, tasks

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.message, self.nbytes, self.tasks))


def fits(full: NoRoom, tasks: int, budget: int, pinned: int, busy: int) -> bool:
    """Whether ``tasks`` task models look able to fit a tier of ``budget`` bytes now: their bytes
    (extrapolated from what ``full`` counted; at most what the ``pinned`` bytes leave) are free or held
    by idle entries, not by the ``busy`` bytes other requests use.

    Raises:
        CacheBudget: even with no other request they could not fit.
    """
    if full.nbytes > budget - pinned:
        raise too_big(full, tasks, budget, pinned)
    need = full.nbytes * tasks // max(1, full.tasks)
    return min(need, budget - pinned) <= budget - pinned - busy


def too_big(full: NoRoom, tasks: int, budget: int, pinned: int) -> CacheBudget:
    """The error for ``tasks`` task models that need ``full.nbytes`` at least, over what ``pinned`` leaves."""
    return CacheBudget(
        f"the {tasks} task(s) named need at least {full.nbytes / MiB:.1f} MiB of task models at once; "
        f"the device cache holds {budget / MiB:.1f} MiB ({pinned / MiB:.1f} MiB pinned): name fewer tasks "
        "per request, unpin tasks or raise device_cache_bytes"
    )


class Admission:
    """The waiting request's turn and its wake-ups. Its asyncio objects belong to the event loop that
    uses them, and are made again for another loop (tests run several).

    Args:
        wait_s: how long a request waits for room before :class:`Overloaded` (0: not at all).
    """

    def __init__(self, wait_s: float) -> None:
        self.wait_s = wait_s
        self._state: tuple[asyncio.AbstractEventLoop, asyncio.Lock, asyncio.Event] | None = None

    @property
    def queued(self) -> bool:
        """Whether a request is waiting for room; a new request then queues behind it."""
        state = self._state
        return state is not None and state[1].locked()

    def turn(self) -> asyncio.Lock:
        """Held (``async with``) by the one request that waits; the others queue for it in arrival order."""
        return self._signals()[0]

    async def wait(self, fits: Callable[[], bool], deadline: float, after_release: bool = False) -> None:
        """Returns once ``fits()`` is true, checked after each release (and now, unless ``after_release``).
        ``fits`` may raise to refuse.

        Raises:
            Overloaded: ``deadline`` (``time.monotonic()``) passed first.
        """
        released = self._signals()[1]
        while True:
            if not after_release:  # else a release since the last check (the event is still set) goes on at once
                released.clear()
                if fits():
                    return
            after_release = False
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Overloaded(
                    f"the device tuner cache is full of tasks that other requests are using (waited {self.wait_s:g} "
                    "s); retry shortly"
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(released.wait(), remaining)

    def released(self) -> None:
        """A lease was released: wakes the waiting request, if any. Safe from any thread."""
        state = self._state
        if state is not None and state[1].locked() and not state[0].is_closed():
            state[0].call_soon_threadsafe(state[2].set)

    def _signals(self) -> tuple[asyncio.Lock, asyncio.Event]:
        loop = asyncio.get_running_loop()
        if self._state is None or self._state[0] is not loop:
            self._state = (loop, asyncio.Lock(), asyncio.Event())
        return self._state[1], self._state[2]
