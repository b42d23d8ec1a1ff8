"""Load on a real ``server-serve`` over HTTP, against the backbone alone measured in the same run.

The server runs in a subprocess on loopback with its default settings (ONNX Runtime on the CPU,
compiled task graphs), the real offline mobilenet_v2 at 320 px, N untrained ``cst`` tasks and 8
untrained ``linear_probe`` tasks (timing does not depend on the weights; requests use
``score_threshold=0.3``, as the demo page does, so untrained heads do not flood NMS). Closed loops
of C clients send a JPEG photo (scikit-image's astronaut, 512 x 512), each load for ``--seconds``.

The loads behind the engine issue's ratios run in ``--rounds`` rounds, and each ratio is computed
within a round, then the median over rounds is printed with every round's value. A round is: the
backbone alone; one task at C=clients; the backbone alone again; N tasks, each request naming one
drawn uniformly; one client sending, in turn, a request naming K = 1 and one naming K = 8 ``cst``
tasks (for twice ``--seconds``), then the same with ``linear_probe`` tasks, the other method the
issue's "one more task" target names. Taken in turn, K = 1 and K = 8 see the same machine; as two
loads one after the other, their ratio moved by up to a quarter between rounds. This machine's
speed drifts by a fifth within minutes, so a ratio of loads minutes apart measures the drift as
much as the server: measured once at the start of a run, as before, the same server's 47.2 and 47.8 req/s in
two runs were 0.42 and 0.59 of the backbone alone (``docs/BENCHMARKS.md``, fifth stop).

- throughput: one task at C=clients against the backbone alone (ORT, batch 8, images/s, the mean
  of the measurements just before and just after it, taken in this process with the server idle);
- N tasks uniformly against one task;
- fan-out: p50 latency at K=8 against K=1; one more task: their difference over 7, in ms and in
  backbone passes (batch 1, the mean of the round's two measurements); for ``cst`` and for
  ``linear_probe``.

Once each: one task at C=1 (latency), one task at C=clients with the same photo at 4032 x 3024
(a phone camera's 12 MP, where decoding and resizing weigh more than the backbone), fan-out
K = 2 and 4; one task at C=clients on a server with a 5 ms batch window (the default has none);
cold loads under load: a server whose budget holds 4 of 20 tasks (no host tier), C=clients drawing
uniformly, so most requests load their task from the store.

``--compare-to DIR`` runs the same loads against the server in another checkout (a git worktree
of an older commit), with that checkout's defaults.

Run: ``.venv/bin/python -m bench.serve_load`` (about 6 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections import defaultdict
from pathlib import Path

import httpx
import torch

from bench.common import scratch, untrained_tasks
from bench.load import (
    KeepAlive,
    LoadResult,
    Server,
    alternating,
    closed_loop,
    histogram_count,
    histogram_quantile,
    jpeg,
)
from models import FrozenBackbone, PreprocessSpec, build_backbone
from models.runtime import build_runtime
from tuners.artifact import MANIFEST, WEIGHTS, save_artifact

POST = {"score_threshold": "0.3"}
PHONE = (4032, 3024)  # a 12 MP phone camera's photo


def make_tasks(backbone: FrozenBackbone, n: int, method: str, out: Path) -> list[Path]:
    """:func:`untrained_tasks`, saved as artifacts ``out/{method}{i}``."""
    return [
        save_artifact(m, backbone, out / f"{method}{i}") for i, m in enumerate(untrained_tasks(backbone, method, n))
    ]


class BackboneAlone:
    """The backbone alone in ONNX Runtime, with the taps ``cst`` reads: :meth:`measure` gives (ms per
    batch-1 pass, images/s at batch 8). The server loads are bracketed by measurements of it, so a
    ratio does not take a drift of the machine between the two for the server's doing."""

    def __init__(self, backbone: FrozenBackbone, cache: Path, repeats: int = 30) -> None:
        self.taps, self.repeats = list(backbone.stage_taps), repeats
        self.runtime = build_runtime(backbone, "onnx", "cpu", taps=self.taps, cache_dir=cache)
        self.runs: list[tuple[float, float]] = []

    def measure(self) -> tuple[float, float]:
        self.runs.append((self._median(1) * 1e3, 8 / self._median(8)))
        return self.runs[-1]

    def _median(self, batch: int) -> float:
        x = torch.randn(batch, 3, 320, 320)
        for _ in range(3):
            self.runtime(x, self.taps)
        times = []
        for _ in range(self.repeats):
            start = time.perf_counter()
            self.runtime(x, self.taps)
            times.append(time.perf_counter() - start)
        return statistics.median(times)


def upload(url: str, task_id: str, folder: Path) -> None:
    files = {
        "weights": (WEIGHTS, (folder / WEIGHTS).read_bytes()),
        "config": (MANIFEST, (folder / MANIFEST).read_bytes()),
    }
    httpx.put(f"{url}/v1/tasks/{task_id}", files=files, timeout=120).raise_for_status()


