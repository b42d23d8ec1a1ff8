"""Two checkouts' servers, alternated round by round: one task at C clients, and C=1 latency.

``bench.serve_load --compare-to`` loads one checkout's server for minutes and then the other's,
so on a machine whose speed drifts the two are measured at different speeds. Here each round
starts a fresh server of each checkout in turn (the order flips every round), loads it for
``--seconds`` with one ``cst`` task at C=clients and then at C=1, and the ratio of the two
checkouts' req/s is taken within the round. The backbone alone (ORT, batch 8) is measured at the
start of each round, for scale.

Run: ``.venv/bin/python -m bench.ab_throughput /path/to/old-worktree --rounds 4``
(about 50 s a round on 2 cores).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from bench.common import scratch
from bench.load import Server, closed_loop, jpeg
from bench.serve_load import BackboneAlone, detect, make_tasks, upload, warm
from models import PreprocessSpec, build_backbone


def load(store: Path, cwd: Path | None, task: Path, image: bytes, clients: int, seconds: float) -> tuple[float, float]:
    """(req/s at C=clients, p50 ms at C=1) of one fresh server of the checkout at ``cwd``."""
    with Server(store, cwd=cwd) as server:
        upload(server.url, "t0", task)
        warm(server.url, ["t0"], image)
        closed_loop(server.url, clients, 2, detect(["t0"], image))  # warm-up, not counted
        loaded = closed_loop(server.url, clients, seconds, detect(["t0"], image))
        alone = closed_loop(server.url, 1, seconds / 2, detect(["t0"], image))
    return loaded.rps, alone.quantile(0.5) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("other", type=Path, help="the other checkout (a git worktree of an older commit)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(2)
    checkouts = {"other": args.other, "this": None}
    ratios = []
    with scratch("sidecar-ab-") as work:
        backbone = build_backbone("mobilenet_v2", allow_download=False, preprocess=PreprocessSpec(size=320))
        task, image = make_tasks(backbone, 1, "cst", work / "artifacts")[0], jpeg()
        alone = BackboneAlone(backbone, work / "onnx")
        print(f"| round | backbone alone, images/s | checkout | req/s, C={args.clients} | p50 ms, C=1 |")
        print("|---|---|---|---|---|")
        for i in range(args.rounds):
            ips8 = alone.measure()[1]
            order = list(checkouts.items()) if i % 2 == 0 else list(reversed(checkouts.items()))
            rps = {}
            for name, cwd in order:
                rps[name], p50 = load(work / f"store-{name}-{i}", cwd, task, image, args.clients, args.seconds)
                label = "this" if cwd is None else str(cwd)
                print(f"| {i} | {ips8:.1f} | {label} | {rps[name]:.1f} | {p50:.1f} |", flush=True)
            ratios.append(rps["this"] / rps["other"])
    each = ", ".join(f"{r:.3f}" for r in ratios)
    print(f"\nthis / other, req/s at C={args.clients}, per round: {each}; median {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
