"""HTTP load helpers for the serving benchmarks: a server subprocess, closed-loop clients, quantiles."""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlencode, urlsplit

import httpx
from PIL import Image

from tuners.data.synth import photo


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds of process ``pid`` so far (``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    """Resident memory of process ``pid`` in MiB (``/proc``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def peak_rss_growth(pid: int, action: Callable[[], object]) -> float:
    """MiB of process ``pid``'s peak resident memory while ``action()`` runs, above what it held before."""
    before, peak, done = rss_mib(pid), [0.0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_mib(pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        action()
    finally:
        done.set()
        sampler.join()
    return peak[0] - before


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


def request_bytes(method: str, target: str, netloc: str, body: bytes, headers: dict | None = None) -> bytes:
    """An HTTP/1.1 request, as the benchmarks' own clients send it (``target``: path and query)."""
    head = [f"{method} {target} HTTP/1.1", f"host: {netloc}", f"content-length: {len(body)}"]
    head += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


def framing(header_lines: list[bytes]) -> tuple[int, bool, bool]:
    """(Content-Length, chunked, Connection: close) of a response, from its header lines."""
    length, chunked, close = 0, False, False
    for line in header_lines:
        name, _, value = line.partition(b":")
        name, value = name.strip().lower(), value.strip().lower()
        length = int(value) if name == b"content-length" else length
        chunked = chunked or (name == b"transfer-encoding" and value == b"chunked")
        close = close or (name == b"connection" and value == b"close")
    return length, chunked, close


@dataclass
class Answer:
    """A response, as the benchmarks read it."""

    status_code: int
    content: bytes

    def json(self) -> Any:  # noqa: ANN401
        return json.loads(self.content)


class KeepAlive:
    """One keep-alive HTTP/1.1 connection to ``url``, speaking just enough HTTP for the benchmarks'
    requests: ``post`` and ``get`` called as on ``httpx.Client``, a status and a body back.

    The load generator shares the machine's cores with the server it measures. httpx, pure Python
    down to its HTTP parser, took 0.087 of a core at 4 clients and about 70 req/s; this client takes
    0.014, and the same server answered a median 1.025 times the requests (``bench/client_cost.py``;
    ``docs/BENCHMARKS.md``, twenty-first stop).
    """

    def __init__(self, url: str, timeout: float = 60.0) -> None:
        address = urlsplit(url)
        self.address, self.netloc, self.timeout = (address.hostname, address.port or 80), address.netloc, timeout
        self.sock: socket.socket | None = None
        self.reader: io.BufferedReader | None = None

    def __enter__(self) -> KeepAlive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.sock = self.reader = None

    def post(self, path: str, params: dict | None = None, content: bytes = b"", headers: dict | None = None) -> Answer:
        return self.request("POST", path, params, content, headers)

    def get(self, path: str, params: dict | None = None) -> Answer:
        return self.request("GET", path, params, b"", None)

    def request(self, method: str, path: str, params: dict | None, body: bytes, headers: dict | None) -> Answer:
        data = request_bytes(method, path + ("?" + urlencode(params) if params else ""), self.netloc, body, headers)
        reused = self.sock is not None
        try:
            return self._exchange(data)
        except ConnectionError:
            if not reused:
                raise
            self.close()  # the server closed the idle connection (its keep-alive timeout): once more on a new one
            return self._exchange(data)

    def _exchange(self, data: bytes) -> Answer:
        if self.sock is None:
            self.sock = socket.create_connection(self.address, timeout=self.timeout)
            self.reader = self.sock.makefile("rb")
        assert self.reader is not None
        self.sock.sendall(data)
        status = self.reader.readline().split()
        if not status:
            raise ConnectionError("the server closed the connection")
        lines = []
        while (line := self.reader.readline()) not in (b"\r\n", b""):
            lines.append(line)
        length, chunked, close = framing(lines)
        body = self._chunks() if chunked else self.reader.read(length)
        if close:
            self.close()
        return Answer(int(status[1]), body)

    def _chunks(self) -> bytes:
        assert self.reader is not None
        parts = []
        while size := int(self.reader.readline().split(b";")[0], 16):
            parts.append(self.reader.read(size))
            self.reader.readline()
        while self.reader.readline() not in (b"\r\n", b""):  # trailers
            pass
        return b"".join(parts)


def closed_loop(
    url: str,
    clients: int,
    seconds: float,
    request: Callable[[Any, random.Random], Any],
    client: Callable[[str], Any] = KeepAlive,
) -> LoadResult:
    """``clients`` threads, each sending its next request as soon as the last is answered, for ``seconds``,
    each on its own ``client(url)`` (default: :class:`KeepAlive`; ``bench.client_cost`` passes httpx's)."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def one_client(seed: int) -> None:
        rng = random.Random(seed)
        with client(url) as http:
            while time.perf_counter() < deadline:
                start = time.perf_counter()
                status = request(http, rng).status_code
                took = time.perf_counter() - start
                with lock:
                    latencies.append(took) if status == 200 else None
                    statuses[status] = statuses.get(status, 0) + 1

    start = time.perf_counter()
    threads = [threading.Thread(target=one_client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    errors = sum(n for status, n in statuses.items() if status != 200)
    return LoadResult(len(latencies), time.perf_counter() - start, latencies, errors, statuses)


Request = Callable[[KeepAlive, random.Random], Answer]
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
    with KeepAlive(url) as http:
        while time.perf_counter() < deadline:
            for name, request in requests.items():
                start = time.perf_counter()
                ok = request(http, rng).status_code == 200
                latencies[name].append(time.perf_counter() - start) if ok else None
                errors[name] += not ok
    return {name: LoadResult(len(t), sum(t), t, errors[name]) for name, t in latencies.items()}


def beside(load: Callable[[], LoadResult], client: Callable[[threading.Event], None]) -> LoadResult:
    """``load()``'s result while ``client(stop)`` runs on a thread of its own, until ``stop`` is set
    when the load ends: another client's requests beside the load's."""
    stop = threading.Event()
    thread = threading.Thread(target=client, args=(stop,))
    thread.start()
    try:
        return load()
    finally:
        stop.set()
        thread.join()


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
