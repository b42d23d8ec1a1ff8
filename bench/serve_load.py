"""Load on a real ``server-serve`` over HTTP, against the backbone alone measured in the same run.

The server runs in a subprocess on loopback with its default settings (ONNX Runtime on the CPU,
compiled task graphs), the real offline mobilenet_v2 at 320 px, and N untrained ``cst`` tasks
(timing does not depend on the weights; requests use ``score_threshold=0.3``, as the demo page
does, so untrained heads do not flood NMS). Closed loops of C clients send a JPEG photo
(scikit-image's astronaut, 512 x 512):

- one task: C=1 (latency) and C=clients (throughput), and C=clients with the same photo at
  4032 x 3024 (a phone camera's 12 MP), where decoding and resizing weigh more than the backbone;
- N tasks, each request naming one drawn uniformly;
- fan-out: one request naming K = 1, 2, 4, 8 tasks (C=1);
- one task at C=clients again on a server with a 5 ms batch window (the default has none);
- cold loads under load: a server whose budget holds 4 of 20 tasks (no host tier), C=clients
  drawing uniformly, so most requests load their task from the store.

Every figure is also printed as a ratio: throughput against the backbone alone (ORT, batch 8,
images/s), the cost of one more fan-out task against one backbone pass (batch 1). The backbone
alone is measured in this process just before and just after each server's throughput load (the
server idle), and the ratios use the mean of the two. This machine's speed drifts by a fifth
within minutes: measured once at the start of each run, as before, the same server's 47.2 and
47.8 req/s in two runs were 0.42 and 0.59 of the backbone alone (``docs/BENCHMARKS.md``, fifth
stop).
``--compare-to DIR`` runs the same loads against the server in another checkout (a git worktree
of an older commit), with that checkout's defaults.

Run: ``.venv/bin/python -m bench.serve_load`` (about 4 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import httpx
import torch

from bench.common import scratch
from bench.load import LoadResult, Server, closed_loop, histogram_count, histogram_quantile, jpeg
from models import FrozenBackbone, PreprocessSpec, build_backbone
from models.runtime import build_runtime
from tuners import build_task_model
from tuners.artifact import MANIFEST, WEIGHTS, save_artifact

POST = {"score_threshold": "0.3"}
PHONE = (4032, 3024)  # a 12 MP phone camera's photo


def make_tasks(backbone: FrozenBackbone, n: int, method: str, out: Path) -> list[Path]:
    """``n`` untrained tasks with distinct weights, 10 classes each."""
    folders = []
    for i in range(n):
        torch.manual_seed(i)
        model = build_task_model(method, {}, backbone, [f"c{j}" for j in range(10)]).eval()
        folders.append(save_artifact(model, backbone, out / f"{method}{i}"))
    return folders


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


def hot_loads(
    url: str,
    ids: list[str],
    image: bytes,
    clients: int,
    seconds: float,
    only_throughput: bool = False,
    alone: BackboneAlone | None = None,
) -> dict[str, LoadResult]:
    """The loads on a server whose tasks are resident; ``alone`` is measured just before and just
    after the throughput load (one task, ``clients`` clients)."""
    out = {}
    with httpx.Client(base_url=url, timeout=120) as http:
        for task_id in ids:  # warm: each task resident (and compiled) before timing
            detect([task_id], image)(http, random.Random(0))
    wait_compiled(url)
    if alone is not None:
        alone.measure()
    out[f"one task, C={clients}"] = closed_loop(url, clients, seconds, detect(ids[:1], image))
    if alone is not None:
        alone.measure()
    if only_throughput:
        return out
    out["one task, C=1"] = closed_loop(url, 1, seconds, detect(ids[:1], image))
    phone = jpeg(size=PHONE)
    out[f"one task, 12 MP photo, C={clients}"] = closed_loop(url, clients, seconds, detect(ids[:1], phone))
    out[f"{len(ids)} tasks uniformly, C={clients}"] = closed_loop(url, clients, seconds, uniform(ids, image))
    for k in (1, 2, 4, 8):
        out[f"fan-out K={k}, C=1"] = closed_loop(url, 1, seconds, detect(ids[:k], image))
    return out


def run_server(
    store: Path, tasks: list[Path], image: bytes, args: argparse.Namespace, cwd: Path | None, alone: BackboneAlone
) -> dict:
    ids = [f"t{i}" for i in range(len(tasks))]
    with Server(store, cwd=cwd) as server:
        for task_id, folder in zip(ids, tasks):
            upload(server.url, task_id, folder)
        results = hot_loads(server.url, ids, image, args.clients, args.seconds, alone=alone)
        around = alone.runs[-2:]
    if cwd is None:  # the default batch window (none) against a 5 ms one, this checkout only
        with Server(store.with_name(store.name + "-window"), ["--batch-window-ms", "5"]) as server:
            upload(server.url, ids[0], tasks[0])
            window = hot_loads(server.url, ids[:1], image, args.clients, args.seconds, only_throughput=True)
        results[f"one task, C={args.clients}, 5 ms batch window"] = window[f"one task, C={args.clients}"]
    cold_ids, budget = ids[:20], 4 * 2 * (tasks[0] / WEIGHTS).stat().st_size  # 4 compiled cst tasks
    flags = ["--device-cache-bytes", str(budget), "--host-cache-bytes", "0"]
    with Server(store.with_name(store.name + "-cold"), flags, cwd=cwd) as server:
        for task_id, folder in zip(cold_ids, tasks):
            upload(server.url, task_id, folder)
        results["cold loads"] = closed_loop(server.url, args.clients, args.seconds, uniform(cold_ids, image))
        metrics = httpx.get(f"{server.url}/metrics").text
    cold = {q: histogram_quantile(metrics, "sidecar_cold_load_seconds", q) * 1e3 for q in (0.5, 0.99)}
    count = histogram_count(metrics, "sidecar_cold_load_seconds")
    return {"loads": results, "cold_ms": cold, "cold_count": count, "alone": around}


def report(name: str, run: dict, clients: int, n: int) -> None:
    loads: dict[str, LoadResult] = run["loads"]
    (b1_before, ips8_before), (b1_after, ips8_after) = run["alone"]
    b1_ms, ips8 = (b1_before + b1_after) / 2, (ips8_before + ips8_after) / 2
    print(f"\n### {name}\n")
    print(
        f"backbone alone (ORT, stage taps), just before and just after the one-task C={clients} load: "
        f"{b1_before:.2f} and {b1_after:.2f} ms at batch 1, {ips8_before:.1f} and {ips8_after:.1f} images/s "
        f"at batch 8; the ratios below use the means, {b1_ms:.2f} ms and {ips8:.1f} images/s\n"
    )
    print("| load | req/s | p50 ms | p99 ms | errors |\n|---|---|---|---|---|")
    for label, r in loads.items():
        print(f"| {label} | {r.rps:.1f} | {r.quantile(0.5) * 1e3:.1f} | {r.quantile(0.99) * 1e3:.1f} | {r.errors} |")
    fan = {k: loads[f"fan-out K={k}, C=1"].quantile(0.5) * 1e3 for k in (1, 2, 4, 8)}
    one = loads[f"one task, C={clients}"].rps
    print(f"\n- fan-out 8 / 1 task (p50 latency): {fan[8] / fan[1]:.2f}")
    print(
        f"- one more task at K=8: {(fan[8] - fan[1]) / 7:.2f} ms = {(fan[8] - fan[1]) / 7 / b1_ms:.2f} backbone passes"
    )
    print(f"- throughput, one task, C={clients}: {one:.1f} req/s = {one / ips8:.2f} of the backbone alone")
    print(f"- {n} tasks uniformly / one task: {loads[f'{n} tasks uniformly, C={clients}'].rps / one:.2f}")
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
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--compare-to", type=Path, default=None, help="another checkout whose server to load too")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(2)
    with scratch("sidecar-load-") as work:
        backbone = build_backbone("mobilenet_v2", allow_download=False, preprocess=PreprocessSpec(size=320))
        tasks = make_tasks(backbone, args.tasks, "cst", work / "artifacts")
        alone, image = BackboneAlone(backbone, work / "onnx"), jpeg()
        runs = {"this checkout": run_server(work / "store", tasks, image, args, None, alone)}
        if args.compare_to is not None:
            runs[str(args.compare_to)] = run_server(work / "store-old", tasks, image, args, args.compare_to, alone)
        for name, run in runs.items():
            report(name, run, args.clients, args.tasks)
        if args.json:
            figures = {
                name: {
                    label: {"rps": r.rps, "p50": r.quantile(0.5), "p99": r.quantile(0.99)}
                    for label, r in run["loads"].items()
                }
                | {"cold_ms": run["cold_ms"], "backbone_alone_ms_ips8": run["alone"]}
                for name, run in runs.items()
            }
            args.json.write_text(json.dumps({"runs": figures}, indent=2))


if __name__ == "__main__":
    main()
