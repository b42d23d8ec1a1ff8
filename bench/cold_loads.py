"""Cold loads under load, this checkout against another, alternated.

The setting of ``bench.serve_load``'s cold-load row: ``--tasks`` ``cst`` tasks on a server whose
device tier holds 4 of them (no host tier), requested uniformly at random by C clients, so most
requests load their task from the store while the other clients' requests run. Each round starts
a fresh server of each checkout in turn, flipping the order every round, and prints the requests
per second, the client's p99, and the server's cold-load histogram (p50, p99, count).

The tasks are uploaded to the measured server, which verifies each version in full at upload, so
its loads are reloads. With ``--restart`` they are uploaded to a first server, which then stops,
and the measured server starts on that store: each task's first load is then its first after a
start, and checks its sha256 and looks for NaN or Inf as well.

Run: ``.venv/bin/python -m bench.cold_loads --compare-to /path/to/old-worktree``.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import httpx
import torch

from bench.common import scratch
from bench.load import Server, ab_parser, ab_sides, alternated, closed_loop, histogram_count, histogram_quantile, jpeg
from bench.serve_load import make_tasks, uniform, upload
from models import PreprocessSpec, build_backbone
from tuners.artifact import WEIGHTS

METRIC = "sidecar_cold_load_seconds"


def one_round(store: Path, cwd: Path | None, tasks: list[Path], image: bytes, args: argparse.Namespace) -> list[float]:
    """[req/s, request p99 ms, cold-load p50 ms, cold-load p99 ms, cold loads] of one fresh server."""
    ids = [f"t{i}" for i in range(len(tasks))]
    flags = ["--device-cache-bytes", str(4 * 2 * (tasks[0] / WEIGHTS).stat().st_size), "--host-cache-bytes", "0"]
    if args.restart:
        with Server(store, flags, cwd=cwd) as server:
            for task_id, folder in zip(ids, tasks):
                upload(server.url, task_id, folder)
    with Server(store, flags, cwd=cwd) as server:
        for task_id, folder in zip(ids, tasks) if not args.restart else ():
            upload(server.url, task_id, folder)
        result = closed_loop(server.url, args.clients, args.seconds, uniform(ids, image))
        metrics = httpx.get(f"{server.url}/metrics").text
    p50, p99 = (histogram_quantile(metrics, METRIC, q) * 1e3 for q in (0.5, 0.99))
    return [result.rps, result.quantile(0.99) * 1e3, p50, p99, histogram_count(metrics, METRIC)]


def main() -> None:
    parser = ab_parser(__doc__, tasks=20, rounds=4, seconds=10.0)
    parser.add_argument("--restart", action="store_true", help="measure a server started on a store it did not fill")
    args = parser.parse_args()
    torch.set_num_threads(2)
    sides = ab_sides(args)
    rows: dict[str, list[list[float]]] = {label: [] for label, _ in sides}
    with scratch("sidecar-cold-") as work:
        backbone = build_backbone("mobilenet_v2", allow_download=False, preprocess=PreprocessSpec(size=320))
        tasks, image = make_tasks(backbone, args.tasks, "cst", work / "artifacts"), jpeg()
        del backbone
        print(f"| round | checkout | req/s, C={args.clients} | request p99 ms | cold load p50 ms | p99 ms | loads |")
        print("|---|---|---|---|---|---|---|")
        for i, label, cwd, store in alternated(sides, args.rounds):
            row = one_round(work / store, cwd, tasks, image, args)
            rows[label].append(row)
            print(f"| {i} | {label} | {row[0]:.1f} | {row[1]:.0f} | {row[2]:.1f} | {row[3]:.1f} | {row[4]:.0f} |")
    for label, found in rows.items():
        medians = [statistics.median(column) for column in zip(*found)]
        print(f"{label}: medians over {len(found)} rounds: {medians[0]:.1f} req/s, request p99 {medians[1]:.0f} ms, "
              f"cold load p50 {medians[2]:.1f} ms, p99 {medians[3]:.1f} ms")  # fmt: skip


if __name__ == "__main__":
    main()
