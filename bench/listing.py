"""Listing a large store while the server is under load, this checkout against another.

A store of ``--tasks`` ``linear_probe`` tasks (one artifact published under every id), of which
``--resident`` are made resident by a request each. Then, on one server, C clients ask one task in a
closed loop, in slices of ``--seconds``: alone, and with another client listing every task
(``GET /v1/tasks``) once a second, as a console or a deployment script does, in turn, the order
flipping every round. Printed per checkout and load: req/s, p50 and p99 of the detect requests,
and the listing's median time.

Run: ``.venv/bin/python -m bench.listing --compare-to /path/to/old-worktree``.
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
from bench.load import KeepAlive, LoadResult, Server, ab_parser, ab_sides, closed_loop, jpeg
from bench.serve_load import detect, make_tasks, merged
from models import PreprocessSpec, build_backbone
from server.store import TaskStore
from tuners.artifact import MANIFEST, WEIGHTS


def fill(store: Path, artifact: Path, tasks: int) -> list[str]:
    """Publishes ``artifact`` as tasks ``t0`` to ``t{tasks - 1}`` straight into the store; their ids."""
    weights, manifest = (artifact / WEIGHTS).read_bytes(), (artifact / MANIFEST).read_bytes()
    writer, ids = TaskStore(store), [f"t{i}" for i in range(tasks)]
    for task_id in ids:
        writer.publish(task_id, weights, manifest, lambda _: None)
    return ids


def listing_beside(url: str, load: Callable[[], LoadResult], every: float = 1.0) -> tuple[LoadResult, list[float]]:
    """``load()``'s result while another client lists every task each ``every`` s; the listings' seconds."""
    times: list[float] = []
    stop = threading.Event()

    def lister() -> None:
        with httpx.Client(timeout=120) as client:
            while not stop.is_set():
                start = time.perf_counter()
                client.get(f"{url}/v1/tasks").raise_for_status()
                times.append(time.perf_counter() - start)
                stop.wait(every)

    thread = threading.Thread(target=lister)
    thread.start()
    try:
        return load(), times
    finally:
        stop.set()
        thread.join()


def side(store: Path, cwd: Path | None, ids: list[str], image: bytes, args: argparse.Namespace) -> dict:
    """{load: (merged detect result, listing seconds)} over the rounds, on one server of checkout ``cwd``."""
    results: dict[str, list[LoadResult]] = defaultdict(list)
    listings: list[float] = []
    with Server(store, cwd=cwd) as server:
        with KeepAlive(server.url, timeout=120) as http:
            for task_id in ids[: args.resident]:
                if detect([task_id], image)(http, None).status_code != 200:
                    raise RuntimeError(f"warming {task_id} failed")
        one = detect(ids[:1], image)
        for i in range(args.rounds):
            for name in ("alone", "listing each second")[:: 1 if i % 2 == 0 else -1]:
                if name == "alone":
                    results[name].append(closed_loop(server.url, args.clients, args.seconds, one))
                else:
                    load = lambda: closed_loop(server.url, args.clients, args.seconds, one)  # noqa: E731
                    result, times = listing_beside(server.url, load)
                    results[name].append(result)
                    listings += times
    return {"loads": {name: merged(runs) for name, runs in results.items()}, "listing": listings}


def main() -> None:
    parser = ab_parser(__doc__, tasks=2000, rounds=2, seconds=10.0)
    parser.add_argument("--resident", type=int, default=1000, help="tasks made resident before the loads")
    args = parser.parse_args()
    torch.set_num_threads(2)
    with scratch("sidecar-listing-") as work:
        backbone = build_backbone("mobilenet_v2", allow_download=False, preprocess=PreprocessSpec(size=320))
        artifact, image = make_tasks(backbone, 1, "linear_probe", work / "artifacts")[0], jpeg()
        del backbone
        ids = fill(work / "store", artifact, args.tasks)
        print(f"| checkout | load, C={args.clients} | req/s | p50 ms | p99 ms | errors | listing s (median) |")
        print("|---|---|---|---|---|---|---|")
        for label, cwd in ab_sides(args):
            found = side(work / "store", cwd, ids, image, args)
            for name, r in found["loads"].items():
                listing = f"{statistics.median(found['listing']):.2f}" if name != "alone" else ""
                print(f"| {label} | {name} | {r.rps:.1f} | {r.quantile(0.5) * 1e3:.0f} | {r.quantile(0.99) * 1e3:.0f} "
                      f"| {r.errors} | {listing} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
