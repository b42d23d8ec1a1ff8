"""Ray Serve scale-out on this machine: 1 against 2 engine replicas, against one process.

Real offline mobilenet_v2 at 320 px, 20 untrained ``cst`` tasks (timing does not depend on the
weights), a JPEG photo, ``score_threshold=0.3``, closed loops of C clients over HTTP:

- single-task requests, each naming one of the 20 tasks uniformly;
- fan-out requests, each naming 4 of the 20 uniformly (one backbone pass each, on one replica).

Replicas get 1 CPU and 1 thread each; Ray is started with 3 logical CPUs so the ingress and the
writer (0.1 CPU each) fit beside two replicas. **This machine has 2 cores**, so 2 replicas can at
most double 1 replica's throughput, and the ingress, proxy and clients share the same cores.
The single-process server (``server-serve``, default settings) runs the same loads in the same
run, which prices the proxy and handle hops. Uploads: the PUT latency, which includes the
broadcast to every replica (a replica never serves a replaced version once the PUT answered).

Run: ``.venv/bin/python -m bench.ray_scale`` (about 5 minutes).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from bench.common import scratch
from bench.load import LoadResult, Server, closed_loop, free_port, jpeg
from bench.serve_load import POST, make_tasks, upload, wait_compiled
from models import PreprocessSpec, build_backbone

K = 4


def cold_loads(url: str) -> float:
    """Cold loads so far, summed over every replica's histogram (one registry, or one per replica)."""
    lines = httpx.get(f"{url}/metrics").text.splitlines()
    return sum(float(line.split()[-1]) for line in lines if line.startswith("sidecar_cold_load_seconds_count"))


def loads(
    url: str, ids: list[str], image: bytes, clients: int, seconds: float
) -> dict[str, tuple[LoadResult | None, float]]:
    """Each load's result, and the cold loads per task it caused (the first touch is not timed)."""
    headers = {"content-type": "image/jpeg"}

    def single(http: httpx.Client, rng) -> httpx.Response:  # noqa: ANN001
        return http.post("/v1/detect", params={**POST, "tasks": rng.choice(ids)}, content=image, headers=headers)

    def fan_out(http: httpx.Client, rng) -> httpx.Response:  # noqa: ANN001
        return http.post("/v1/detect", params={**POST, "tasks": ",".join(rng.sample(ids, K))}, content=image,
                         headers=headers)  # fmt: skip

    before = cold_loads(url)
    for task_id in ids * 2:  # outside the timing: where does each task load? (a second use compiles it)
        httpx.post(f"{url}/v1/detect", params={**POST, "tasks": task_id}, content=image, headers=headers, timeout=120)
    wait_compiled(url)
    first = cold_loads(url)
    out = {"first touch": (None, (first - before) / len(ids))}
    before = first
    for label, request in (("single task", single), (f"fan-out K={K}", fan_out)):
        result = closed_loop(url, clients, seconds, request)
        after = cold_loads(url)
        out[label], before = (result, (after - before) / len(ids)), after
    return out


def put_latency(url: str, folder: Path, n: int = 8) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        upload(url, "propagation", folder)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def on_ray(replicas: int, tasks: list[Path], image: bytes, args: argparse.Namespace, work: Path) -> dict:
    import ray
    from ray import serve

    from server.config import Settings
    from server.scale.ray_app import APP, OFFLINE_ENV, build_app, start_proxies

    os.environ.update(OFFLINE_ENV)
    ray_dir = tempfile.mkdtemp(prefix="sdb-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    ray.init(num_cpus=3, include_dashboard=False, _temp_dir=ray_dir, log_to_driver=False, namespace="sidecar-bench")
    try:
        settings = Settings(store_dir=work / f"store-ray{replicas}", cache_dir=work / "cache", ray_replicas=replicas,
                            ray_replica_cpus=1.0, threads=1, port=free_port())  # fmt: skip
        start_proxies(settings)
        serve.run(build_app(settings), name=APP, route_prefix="/")
        url = f"http://127.0.0.1:{settings.port}"
        ids = [f"t{i}" for i in range(len(tasks))]
        for task_id, folder in zip(ids, tasks):
            upload(url, task_id, folder)
        return {"loads": loads(url, ids, image, args.clients, args.seconds), "put_ms": put_latency(url, tasks[0])}
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(ray_dir, ignore_errors=True)


def single_process(tasks: list[Path], image: bytes, args: argparse.Namespace, work: Path) -> dict:
    with Server(work / "store-single") as server:
        ids = [f"t{i}" for i in range(len(tasks))]
        for task_id, folder in zip(ids, tasks):
            upload(server.url, task_id, folder)
        return {
            "loads": loads(server.url, ids, image, args.clients, args.seconds),
            "put_ms": put_latency(server.url, tasks[0]),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=20)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    with scratch("sidecar-ray-bench-") as work:
        backbone = build_backbone("mobilenet_v2", allow_download=False, preprocess=PreprocessSpec(size=320))
        tasks, image = make_tasks(backbone, args.tasks, "cst", work / "artifacts"), jpeg()
        runs = {
            "one process": single_process(tasks, image, args, work),
            "Ray, 1 replica": on_ray(1, tasks, image, args, work),
            "Ray, 2 replicas": on_ray(2, tasks, image, args, work),
        }
        print(f"\n| server | load (C={args.clients}) | req/s | p50 ms | p99 ms | cold loads per task | PUT p50 ms |")
        print("|---|---|---|---|---|---|---|")
        for name, run in runs.items():
            for label, (r, cold) in run["loads"].items():
                timed = (
                    f"{r.rps:.1f} | {r.quantile(0.5) * 1e3:.0f} | {r.quantile(0.99) * 1e3:.0f}" if r else "- | - | -"
                )
                print(f"| {name} | {label} | {timed} | {cold:.2f} | {run['put_ms']:.0f} |")
        for label in ("single task", f"fan-out K={K}"):
            one, two = runs["Ray, 1 replica"]["loads"][label][0].rps, runs["Ray, 2 replicas"]["loads"][label][0].rps
            print(f"- {label}: 2 replicas / 1 replica = {two / one:.2f} (at most 2.0, and less on 2 cores)")


if __name__ == "__main__":
    main()
