"""Large uploads: the server's memory while they are validated, and detect requests' latency meanwhile.

One large valid artifact (an untrained ``lora`` task with ``--rank``, 283 MB at the default 4000) is
uploaded to a fresh server of each checkout: once alone, then ``--together`` copies at once under
other task ids. A thread samples the server's resident memory every 20 ms, and each upload's peak
is printed above the memory the server held before it. A published task stays resident (the
cache's host tier holds 1 GiB), so the peak of uploads together includes the tasks published
before the last one. Then one ``cst`` task serves a closed loop of ``--clients`` clients for
``--seconds``, quiet and then while another process uploads the large artifact again and again,
and the requests' p50 and p99 are printed for both. The checkouts alternate over ``--rounds``, the
order flipping every round.

Run: ``.venv/bin/python -m bench.uploads --compare-to /path/to/old-worktree``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.sharedctypes import Synchronized
from multiprocessing.synchronize import Event
from pathlib import Path

import httpx
import torch

from bench.common import scratch
from bench.load import Server, ab_parser, ab_sides, alternated, closed_loop, jpeg, peak_rss_growth
from bench.serve_load import detect, make_tasks, upload, warm
from models import PreprocessSpec, build_backbone
from tuners import build_task_model
from tuners.artifact import save_artifact

MiB = 1 << 20


def keep_uploading(url: str, folder: Path, stop: Event, count: Synchronized) -> None:
    """Uploads ``folder`` as task ``big`` again and again until ``stop``; counts the uploads."""
    while not stop.is_set():
        upload(url, "big", folder)
        count.value += 1


def one_round(store: Path, cwd: Path | None, big: Path, small: Path, image: bytes, args: argparse.Namespace) -> list:
    """[peak MiB of one upload, of ``--together`` at once, quiet p50, p99, uploading p50, p99 ms, uploads]."""
    with Server(store, cwd=cwd) as server:
        pid = server.process.pid
        alone = peak_rss_growth(pid, lambda: upload(server.url, "big", big))
        with ThreadPoolExecutor(args.together) as pool:
            names = [f"big{i}" for i in range(args.together)]
            together = peak_rss_growth(pid, lambda: list(pool.map(lambda n: upload(server.url, n, big), names)))
        for name in ["big", *names]:  # lora tasks never compile: warm() would wait for them
            httpx.delete(f"{server.url}/v1/tasks/{name}", timeout=60).raise_for_status()
        upload(server.url, "t0", small)
        warm(server.url, ["t0"], image)
        quiet = closed_loop(server.url, args.clients, args.seconds, detect(["t0"], image))
        stop, count = multiprocessing.Event(), multiprocessing.Value("i", 0)
        uploader = multiprocessing.Process(target=keep_uploading, args=(server.url, big, stop, count))
        uploader.start()  # a process of its own: in this one, it would take the clients' GIL
        busy = closed_loop(server.url, args.clients, args.seconds, detect(["t0"], image))
        stop.set()
        uploader.join()
        httpx.get(f"{server.url}/healthz", timeout=30).raise_for_status()
    return [alone, together, *(r.quantile(q) * 1e3 for r in (quiet, busy) for q in (0.5, 0.99)), count.value]


def main() -> None:
    parser = ab_parser(__doc__, tasks=1, rounds=2, seconds=20.0)
    parser.set_defaults(clients=2)
    parser.add_argument("--rank", type=int, default=4000, help="the large lora task's rank (its size)")
    parser.add_argument("--together", type=int, default=4, help="uploads sent at once")
    args = parser.parse_args()
    torch.set_num_threads(2)
    sides = ab_sides(args)
    rows: dict[str, list[list[float]]] = {label: [] for label, _ in sides}
    with scratch("sidecar-uploads-") as work:
        backbone = build_backbone("mobilenet_v2", allow_download=False, preprocess=PreprocessSpec(size=320))
        big = save_artifact(build_task_model("lora", {"rank": args.rank}, backbone, ["a"]), backbone, work / "big")
        small, image = make_tasks(backbone, 1, "cst", work / "artifacts")[0], jpeg()
        del backbone
        size = sum(f.stat().st_size for f in big.iterdir()) / MiB
        print(f"lora rank {args.rank}: {size:.0f} MiB; {args.together} together; detect at C={args.clients}")
        print(f"| round | checkout | one upload, peak MiB | {args.together} at once | quiet p50 ms | p99 | "
              "uploading p50 ms | p99 | uploads |\n|---|---|---|---|---|---|---|---|---|")  # fmt: skip
        for i, label, cwd, store in alternated(sides, args.rounds):
            row = one_round(work / store, cwd, big, small, image, args)
            rows[label].append(row)
            print(f"| {i} | {label} | " + " | ".join(f"{x:.0f}" for x in row) + " |")
    for label, found in rows.items():
        medians = " | ".join(f"{statistics.median(column):.0f}" for column in zip(*found))
        print(f"{label}: medians over {len(found)} rounds: | {medians} |")


if __name__ == "__main__":
    main()
