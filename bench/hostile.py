"""Hostile clients: what oversized heads, deep pipelines and many large bodies cost the server.

Each scenario runs against a fresh server of each checkout (``--compare-to`` adds another one), over
raw sockets on loopback, and prints the answer's status line, the growth of the server's resident
memory (its peak while the scenario ran, above what it held before) and the server's CPU seconds:

- ``fields``: a request line, then 100 MB of small header fields (``X-N: v``), then the head's end;
- ``target``: a request target of 200 MB, sent as fast as the server takes it, for at most 30 s;
- ``pipeline``: 300,000 pipelined ``GET /healthz`` sent before any answer is read, then the answers
  read for 10 s (the count is printed);
- ``bodies``: 120 connections each sending a 19 MB body at once, all but the last MiB, then the rest;
- ``refused``: 20 clients in turn, each sending a 40 MB body (twice the limit) whole before reading the
  answer, as most HTTP clients do: whether the send completes or the connection resets under it.

Run: ``.venv/bin/python -m bench.hostile --compare-to /path/to/old-worktree``.
"""

from __future__ import annotations

import argparse
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from bench.common import scratch
from bench.load import Server, ab_sides, cpu_seconds, peak_rss_growth

MiB = 1 << 20
Scenario = Callable[[int], str]  # port -> what the server answered


def answer(sock: socket.socket, seconds: float = 30) -> str:
    """The first line the server sent, or what became of the connection."""
    sock.settimeout(seconds)
    try:
        return sock.recv(200).split(b"\r\n", 1)[0].decode("latin-1") or "closed"
    except OSError as e:
        return type(e).__name__


def send_all(sock: socket.socket, parts: Callable[[], bytes], total: int, deadline: float) -> int:
    """Sends ``parts()`` until ``total`` bytes are out or ``deadline`` passes; returns the bytes sent."""
    sent = 0
    try:
        while sent < total and time.monotonic() < deadline:
            sent += sock.send(parts())
    except OSError:
        pass  # the server closed the connection
    return sent


def fields(port: int) -> str:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        block = b"".join(b"X-%d: v\r\n" % i for i in range(60_000))
        send_all(sock, lambda: block, 100 * MiB, time.monotonic() + 60)
        try:
            sock.sendall(b"\r\n")
        except OSError:
            pass
        return answer(sock)


def target(port: int) -> str:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET /healthz?x=")
        block = b"a" * (1 << 16)
        if send_all(sock, lambda: block, 200 * MiB, time.monotonic() + 30) >= 200 * MiB:
            sock.sendall(b" HTTP/1.1\r\nHost: x\r\n\r\n")
        return answer(sock)


def pipeline(port: int) -> str:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        block = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" * 1000
        send_all(sock, lambda: block, 300 * len(block), time.monotonic() + 60)
        time.sleep(3)
        answers, deadline, tail = 0, time.monotonic() + 10, b""
        sock.settimeout(1)
        while time.monotonic() < deadline:
            try:
                data = sock.recv(1 << 16)
            except OSError:
                continue
            if not data:
                break
            answers += (tail + data).count(b"HTTP/1.1 200")
            tail = data[-12:]
        return f"{answers} answered"


def bodies(port: int, n: int = 120, size: int = 19 * MiB) -> str:
    statuses: list[str] = []

    def one() -> None:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            head = b"POST /v1/detect?tasks=t HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
            try:
                sock.sendall(head + b"Content-Length: %d\r\n\r\n" % size + b"\xff" * (size - MiB))
                time.sleep(2)  # every body nearly in at once
                sock.sendall(b"\xff" * MiB)
            except OSError:
                pass
            statuses.append(answer(sock))

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return ", ".join(f"{count} {status}" for status, count in Counter(statuses).most_common())


def refused(port: int, n: int = 20, size: int = 40 * MiB) -> str:
    """``n`` clients one after another, each sending a body twice the request limit whole, then reading."""
    outcomes: list[str] = []
    for _ in range(n):
        with socket.create_connection(("127.0.0.1", port)) as sock:
            head = b"POST /v1/detect?tasks=t HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
            try:
                sock.sendall(head + b"Content-Length: %d\r\n\r\n" % size)
                sock.sendall(b"\xff" * size)
                sent = "sent whole"
            except OSError as e:
                sent = f"{type(e).__name__} while sending"
            outcomes.append(f"{sent}, then read {answer(sock)}")
    return ", ".join(f"{count}x {outcome}" for outcome, count in Counter(outcomes).most_common())


SCENARIOS: dict[str, Scenario] = {
    "fields": fields, "target": target, "pipeline": pipeline, "bodies": bodies, "refused": refused
}  # fmt: skip


def measure(server: Server, scenario: Scenario) -> tuple[str, float, float]:
    """(answer, peak resident memory growth in MiB, CPU seconds) of ``scenario`` on ``server``."""
    pid, said = server.process.pid, []
    cpu = cpu_seconds(pid)
    grown = peak_rss_growth(pid, lambda: (said.append(scenario(server.port)), time.sleep(1)))
    return said[0], grown, cpu_seconds(pid) - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compare-to", type=Path, help="another checkout (a git worktree) to try the same way")
    parser.add_argument("--only", choices=list(SCENARIOS), nargs="*", help="these scenarios (default: all)")
    args = parser.parse_args()
    print("| scenario | checkout | answer | server memory growth, MiB | server CPU s |\n|---|---|---|---|---|")
    with scratch("sidecar-hostile-") as work:
        for name in args.only or SCENARIOS:
            for label, cwd in ab_sides(args):
                with Server(work / f"store-{name}-{label.replace('/', '_')}", cwd=cwd) as server:
                    said, grown, cpu = measure(server, SCENARIOS[name])
                print(f"| {name} | {label} | {said} | {grown:.0f} | {cpu:.1f} |", flush=True)


if __name__ == "__main__":
    main()
