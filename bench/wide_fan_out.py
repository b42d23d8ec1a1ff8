"""Wide fan-outs over more tasks than the device tier holds, from several clients at once.

A real ``server-serve`` (subprocess, loopback, real offline mobilenet_v2 at 320 px, default
settings: a 256 MiB device tier, which holds 47 untrained ``cst`` tasks with their compiled graphs)
holds ``--tasks`` (80) of them. ``--clients`` (4) clients each ask for ``--fan-out`` (32) tasks
drawn at random per request, in a closed loop, for ``--seconds`` (40). Two requests of 32 such
tasks do not fit the tier together, so requests must wait for each other's tasks to be released.
It prints the answers by HTTP status, req/s, the latency of the answered requests, and where the
server loaded task models from (its host tier or the store on disk).

``--compare-to DIR`` runs the same load against the server in another checkout (a git worktree
with its own ``.venv`` link), after this one's.

Run: ``.venv/bin/python -m bench.wide_fan_out`` (about 3 minutes on 2 cores; twice that with ``--compare-to``).
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import httpx

from bench.common import scratch
from bench.load import LoadResult, Server, closed_loop, histogram_count, jpeg
from bench.serve_load import make_tasks, upload
from models import PreprocessSpec, build_backbone


def load(store: Path, tasks: list[Path], args: argparse.Namespace, image: bytes, cwd: Path | None) -> dict:
    with Server(store, cwd=cwd) as server:
        for i, folder in enumerate(tasks):
            upload(server.url, f"t{i}", folder)

        def request(http: httpx.Client, rng: random.Random) -> httpx.Response:
            names = ",".join(f"t{i}" for i in rng.sample(range(len(tasks)), args.fan_out))
            headers = {"content-type": "image/jpeg"}
            return http.post("/v1/detect", params={"tasks": names}, content=image, headers=headers)

        result = closed_loop(server.url, args.clients, args.seconds, request)
        metrics = httpx.get(f"{server.url}/metrics", timeout=30).text
    return {
        "result": result,
        "from store": histogram_count(metrics, "sidecar_cold_load_seconds"),
        "from host tier": _counter(metrics, 'sidecar_tuner_cache_events_total{event="hit",tier="host"}'),
    }


def _counter(metrics: str, name: str) -> float:
    return next((float(line.split()[-1]) for line in metrics.splitlines() if line.startswith(name)), 0.0)


def report(name: str, run: dict) -> None:
    result: LoadResult = run["result"]
    statuses = ", ".join(f"{status}: {n}" for status, n in sorted(result.statuses.items()))
    print(
        f"| {name} | {statuses} | {result.rps:.2f} | {result.quantile(0.5) * 1e3:.0f} | "
        f"{result.quantile(0.99) * 1e3:.0f} | {run['from store']:.0f} | {run['from host tier']:.0f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=80)
    parser.add_argument("--fan-out", type=int, default=32, help="tasks per request")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=40.0)
    parser.add_argument("--compare-to", type=Path, default=None, help="another checkout whose server to load too")
    args = parser.parse_args()
    with scratch("sidecar-wide-") as work:
        backbone = build_backbone("mobilenet_v2", allow_download=False, preprocess=PreprocessSpec(size=320))
        tasks, image = make_tasks(backbone, args.tasks, "cst", work / "artifacts"), jpeg()
        checkouts = {"this checkout": (work / "store", None)}
        if args.compare_to is not None:
            checkouts[str(args.compare_to)] = (work / "store-old", args.compare_to)
        runs = {name: load(store, tasks, args, image, cwd) for name, (store, cwd) in checkouts.items()}
    print(
        f"\n{args.clients} clients, {args.fan_out} of {args.tasks} cst tasks per request, {args.seconds:g} s\n\n"
        "| server | answers by status | req/s answered | p50 ms | p99 ms | loads: from the store | from the host |\n"
        "|---|---|---|---|---|---|---|"
    )
    for name, run in runs.items():
        report(name, run)


if __name__ == "__main__":
    main()
