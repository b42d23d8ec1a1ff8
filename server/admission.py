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

from server.exceptions import Overloaded


class NoRoom(Overloaded):
    """A tier has no room for ``nbytes`` more, for ``tasks`` task models: every entry in it is pinned or in use."""

    def __init__(self, message: str, nbytes: int = 0, tasks: int = 1) -> None:
        super().__init__(message)
        self.nbytes, self.tasks = nbytes, tasks

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.message, self.nbytes, self.tasks))


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
