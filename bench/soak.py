"""Soak: cold load/evict cycles through the HTTP API; the server's memory must not grow.

A real ``server-serve`` (subprocess, loopback, real offline mobilenet_v2 at 320 px) holds 10
untrained ``cst`` tasks in its store with a device budget for 3 of them and no host tier. One
client asks for them round-robin, so nearly every request loads its task from the store and
evicts another; every 10th request is a fan-out over 2 tasks. The server's RSS is read from
/proc every 500 cycles, and a least-squares line through the samples after the first gives the
growth in MiB per 1,000 cycles. The earlier server, which read artifacts through safetensors'
``safe_open``, grew 8.3 MiB per 1,000 (ENVIRONMENT.md, section 7).

Run: ``.venv/bin/python -m bench.soak`` (10,000 cycles, about 6 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import time

import httpx
import numpy as np

from bench.common import scratch
from bench.load import Server, histogram_count, jpeg, rss_mib
from bench.serve_load import make_tasks, upload
from models import PreprocessSpec, build_backbone
from tuners.artifact import WEIGHTS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cycles", type=int, default=10_000)
    parser.add_argument("--every", type=int, default=500, help="cycles between RSS samples")
    args = parser.parse_args()
    with scratch("sidecar-soak-") as work:
        backbone = build_backbone("mobilenet_v2", allow_download=False, preprocess=PreprocessSpec(size=320))
        tasks = make_tasks(backbone, 10, "cst", work / "artifacts")
        budget = 3 * 2 * (tasks[0] / WEIGHTS).stat().st_size  # three tasks (a compiled one counts twice)
        flags = ["--device-cache-bytes", str(budget), "--host-cache-bytes", "0"]
        image, ids = jpeg(), [f"t{i}" for i in range(len(tasks))]
        samples: list[tuple[int, float]] = []
        with Server(work / "store", flags) as server, httpx.Client(base_url=server.url, timeout=60) as http:
            for task_id, folder in zip(ids, tasks):
                upload(server.url, task_id, folder)
            start = time.perf_counter()
            print("| cycles | RSS MiB | cold loads | seconds |\n|---|---|---|---|", flush=True)
            for cycle in range(args.cycles + 1):
                if cycle % args.every == 0:
                    loads = histogram_count(http.get("/metrics").text, "sidecar_cold_load_seconds")
                    samples.append((cycle, rss_mib(server.process.pid)))
                    print(
                        f"| {cycle} | {samples[-1][1]:.1f} | {loads:.0f} | {time.perf_counter() - start:.0f} |",
                        flush=True,
                    )
                names = f"{ids[cycle % 10]},{ids[(cycle + 5) % 10]}" if cycle % 10 == 9 else ids[cycle % 10]
                response = http.post("/v1/detect", params={"tasks": names, "score_threshold": "0.3"}, content=image,
                                     headers={"content-type": "image/jpeg"})  # fmt: skip
                response.raise_for_status()
        cycles, rss = np.array([c for c, _ in samples[1:]]), np.array([r for _, r in samples[1:]])
        slope = np.polyfit(cycles, rss, 1)[0] * 1000
        residual = np.std(rss - np.polyval(np.polyfit(cycles, rss, 1), cycles))
        print(
            f"\nRSS growth: {slope:+.3f} MiB per 1,000 cycles (least squares over samples {cycles[0]}..{cycles[-1]}; "
            f"residual std {residual:.2f} MiB; first sample {samples[0][1]:.1f} MiB, last {samples[-1][1]:.1f} MiB)"
        )


if __name__ == "__main__":
    main()
