"""Reading a large store's state while the server is under load, this checkout against another.

A store of ``--tasks`` ``linear_probe`` tasks (one artifact published under every id), of which
``--resident`` are made resident by a request each (so each has a latency histogram in
``/metrics``). Then, on one server, C clients ask one task in a closed loop, in slices of
``--seconds``: alone; with another client listing every task (``GET /v1/tasks``) once a second,
as a console or a deployment script does; and with another reading ``/metrics`` once a second, as
Prometheus does (every 15 s by default). The loads take turns, the order turning every round.
Printed per checkout and load: req/s, p50 and p99 of the detect requests, and the reads' median time.
``--this-args`` gives this checkout's server flags (``--no-task-latency-histograms``).

Run: ``.venv/bin/python -m bench.listing --compare-to /path/to/old-worktree``.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import httpx
import torch

from bench.common import scratch
from bench.load import KeepAlive, LoadResult, Server, ab_parser, ab_sides, beside, closed_loop, jpeg
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


def probe_store(work: Path, tasks: int) -> list[str]:
    """One untrained ``linear_probe`` artifact on the real offline mobilenet_v2 at 320 px, published
    as ``tasks`` tasks into ``work / "store"`` (:func:`fill`); their ids."""
    backbone = build_backbone("mobilenet_v2", allow_download=False, preprocess=PreprocessSpec(size=320))
    return fill(work / "store", make_tasks(backbone, 1, "linear_probe", work / "artifacts")[0], tasks)


READS = {"alone": None, "listing each second": "/v1/tasks", "metrics each second": "/metrics"}


def read_beside(
    url: str, path: str, load: Callable[[], LoadResult], every: float = 1.0
) -> tuple[LoadResult, list[float]]:
    """``load()``'s result while another client gets ``path`` each ``every`` s; those reads' seconds."""
    times: list[float] = []

    def reader(stop: threading.Event) -> None:
        with httpx.Client(timeout=120) as client:
            while not stop.is_set():
                start = time.perf_counter()
                client.get(f"{url}{path}").raise_for_status()
                times.append(time.perf_counter() - start)
                stop.wait(every)

    return beside(load, reader), times


def side(store: Path, cwd: Path | None, ids: list[str], image: bytes, args: argparse.Namespace) -> dict:
    """{"loads": {load: merged detect result}, "reads": {load: seconds of its reads}} over the rounds,
    on one server of checkout ``cwd``."""
    results: dict[str, list[LoadResult]] = defaultdict(list)
    reads: dict[str, list[float]] = defaultdict(list)
    with Server(store, shlex.split(args.this_args) if cwd is None else [], cwd=cwd) as server:
        with KeepAlive(server.url, timeout=120) as http:
            for task_id in ids[: args.resident]:
                if detect([task_id], image)(http, None).status_code != 200:
                    raise RuntimeError(f"warming {task_id} failed")
        load = lambda: closed_loop(server.url, args.clients, args.seconds, detect(ids[:1], image))  # noqa: E731
        names = list(READS)
        for i in range(args.rounds):
            for name in names[i % len(names) :] + names[: i % len(names)]:
                if READS[name] is None:
                    results[name].append(load())
                else:
                    result, times = read_beside(server.url, READS[name], load)
                    results[name].append(result)
                    reads[name] += times
    return {"loads": {name: merged(runs) for name, runs in results.items()}, "reads": reads}


def main() -> None:
    parser = ab_parser(__doc__, tasks=2000, rounds=3, seconds=10.0)
    parser.add_argument("--resident", type=int, default=1000, help="tasks made resident before the loads")
    parser.add_argument("--this-args", default="", help="server flags of this checkout's side")
    args = parser.parse_args()
    torch.set_num_threads(2)
    with scratch("sidecar-listing-") as work:
        ids, image = probe_store(work, args.tasks), jpeg()
        print(f"| checkout | load, C={args.clients} | req/s | p50 ms | p99 ms | errors | read s (median) |")
        print("|---|---|---|---|---|---|---|")
        for label, cwd in ab_sides(args):
            found = side(work / "store", cwd, ids, image, args)
            for name, r in found["loads"].items():
                read = f"{statistics.median(found['reads'][name]):.2f}" if found["reads"][name] else ""
                print(f"| {label} | {name} | {r.rps:.1f} | {r.quantile(0.5) * 1e3:.0f} | {r.quantile(0.99) * 1e3:.0f} "
                      f"| {r.errors} | {read} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
