"""Answers with tens of thousands of detections, and what they cost the requests beside them.

A request may name 32 tasks and ask each for up to 1,000 detections. Such an answer is built and
written as JSON on the server's event loop, which every other request waits on meanwhile. A store of
``--tasks`` (32) untrained ``linear_probe`` tasks, which score every location alike, so that
``score_threshold=0`` gives each task hundreds of boxes. On one server per checkout, C clients ask
one task each in a closed loop (``score_threshold=0.3``, a few boxes), in slices of ``--seconds``:
alone, and beside one more client that asks all the tasks at once with ``score_threshold=0`` and
``max_detections=1000`` in a closed loop. The two loads take turns, the order turning every round.
Printed per checkout and load: the small requests' req/s, p50 and p99, and the large answers'
median latency, detections and bytes.

Run: ``.venv/bin/python -m bench.large_answers --compare-to /path/to/old-worktree``.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import httpx
import torch

from bench.common import scratch
from bench.listing import probe_store
from bench.load import KeepAlive, LoadResult, Server, ab_parser, ab_sides, beside, closed_loop, jpeg
from bench.serve_load import detect, merged

LARGE = {"score_threshold": "0", "max_detections": "1000"}


def beside_large(
    url: str, ids: list[str], image: bytes, load: Callable[[], LoadResult]
) -> tuple[LoadResult, list[tuple[float, int, int]]]:
    """``load()``'s result while one more client asks every task in ``ids`` for up to 1,000 detections
    each, in a closed loop; each large answer's (seconds, detections, bytes)."""
    answers: list[tuple[float, int, int]] = []

    def large(stop: threading.Event) -> None:
        with httpx.Client(timeout=120) as client:
            while not stop.is_set():
                start = time.perf_counter()
                answer = client.post(
                    f"{url}/v1/detect", params={**LARGE, "tasks": ",".join(ids)}, content=image,
                    headers={"content-type": "image/jpeg"},
                )  # fmt: skip
                answer.raise_for_status()
                count = sum(len(r["detections"]) for r in answer.json()["results"])
                answers.append((time.perf_counter() - start, count, len(answer.content)))

    return beside(load, large), answers


def side(store: Path, cwd: Path | None, ids: list[str], image: bytes, args: argparse.Namespace) -> dict:
    """{"loads": {load: merged small-request result}, "large": [(s, detections, bytes)]} over the
    rounds, on one server of checkout ``cwd``."""
    results: dict[str, list[LoadResult]] = defaultdict(list)
    large: list[tuple[float, int, int]] = []
    with Server(store, cwd=cwd) as server:
        with KeepAlive(server.url, timeout=120) as http:
            for task_id in ids:
                if detect([task_id], image)(http, None).status_code != 200:
                    raise RuntimeError(f"warming {task_id} failed")
        load = lambda: closed_loop(server.url, args.clients, args.seconds, detect(ids[:1], image))  # noqa: E731
        for i in range(args.rounds):
            for name in ("alone", "beside large answers")[:: 1 if i % 2 == 0 else -1]:
                if name == "alone":
                    results[name].append(load())
                else:
                    result, answers = beside_large(server.url, ids, image, load)
                    results[name].append(result)
                    large += answers
    return {"loads": {name: merged(runs) for name, runs in results.items()}, "large": large}


def main() -> None:
    args = ab_parser(__doc__, tasks=32, rounds=2, seconds=15.0).parse_args()
    torch.set_num_threads(2)
    with scratch("sidecar-large-answers-") as work:
        ids, image = probe_store(work, args.tasks), jpeg()
        print(f"| checkout | load, C={args.clients} | req/s | p50 ms | p99 ms | large answers: count, median ms "
              "| detections | MB |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|")
        for label, cwd in ab_sides(args):
            found = side(work / "store", cwd, ids, image, args)
            for name, r in found["loads"].items():
                large = found["large"] if name != "alone" else []
                extra = "| | |"
                if large:
                    ms = statistics.median(s for s, _, _ in large) * 1e3
                    extra = (f"{len(large)}, {ms:.0f} | {statistics.median(n for _, n, _ in large):.0f} "
                             f"| {statistics.median(b for _, _, b in large) / 1e6:.2f} |")  # fmt: skip
                print(f"| {label} | {name} | {r.rps:.1f} | {r.quantile(0.5) * 1e3:.0f} | {r.quantile(0.99) * 1e3:.0f} "
                      f"| {extra}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
