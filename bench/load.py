"""HTTP load helpers for the serving benchmarks: a server subprocess, closed-loop clients, quantiles."""

from __future__ import annotations

import argparse
import io
import math
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import httpx
from PIL import Image

from tuners.data.synth import photo


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def jpeg(name: str = "astronaut.png", quality: int = 90, size: tuple[int, int] | None = None) -> bytes:
    """A real photo from scikit-image, as the JPEG bytes a client would send; resized to ``size``
    (width, height) to stand for a phone camera's photo."""
    buf = io.BytesIO()
    image = Image.open(photo(name)).convert("RGB")
    image = image.resize(size, Image.BICUBIC) if size else image
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


class Server:
    """``python -m server.main`` on loopback in a subprocess; stopped on exit."""

    def __init__(self, store: Path, args: Sequence[str] = (), cwd: Path | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "server.main", "--store-dir", str(store.resolve()), "--port", str(self.port)]
        self.log = open(store.with_suffix(".log"), "w")  # noqa: SIM115  (closed in __exit__)
        self.process = subprocess.Popen(
            [*command, "--log-level", "warning", *args], stdout=self.log, stderr=self.log, cwd=cwd
        )

    def __enter__(self) -> Server:
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server-serve exited with {self.process.returncode}; see {self.log.name}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError("server-serve did not become ready in 300 s")

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


@dataclass
class LoadResult:
    requests: int
    seconds: float
    latencies: list[float]
    errors: int
    statuses: dict[int, int] = field(default_factory=dict)  # HTTP status -> responses (closed_loop)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    def quantile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)] if ordered else math.nan


def closed_loop(
    url: str, clients: int, seconds: float, request: Callable[[httpx.Client, random.Random], httpx.Response]
) -> LoadResult:
    """``clients`` threads, each sending its next request as soon as the last is answered, for ``seconds``."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def client(seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(base_url=url, timeout=60) as http:
            while time.perf_counter() < deadline:
                start = time.perf_counter()
                status = request(http, rng).status_code
                took = time.perf_counter() - start
                with lock:
                    latencies.append(took) if status == 200 else None
                    statuses[status] = statuses.get(status, 0) + 1

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    errors = sum(n for status, n in statuses.items() if status != 200)
    return LoadResult(len(latencies), time.perf_counter() - start, latencies, errors, statuses)


Request = Callable[[httpx.Client, random.Random], httpx.Response]
Kind = TypeVar("Kind")


def alternating(url: str, seconds: float, requests: dict[Kind, Request]) -> dict[Kind, LoadResult]:
    """One client sending ``requests`` in turn, one after another, for ``seconds``; each kind's own result.

    For a ratio of two kinds' latencies: taken in turn, the two see the same machine, where two
    loads one after the other see its speed drift between them. Each kind's ``seconds`` is the time
    spent on its own requests, so its ``rps`` is what a closed loop of one client would give.
    """
    latencies: dict[Kind, list[float]] = {name: [] for name in requests}
    errors = dict.fromkeys(requests, 0)
    rng, deadline = random.Random(0), time.perf_counter() + seconds
    with httpx.Client(base_url=url, timeout=60) as http:
        while time.perf_counter() < deadline:
            for name, request in requests.items():
                start = time.perf_counter()
                ok = request(http, rng).status_code == 200
                latencies[name].append(time.perf_counter() - start) if ok else None
                errors[name] += not ok
    return {name: LoadResult(len(t), sum(t), t, errors[name]) for name, t in latencies.items()}


def histogram_quantile(metrics: str, name: str, q: float) -> float:
    """Quantile ``q`` of Prometheus histogram ``name``, interpolated within its bucket as PromQL does."""
    buckets = []
    for line in metrics.splitlines():
        if line.startswith(f"{name}_bucket{{"):
            bound = line.split('le="')[1].split('"')[0]
            buckets.append((math.inf if bound == "+Inf" else float(bound), float(line.split()[-1])))
    total = buckets[-1][1] if buckets else 0.0
    if not total:
        return math.nan
    rank, lower, below = q * total, 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower
            return lower + (bound - lower) * (rank - below) / max(count - below, 1e-12)
        lower, below = bound, count
    return lower


def histogram_count(metrics: str, name: str) -> float:
    return next((float(line.split()[-1]) for line in metrics.splitlines() if line.startswith(f"{name}_count")), 0.0)


def ab_arguments(description: str, tasks: int, rounds: int, seconds: float) -> argparse.Namespace:
    """The options of a benchmark that loads this checkout's server and ``--compare-to``'s in turn."""
    return ab_parser(description, tasks, rounds, seconds).parse_args()


def ab_sides(args: argparse.Namespace) -> list[tuple[str, Path | None]]:
    """(label, checkout) of each server to load: this checkout's (``None``), then ``--compare-to``'s if given."""
    return [("this", None), *([(str(args.compare_to), args.compare_to)] if args.compare_to else [])]


def alternated(sides: list[tuple[str, Path | None]], rounds: int) -> Iterator[tuple[int, str, Path | None, Path]]:
    """(round, label, checkout, a fresh store folder name's stem) of each of :func:`ab_sides`'s sides in
    each round, the order flipping every round, so that neither side always runs on the warmer machine."""
    for i in range(rounds):
        for label, cwd in sides[:: 1 if i % 2 == 0 else -1]:
            yield i, label, cwd, Path(f"store-{i}-{label.replace('/', '_')}")


def ab_parser(description: str, tasks: int, rounds: int, seconds: float) -> argparse.ArgumentParser:
    """:func:`ab_arguments`'s parser, for a benchmark to add its own: ``--compare-to``, ``--tasks``,
    ``--rounds``, ``--seconds`` (per load) and ``--clients``."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compare-to", type=Path, help="another checkout (a git worktree) to load the same way")
    parser.add_argument("--tasks", type=int, default=tasks)
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--seconds", type=float, default=seconds)
    parser.add_argument("--clients", type=int, default=4)
    return parser