def wait_compiled(url: str, timeout: float = 300) -> None:
    """Until every task reports a compiled graph (servers that compile); returns at once otherwise."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        tasks = httpx.get(f"{url}/v1/tasks", timeout=30).json()["tasks"]
        if all(t.get("compiled", True) for t in tasks):
            return
        time.sleep(0.5)


def detect(ids: list[str], image: bytes):  # noqa: ANN201
    params = {**POST, "tasks": ",".join(ids)}
    return lambda http, rng: http.post(
        "/v1/detect", params=params, content=image, headers={"content-type": "image/jpeg"}
    )


def uniform(ids: list[str], image: bytes):  # noqa: ANN201
    return lambda http, rng: http.post(
        "/v1/detect", params={**POST, "tasks": rng.choice(ids)}, content=image, headers={"content-type": "image/jpeg"}
    )


def merged(results: list[LoadResult]) -> LoadResult:
    """The rounds of one load as one result: their requests, seconds, latencies and errors together."""
    latencies = [t for r in results for t in r.latencies]
    return LoadResult(sum(r.requests for r in results), sum(r.seconds for r in results), latencies,
                      sum(r.errors for r in results))  # fmt: skip


def warm(url: str, ids: list[str], image: bytes, compiles: bool = True) -> None:
    """Each task resident, and compiled on a server that ``compiles`` (the CPU default), before anything is timed."""
    with KeepAlive(url, timeout=120) as http:
        for task_id in ids:
            answer = detect([task_id], image)(http, random.Random(0))
            if answer.status_code != 200:
                raise RuntimeError(f"warming {task_id}: {answer.status_code} {answer.content[:300]!r}")
    if compiles:
        wait_compiled(url)


def target_rounds(
    url: str, ids: list[str], probes: list[str], image: bytes, args: argparse.Namespace, alone: BackboneAlone
) -> tuple[dict[str, list[LoadResult]], dict[str, list[float]]]:
    """The loads behind the issue's ratios, in ``args.rounds`` rounds, each ratio from loads of one
    round: the backbone alone, one task at C=clients, the backbone alone again, N tasks uniformly,
    then K=1 and K=8 fan-out at C=1, in turn, over the ``cst`` tasks ``ids`` and over the
    ``linear_probe`` tasks ``probes``. Returns each load's rounds and each ratio's rounds."""
    c, n, seconds = args.clients, len(ids), args.seconds
    loads: dict[str, list[LoadResult]] = defaultdict(list)
    ratios: dict[str, list[float]] = defaultdict(list)
    for _ in range(args.rounds):
        (b1_before, ips8_before), one = alone.measure(), closed_loop(url, c, seconds, detect(ids[:1], image))
        b1_after, ips8_after = alone.measure()
        many = closed_loop(url, c, seconds, uniform(ids, image))
        for label, r in ((f"one task, C={c}", one), (f"{n} tasks uniformly, C={c}", many)):
            loads[label].append(r)
        ratios["throughput"].append(one.rps / ((ips8_before + ips8_after) / 2))
        ratios["many"].append(many.rps / one.rps)
        pass_ms = (b1_before + b1_after) / 2
        for method, tasks in (("cst", ids), ("linear_probe", probes)):
            fan = alternating(url, 2 * seconds, {k: detect(tasks[:k], image) for k in (1, 8)})
            for k, r in fan.items():
                loads[f"fan-out K={k}, {method}, C=1"].append(r)
            p50 = {k: r.quantile(0.5) * 1e3 for k, r in fan.items()}
            ratios[f"fan-out {method}"].append(p50[8] / p50[1])
            ratios[f"one more {method} task"].append((p50[8] - p50[1]) / 7 / pass_ms)
            ratios[f"one more {method} task ms"].append((p50[8] - p50[1]) / 7)
    return loads, ratios


def run_server(
    store: Path,
    tasks: list[Path],
    probes: list[Path],
    image: bytes,
    args: argparse.Namespace,
    cwd: Path | None,
    alone: BackboneAlone,
) -> dict:
    """Every load on a server of checkout ``cwd`` (None: this one) with ``cst`` tasks ``tasks`` and
    ``linear_probe`` tasks ``probes``, then the batch-window and cold-load servers."""
    ids, c, seconds, first = [f"t{i}" for i in range(len(tasks))], args.clients, args.seconds, len(alone.runs)
    probe_ids = [f"lp{i}" for i in range(len(probes))]
    with Server(store, cwd=cwd) as server:
        for task_id, folder in zip(ids + probe_ids, tasks + probes):
            upload(server.url, task_id, folder)
        warm(server.url, ids + probe_ids, image)
        rounds, ratios = target_rounds(server.url, ids, probe_ids, image, args, alone)
        results = {label: merged(runs) for label, runs in rounds.items()}
        results["one task, C=1"] = closed_loop(server.url, 1, seconds, detect(ids[:1], image))
        phone = closed_loop(server.url, c, seconds, detect(ids[:1], jpeg(size=PHONE)))
        results[f"one task, 12 MP photo, C={c}"] = phone
        for k in (2, 4):
            results[f"fan-out K={k}, cst, C=1"] = closed_loop(server.url, 1, seconds, detect(ids[:k], image))
    if cwd is None:  # the default batch window (none) against a 5 ms one, this checkout only
        with Server(store.with_name(store.name + "-window"), ["--batch-window-ms", "5"]) as server:
            upload(server.url, ids[0], tasks[0])
            warm(server.url, ids[:1], image)
            window = merged([closed_loop(server.url, c, seconds, detect(ids[:1], image)) for _ in range(args.rounds)])
        results[f"one task, C={c}, 5 ms batch window"] = window
    cold_ids, budget = ids[:20], 4 * 2 * (tasks[0] / WEIGHTS).stat().st_size  # 4 compiled cst tasks
    flags = ["--device-cache-bytes", str(budget), "--host-cache-bytes", "0"]
    with Server(store.with_name(store.name + "-cold"), flags, cwd=cwd) as server:
        for task_id, folder in zip(cold_ids, tasks):
            upload(server.url, task_id, folder)
        results["cold loads"] = closed_loop(server.url, c, seconds, uniform(cold_ids, image))
        metrics = httpx.get(f"{server.url}/metrics").text
    cold = {q: histogram_quantile(metrics, "sidecar_cold_load_seconds", q) * 1e3 for q in (0.5, 0.99)}
    count = histogram_count(metrics, "sidecar_cold_load_seconds")
    return {"loads": results, "ratios": ratios, "cold_ms": cold, "cold_count": count, "alone": alone.runs[first:]}


def report(name: str, run: dict, clients: int, n: int) -> None:
    loads: dict[str, LoadResult] = run["loads"]
    ratios: dict[str, list[float]] = run["ratios"]
    print(f"\n### {name}\n")
    print("| load | req/s | p50 ms | p99 ms | errors |\n|---|---|---|---|---|")
    for label, r in loads.items():
        print(f"| {label} | {r.rps:.1f} | {r.quantile(0.5) * 1e3:.1f} | {r.quantile(0.99) * 1e3:.1f} | {r.errors} |")
    alone = ", ".join(f"{ips8:.1f}" for _, ips8 in run["alone"])
    print(f"\nBackbone alone (ORT, stage taps, batch 8) around the throughput loads, images/s: {alone}")
    print(f"Ratios: the median of {len(ratios['throughput'])} rounds [each round's figure]\n")

    def line(label: str, key: str, unit: str = "") -> None:
        each = ", ".join(f"{v:.2f}" for v in ratios[key])
        print(f"- {label}: {statistics.median(ratios[key]):.2f}{unit} [{each}]")

    for method in ("cst", "linear_probe"):
        line(f"fan-out 8 / 1 {method} task (p50 latency)", f"fan-out {method}")
        line(f"one more {method} task at K=8, ms", f"one more {method} task ms", " ms")
        line(f"one more {method} task at K=8, backbone passes (batch 1)", f"one more {method} task")
    line(f"throughput, one task, C={clients}, of the backbone alone", "throughput")
    line(f"{n} tasks uniformly / one task", "many")
    one = loads[f"one task, C={clients}"].rps
    print(f"- 12 MP photo / 512 px photo, one task: {loads[f'one task, 12 MP photo, C={clients}'].rps / one:.2f}")
    window = loads.get(f"one task, C={clients}, 5 ms batch window")
    if window is not None:
        print(f"- a 5 ms batch window / none, one task: {window.rps / one:.2f}")
    cold = run["cold_ms"]
    print(f"- cold loads under load: {run['cold_count']:.0f}, p50 {cold[0.5]:.1f} ms, p99 {cold[0.99]:.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=100)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=6.0, help="per load")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the loads behind the target ratios")
    parser.add_argument("--compare-to", type=Path, default=None, help="another checkout whose server to load too")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(2)
    with scratch("sidecar-load-") as work:
        backbone = build_backbone("mobilenet_v2", allow_download=False, preprocess=PreprocessSpec(size=320))
        tasks = make_tasks(backbone, args.tasks, "cst", work / "artifacts")
        probes = make_tasks(backbone, 8, "linear_probe", work / "artifacts")
        alone, image = BackboneAlone(backbone, work / "onnx"), jpeg()
        checkouts = {"this checkout": (work / "store", None)}
        if args.compare_to is not None:
            checkouts[str(args.compare_to)] = (work / "store-old", args.compare_to)
        runs = {}
        for name, (store, cwd) in checkouts.items():
            runs[name] = run_server(store, tasks, probes, image, args, cwd, alone)
        for name, run in runs.items():
            report(name, run, args.clients, args.tasks)
        if args.json:
            figures = {
                name: {
                    label: {"rps": r.rps, "p50": r.quantile(0.5), "p99": r.quantile(0.99)}
                    for label, r in run["loads"].items()
                }
                | {"cold_ms": run["cold_ms"], "ratios": run["ratios"], "backbone_alone_ms_ips8": run["alone"]}
                for name, run in runs.items()
            }
            args.json.write_text(json.dumps({"runs": figures}, indent=2))


if __name__ == "__main__":
    main()
