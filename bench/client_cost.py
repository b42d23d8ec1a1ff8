"""What the load generator's client costs the server it measures: httpx against ``bench.load.KeepAlive``.

The serving benchmarks run their clients on the machine that runs the server (two cores here), so
a client's own CPU time is taken from the server. One server with one untrained ``cst`` task (real
mobilenet_v2 at 320 px, the astronaut JPEG) gets a closed loop of ``--clients`` (4) through each
client in turn, the order flipping every round; each load prints req/s and the CPU cores the
client and the server took (``/proc``), and the end the median ratio, KeepAlive / httpx.

Run: ``.venv/bin/python -m bench.client_cost``.
"""

from __future__ import annotations

import argparse
import os
import statistics
from collections.abc import Callable
from typing import Any

import httpx
import torch

from bench.common import scratch
from bench.load import KeepAlive, Server, closed_loop, cpu_seconds, jpeg
from bench.serve_load import detect, make_tasks, upload, warm
from models import PreprocessSpec, build_backbone

CLIENTS: dict[str, Callable[[str], Any]] = {
    "httpx": lambda url: httpx.Client(base_url=url, timeout=60),
    "KeepAlive": KeepAlive,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(2)
    with scratch("sidecar-client-cost-") as work:
        backbone = build_backbone("mobilenet_v2", allow_download=False, preprocess=PreprocessSpec(size=320))
        task, image = make_tasks(backbone, 1, "cst", work / "artifacts")[0], jpeg()
        rps: dict[str, list[float]] = {name: [] for name in CLIENTS}
        with Server(work / "store") as server:
            upload(server.url, "t", task)
            warm(server.url, ["t"], image)
            print("| round | client | req/s | client cores | server cores |\n|---|---|---|---|---|")
            for i in range(args.rounds):
                for name in list(CLIENTS)[:: 1 if i % 2 == 0 else -1]:
                    before = cpu_seconds(os.getpid()), cpu_seconds(server.process.pid)
                    result = closed_loop(server.url, args.clients, args.seconds, detect(["t"], image), CLIENTS[name])
                    mine, theirs = ((cpu_seconds(p) - b) / result.seconds
                                    for p, b in zip((os.getpid(), server.process.pid), before))  # fmt: skip
                    rps[name].append(result.rps)
                    print(f"| {i} | {name} | {result.rps:.1f} | {mine:.3f} | {theirs:.2f} |", flush=True)
    ratios = [a / b for a, b in zip(rps["KeepAlive"], rps["httpx"])]
    print(f"\nKeepAlive / httpx, req/s per round: {', '.join(f'{r:.3f}' for r in ratios)} "
          f"(median {statistics.median(ratios):.3f})")  # fmt: skip


if __name__ == "__main__":
    main()
