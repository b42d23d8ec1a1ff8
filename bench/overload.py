"""Overload: requests arriving faster than the server answers them, this checkout against another.

A server with one ``cst`` task and a short queue (``--max-queue``, default 8) first gets 4 clients
in a closed loop: its capacity, with nothing turned away. Then requests arrive in an open loop at
``--overload`` (default 2) times that rate, each sent on time whether or not the last was
answered, as many independent users send them. The queue fills and the rest are turned away
(503); what matters is how much the server still answers, and what each refusal costs it.

Each round starts a fresh server of each checkout in turn (the order flips every round) and
measures on it: capacity (req/s, C=4); under overload, answered (200) and refused (503) requests
per second, the answered ones' p50 and p99, and the server process's CPU time (``/proc``) per
request, refused or not; answered under overload / capacity.

Run: ``.venv/bin/python -m bench.overload --compare-to /path/to/old-worktree``.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path
from urllib.parse import urlencode, urlsplit

import torch

from bench.common import scratch
from bench.load import (
    LoadResult,
    Server,
    ab_parser,
    ab_sides,
    alternated,
    closed_loop,
    cpu_seconds,
    framing,
    jpeg,
    request_bytes,
)
from bench.serve_load import PHONE, POST, detect, make_tasks, upload, warm
from models import PreprocessSpec, build_backbone

COLUMNS = ["capacity req/s, C=4", "answered/s", "refused/s", "answered p50 ms", "p99 ms", "server CPU ms per request",
           "answered / capacity"]  # fmt: skip


class Connections:
    """Keep-alive HTTP/1.1 connections to ``host:port`` that send one prepared request each: a client
    far cheaper than httpx, so that at a few hundred requests per second the load generator, which
    shares the machine's cores with the server, does not fall behind its own schedule."""

    def __init__(self, url: str, path: str, body: bytes, content_type: str) -> None:
        address = urlsplit(url)
        self.host, self.port = address.hostname or "127.0.0.1", address.port or 80
        self.request = request_bytes("POST", path, address.netloc, body, {"content-type": content_type})
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def send(self) -> int:
        """Sends the request on an idle connection (else a new one); its response's status."""
        reader, writer = self.idle.pop() if self.idle else await asyncio.open_connection(self.host, self.port)
        writer.write(self.request)
        status = int((await reader.readline()).split()[1])
        lines = []
        while (line := await reader.readline()) not in (b"\r\n", b""):
            lines.append(line)
        length, chunked, close = framing(lines)
        if chunked:
            raise RuntimeError("a chunked response: this client reads only bodies with a Content-Length")
        await reader.readexactly(length)
        if close:
            writer.close()
        else:
            self.idle.append((reader, writer))
        return status


def open_loop(url: str, rate: float, seconds: float, image: bytes) -> LoadResult:
    """``rate`` detect requests per second (task ``t``) for ``seconds``, each sent on time whatever
    the others' state; the answered ones' latencies, and every status."""
    path = "/v1/detect?" + urlencode({**POST, "tasks": "t"})
    latencies: list[float] = []
    statuses: dict[int, int] = {}

    async def one(connections: Connections) -> None:
        start = time.perf_counter()
        status = await connections.send()
        statuses[status] = statuses.get(status, 0) + 1
        if status == 200:
            latencies.append(time.perf_counter() - start)

    async def run() -> float:
        connections = Connections(url, path, image, "image/jpeg")
        start, sent = time.perf_counter(), []
        for i in range(int(rate * seconds)):
            await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
            sent.append(asyncio.create_task(one(connections)))
        await asyncio.gather(*sent)
        for _, writer in connections.idle:
            writer.close()
        return time.perf_counter() - start

    took = asyncio.run(run())
    errors = sum(n for status, n in statuses.items() if status != 200)
    return LoadResult(len(latencies), took, latencies, errors, statuses)


def one_round(store: Path, cwd: Path | None, task: Path, image: bytes, overload: float, seconds: float,
              max_queue: int) -> list[float]:  # fmt: skip
    """The figures of :data:`COLUMNS` for one fresh server of the checkout at ``cwd`` (None: this one)."""
    with Server(store, ["--max-queue", str(max_queue)], cwd=cwd) as server:
        upload(server.url, "t", task)
        warm(server.url, ["t"], image)
        capacity = closed_loop(server.url, 4, seconds / 2, detect(["t"], image))
        before = cpu_seconds(server.process.pid)
        loaded = open_loop(server.url, overload * capacity.rps, seconds, image)
        spent = cpu_seconds(server.process.pid) - before
    sent = sum(loaded.statuses.values())
    refused = loaded.statuses.get(503, 0)
    if sent - refused != loaded.requests:
        raise RuntimeError(f"answers other than 200 and 503 under overload: {loaded.statuses}")
    quantiles = [loaded.quantile(q) * 1e3 for q in (0.5, 0.99)]
    answered = loaded.rps
    return [capacity.rps, answered, refused / loaded.seconds, *quantiles, spent / sent * 1e3, answered / capacity.rps]


def main() -> None:
    parser = ab_parser(__doc__, tasks=1, rounds=4, seconds=10.0)
    parser.add_argument("--max-queue", type=int, default=8, help="the servers' --max-queue")
    parser.add_argument("--overload", type=float, default=2.0, help="arrival rate, in multiples of capacity")
    parser.add_argument("--phone", action="store_true", help="send the photo at 4032 x 3024 (12 MP), not 512 x 512")
    args = parser.parse_args()
    torch.set_num_threads(2)
    sides = ab_sides(args)
    rows: dict[str, list[list[float]]] = {label: [] for label, _ in sides}
    with scratch("sidecar-overload-") as work:
        backbone = build_backbone("mobilenet_v2", allow_download=False, preprocess=PreprocessSpec(size=320))
        task, image = make_tasks(backbone, 1, "cst", work / "artifacts")[0], jpeg(size=PHONE if args.phone else None)
        del backbone
        print(f"arrivals at {args.overload:g} x capacity, --max-queue {args.max_queue}, {args.seconds:g} s each")
        print(f"| round | checkout | {' | '.join(COLUMNS)} |")
        print("|---|---|" + "---|" * len(COLUMNS))
        for i, label, cwd, store in alternated(sides, args.rounds):
            row = one_round(work / store, cwd, task, image, args.overload, args.seconds, args.max_queue)
            rows[label].append(row)
            print(f"| {i} | {label} | " + " | ".join(f"{v:.2f}" if v < 10 else f"{v:.1f}" for v in row) + " |")
    for label, found in rows.items():
        medians = ", ".join(f"{name} {statistics.median(c):.2f}" for name, c in zip(COLUMNS, zip(*found)))
        print(f"{label}: medians over {len(found)} rounds: {medians}")


if __name__ == "__main__":
    main()
