"""Two checkouts' servers (or two settings of one), alternated round by round: one task at C clients,
C=1 latency, and fan-out.

``bench.serve_load --compare-to`` loads one checkout's server for minutes and then the other's,
so on a machine whose speed drifts the two are measured at different speeds. Here each round
starts a fresh server of each checkout in turn (the order flips every round), loads it for
``--seconds`` with one ``cst`` task at C=clients and then at C=1, then sends K=1 and K=8 ``cst``
requests in turn (``bench.load.alternating``) for ``--seconds``; the ratios of the two checkouts'
req/s and of their fan-out (p50 at K=8 over K=1) are taken within the round. The backbone alone
(ORT, batch 8) is measured at the start of each round, for scale.

Run: ``.venv/bin/python -m bench.ab_throughput /path/to/old-worktree --rounds 4``; or, for two settings of
this checkout, ``.venv/bin/python -m bench.ab_throughput --other-args="--concurrent-batches 1"``.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
from pathlib import Path

import torch

from bench.common import scratch
from bench.load import Server, alternating, closed_loop, jpeg
from bench.serve_load import BackboneAlone, detect, make_tasks, upload, warm
from models import PreprocessSpec, build_backbone


def load(
    store: Path, side: tuple[Path | None, list[str]], tasks: list[Path], image: bytes, clients: int, seconds: float
) -> tuple[float, float, float]:
    """(req/s at C=clients, p50 ms at C=1, fan-out 8/1) of one fresh server of ``side``: the checkout at a
    path (None: this one), and its server's flags."""
    ids = [f"t{i}" for i in range(len(tasks))]
    cwd, flags = side
    with Server(store, flags, cwd=cwd) as server:
        for task_id, task in zip(ids, tasks):
            upload(server.url, task_id, task)
        warm(server.url, ids, image)
        closed_loop(server.url, clients, 2, detect(ids[:1], image))  # warm-up, not counted
        loaded = closed_loop(server.url, clients, seconds, detect(ids[:1], image))
        alone = closed_loop(server.url, 1, seconds / 2, detect(ids[:1], image))
        fan = alternating(server.url, seconds, {k: detect(ids[:k], image) for k in (1, 8)})
    return loaded.rps, alone.quantile(0.5) * 1e3, fan[8].quantile(0.5) / fan[1].quantile(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("other", type=Path, nargs="?", help="the other checkout (a git worktree); default: this one")
    parser.add_argument("--other-args", default="", help="server flags of the other side")
    parser.add_argument("--this-args", default="", help="server flags of this side")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(2)
    sides = {"other": (args.other, shlex.split(args.other_args)), "this": (None, shlex.split(args.this_args))}
    ratios, fan_ratios = [], []
    with scratch("sidecar-ab-") as work:
        backbone = build_backbone("mobilenet_v2", allow_download=False, preprocess=PreprocessSpec(size=320))
        tasks, image = make_tasks(backbone, 8, "cst", work / "artifacts"), jpeg()
        alone = BackboneAlone(backbone, work / "onnx")
        print(f"| round | backbone alone, images/s | checkout | req/s, C={args.clients} | p50 ms, C=1 | fan-out 8/1 |")
        print("|---|---|---|---|---|---|")
        for i in range(args.rounds):
            ips8 = alone.measure()[1]
            order = list(sides.items()) if i % 2 == 0 else list(reversed(sides.items()))
            rps, fan = {}, {}
            for name, side in order:
                rps[name], p50, fan[name] = load(
                    work / f"s-{name}-{i}", side, tasks, image, args.clients, args.seconds
                )
                label = " ".join(["this" if side[0] is None else str(side[0]), *side[1]])
                print(f"| {i} | {ips8:.1f} | {label} | {rps[name]:.1f} | {p50:.1f} | {fan[name]:.2f} |", flush=True)
            ratios.append(rps["this"] / rps["other"])
            fan_ratios.append(fan["this"] / fan["other"])
    for what, values in ((f"req/s at C={args.clients}", ratios), ("fan-out 8/1", fan_ratios)):
        each = ", ".join(f"{r:.3f}" for r in values)
        print(f"this / other, {what}, per round: {each}; median {statistics.median(values):.3f}")


if __name__ == "__main__":
    main()
