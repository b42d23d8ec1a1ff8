"""Admission to the tuner cache: requests wait for room that other requests' tasks hold, and a
request that cannot fit even alone is refused at once."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import pytest

from server.exceptions import CacheBudget, Overloaded
from tests.server.conftest import copies_cache, lease_counts


def test_a_fan_out_that_finds_the_room_in_use_waits_for_it_and_is_served(tmp_path: Path, backbone, artifacts):
    cache = copies_cache(tmp_path, backbone, artifacts["side1"], tasks=4, room=2, wait_s=30)

    async def run() -> None:
        held = await cache.acquire_many([("t0", None), ("t1", None)])
        waiting = asyncio.create_task(cache.acquire_many([("t2", None), ("t3", None)]))
        await asyncio.sleep(0.3)
        assert not waiting.done()  # before: an immediate 503, though the room frees within one batch
        for lease in held:
            cache.release(lease)
        leases = await asyncio.wait_for(waiting, 10)
        assert [lease.entry.key for lease in leases] == [("t2", 1), ("t3", 1)]
        for lease in leases:
            cache.release(lease)

    asyncio.run(run())
    cache.close()


def test_a_request_that_cannot_fit_even_alone_is_refused_at_once(tmp_path: Path, backbone, artifacts):
    cache = copies_cache(tmp_path, backbone, artifacts["side1"], tasks=4, room=2, wait_s=30)

    async def run() -> None:
        start = time.monotonic()
        with pytest.raises(CacheBudget, match="the 3 task"):
            await cache.acquire_many([("t0", None), ("t1", None), ("t2", None)])
        await cache.pin("t3")
        with pytest.raises(CacheBudget, match="pinned"):  # the pinned task leaves room for one
            await cache.acquire_many([("t0", None), ("t1", None)])
        assert time.monotonic() - start < 10  # no wait for room that cannot come
        assert set(lease_counts(cache).values()) == {0}  # nothing stays leased

    asyncio.run(run())
    cache.close()


def test_a_request_the_pinned_tasks_leave_too_little_room_for_is_refused_not_retried_forever(
    tmp_path: Path, backbone, artifacts
):
    """Its first load fails, so it knows of one task's bytes only: the estimate for both, capped at
    what the pins leave, looked like it fit, and the request retried in a loop while every later
    request that found no room queued behind it (``bench/races.py`` found it)."""
    cache = copies_cache(tmp_path, backbone, artifacts["side1"], tasks=4, room=2, wait_s=30)

    async def run() -> None:
        await cache.pin("t0")
        await cache.pin("t3")
        with pytest.raises(CacheBudget, match="pinned"):
            await asyncio.wait_for(cache.acquire_many([("t1", None), ("t0", None)]), 10)
        assert lease_counts(cache) == {"t0": 0, "t3": 0}

    asyncio.run(run())
    cache.close()


def test_waiting_for_room_ends_in_overloaded_after_wait_s(tmp_path: Path, backbone, artifacts):
    cache = copies_cache(tmp_path, backbone, artifacts["side1"], tasks=3, room=2, wait_s=0.3)

    async def run() -> None:
        held = await cache.acquire_many([("t0", None), ("t1", None)])
        start = time.monotonic()
        with pytest.raises(Overloaded, match="other requests") as e:
            await cache.acquire("t2")
        assert 0.3 <= time.monotonic() - start < 10 and e.value.retry_after
        assert lease_counts(cache) == {"t0": 1, "t1": 1}
        for lease in held:
            cache.release(lease)
        cache.release(await cache.acquire("t2"))

    asyncio.run(run())
    cache.close()


def test_concurrent_fan_outs_over_more_tasks_than_fit_all_finish(tmp_path: Path, backbone, artifacts):
    """Six clients, each asking for 2 of 5 tasks at a time with room for 3: every request is served."""
    cache = copies_cache(tmp_path, backbone, artifacts["side1"], tasks=5, room=3, wait_s=60)

    async def client(seed: int) -> int:
        rng = random.Random(seed)
        for _ in range(6):
            leases = await cache.acquire_many([(f"t{i}", None) for i in rng.sample(range(5), 2)])
            await asyncio.sleep(0.01)  # a batch
            for lease in leases:
                cache.release(lease)
        return 6

    async def run() -> None:
        assert sum(await asyncio.wait_for(asyncio.gather(*(client(k) for k in range(6))), 120)) == 36
        assert set(lease_counts(cache).values()) == {0} and cache.resident_bytes("device") <= cache.budgets["device"]

    asyncio.run(run())
    cache.close()
