"""N ``cst`` tasks requested uniformly against one task, at C clients, in short alternated slices.

``bench.serve_load`` loads one task and then N tasks, each for ``--seconds``, so the machine's drift
between the two loads enters their ratio. Here one server (of this checkout, and then of
``--compare-to``'s) serves slices of ``--seconds`` of each load in turn, flipping the order every
round, and the ratio is taken over the summed slices. The server's CPU seconds per request (from
``/proc``) and the tuner cache's moves between tiers are printed beside each load.

Run: ``.venv/bin/python -m bench.many_tasks --compare-to /path/to/old-worktree``.
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict
from pathlib import Path

import httpx
import torch

from bench.common import scratch
from bench.load import Request, Server, ab_arguments, ab_sides, closed_loop, cpu_seconds, jpeg
from bench.serve_load import detect, make_tasks, uniform, upload, warm
from models import PreprocessSpec, build_backbone


def promotions(url: str) -> float:
    """Host-tier hits so far: entries moved back to the device tier."""
    metrics = httpx.get(f"{url}/metrics").text
    found = re.search(r'sidecar_tuner_cache_events_total\{event="hit",tier="host"\} (\S+)', metrics)
    return float(found[1]) if found else 0.0


def side(store: Path, cwd: Path | None, tasks: list[Path], image: bytes, args: argparse.Namespace) -> dict:
    """{load: [requests, seconds, server CPU seconds, promotions]} over the rounds, on one fresh server."""
    ids = [f"t{i}" for i in range(len(tasks))]
    loads: dict[str, Request] = {"one task": detect(ids[:1], image), f"{len(ids)} tasks": uniform(ids, image)}
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0, 0.0])
    with Server(store, cwd=cwd) as server:
        for task_id, task in zip(ids, tasks):
            upload(server.url, task_id, task)
        warm(server.url, ids, image)
        for i in range(args.rounds):
            for name, request in list(loads.items())[:: 1 if i % 2 == 0 else -1]:
                cpu, moved = cpu_seconds(server.process.pid), promotions(server.url)
                result = closed_loop(server.url, args.clients, args.seconds, request)
                cpu, moved = cpu_seconds(server.process.pid) - cpu, promotions(server.url) - moved
                totals[name] = [a + b for a, b in zip(totals[name], (result.requests, result.seconds, cpu, moved))]
    return dict(totals)


def main() -> None:
    args = ab_arguments(__doc__, tasks=100, rounds=6, seconds=5.0)
    torch.set_num_threads(2)
    with scratch("sidecar-many-") as work:
        backbone = build_backbone("mobilenet_v2", allow_download=False, preprocess=PreprocessSpec(size=320))
        tasks, image = make_tasks(backbone, args.tasks, "cst", work / "artifacts"), jpeg()
        del backbone
        print(f"| checkout | load, C={args.clients} | req/s | server CPU ms / request | tier moves / s |")
        print("|---|---|---|---|---|")
        for label, cwd in ab_sides(args):
            totals = side(work / f"store-{label.replace('/', '_')}", cwd, tasks, image, args)
            for name, (requests, seconds, cpu, moved) in totals.items():
                rate, per = requests / seconds, cpu / requests * 1e3
                print(f"| {label} | {name} | {rate:.1f} | {per:.1f} | {moved / seconds:.1f} |")
            (one, s1, _, _), (many, s2, _, _) = totals.values()
            ratio = (many / s2) / (one / s1)
            print(f"| {label} | {args.tasks} tasks / one task, req/s | {ratio:.3f} | | |", flush=True)


if __name__ == "__main__":
    main()
