"""Management calls racing detect requests on one server: every answer is one the API documents,
and every detection comes from the weights of the version that the answer names.

A real ``server-serve`` (subprocess, loopback, real offline mobilenet_v2 at 320 px) with a small
device tier (room for 5 compiled ``cst`` tasks), a host tier for 3, ``keep_versions`` 2 and
``cache_wait_s`` 2. Eight clients send, for ``--seconds`` (60), a random mix of:

- uploads of one of 6 distinct untrained tasks (4 ``cst``, 2 ``linear_probe``) to random ids,
  rollbacks to random versions, deletes, pins, unpins, version lists and task lists;
- detect requests for 1 to 4 ids, some naming a version (``id@N``).

Ids ``x``, ``y`` and ``z`` are never deleted, so a version number names one upload for the whole
run: each detect result for them is checked against the scores its artifact gave alone, before
the run (top 5 scores within 2e-4). Ids ``k0`` to ``k4`` also take deletes. Answers are counted by
call and status; the run fails on any status but 200, 204, 404, 503 and 507, on any mismatched
detection, or on a traceback in the server's log.

Run: ``.venv/bin/python -m bench.races`` (about 2 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import collections
import random
import sys
import threading
import time

import httpx

from bench.common import scratch
from bench.load import Server, jpeg, rss_mib
from bench.serve_load import make_tasks
from models import PreprocessSpec, build_backbone
from tuners.artifact import MANIFEST, WEIGHTS

CHECKED, CHURNED = ["x", "y", "z"], [f"k{i}" for i in range(5)]
EXPECTED = {200, 204, 404, 503, 507}  # 404: deleted, pruned or never there; 507: pins left too little room
DETECT = {"score_threshold": "0.005", "max_detections": "20"}
JPEG = {"content-type": "image/jpeg"}


def top_scores(result: dict) -> list[float]:
    return [d["score"] for d in result["detections"]][:5]


class Run:
    """The clients' shared record: answers by (call, status), the artifact behind each checked version."""

    def __init__(self, url: str, blobs: list[tuple[bytes, bytes]], reference: list[list[float]], image: bytes) -> None:
        self.url, self.blobs, self.reference, self.image = url, blobs, reference, image
        self.lock, self.stop = threading.Lock(), threading.Event()
        self.answers: collections.Counter = collections.Counter()
        self.origin: dict[tuple[str, int], int] = {}
        self.checked, self.problems = 0, []

    def put(self, http: httpx.Client, task_id: str, which: int) -> httpx.Response:
        weights, config = self.blobs[which]
        files = {"weights": (WEIGHTS, weights), "config": (MANIFEST, config)}
        response = http.put(f"/v1/tasks/{task_id}", files=files)
        if response.status_code == 200 and task_id in CHECKED:
            with self.lock:
                self.origin[(task_id, response.json()["version"])] = which
        return response

    def call(self, http: httpx.Client, rng: random.Random) -> tuple[str, httpx.Response]:
        task_id, draw, version = rng.choice(CHECKED + CHURNED), rng.random(), rng.randint(1, 9)
        calls = [
            (0.15, "put", lambda: self.put(http, task_id, rng.randrange(len(self.blobs)))),
            (0.20, "delete", lambda: http.delete(f"/v1/tasks/{rng.choice(CHURNED)}")),
            (0.25, "pin", lambda: http.post(f"/v1/tasks/{task_id}/pin")),
            (0.30, "unpin", lambda: http.post(f"/v1/tasks/{task_id}/unpin")),
            (0.35, "rollback", lambda: http.post(f"/v1/tasks/{task_id}/rollback", params={"version": version})),
            (0.40, "versions", lambda: http.get(f"/v1/tasks/{task_id}/versions")),
            (0.45, "list", lambda: http.get("/v1/tasks")),
        ]
        for bound, name, send in calls:
            if draw < bound:
                return name, send()
        names = rng.sample(CHECKED + CHURNED, rng.randint(1, 4))
        if rng.random() < 0.2:
            names[0] += f"@{version}"
        params = {"tasks": ",".join(names), **DETECT}
        return "detect", http.post("/v1/detect", params=params, content=self.image, headers=JPEG)

    def check(self, results: list[dict]) -> None:
        for result in results:
            key = (result["task"], result["version"])
            if result["task"] not in CHECKED:
                continue
            with self.lock:
                which = self.origin.get(key)
            if which is None:  # its PUT has not answered yet
                time.sleep(0.2)
                with self.lock:
                    which = self.origin.get(key)
            got, want = top_scores(result), self.reference[which] if which is not None else []
            ok = which is not None and len(got) == len(want) and all(abs(a - b) <= 2e-4 for a, b in zip(got, want))
            with self.lock:
                self.checked += 1
                if not ok:
                    self.problems.append(f"{key}: scores {got[:3]}, its upload's {want[:3]}")

    def client(self, seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(base_url=self.url, timeout=30) as http:
            while not self.stop.is_set():
                try:
                    name, response = self.call(http, rng)
                except httpx.TimeoutException as e:
                    with self.lock:
                        self.problems.append(f"no answer in 30 s: {e.request.method} {e.request.url}")
                    continue
                with self.lock:
                    self.answers[(name, response.status_code)] += 1
                    if response.status_code not in EXPECTED:
                        self.problems.append(f"{name}: {response.status_code} {response.text[:200]}")
                if name == "detect" and response.status_code == 200:
                    self.check(response.json()["results"])


def reference_scores(url: str, blobs: list[tuple[bytes, bytes]], image: bytes) -> list[list[float]]:
    """Each artifact's top scores alone, from the same server, before the run."""
    scores = []
    with httpx.Client(base_url=url, timeout=120) as http:
        for i, (weights, config) in enumerate(blobs):
            files = {"weights": (WEIGHTS, weights), "config": (MANIFEST, config)}
            http.put(f"/v1/tasks/ref{i}", files=files).raise_for_status()
            params = {"tasks": f"ref{i}", **DETECT}
            answer = http.post("/v1/detect", params=params, content=image, headers=JPEG)
            scores.append(top_scores(answer.raise_for_status().json()["results"][0]))
            http.delete(f"/v1/tasks/ref{i}").raise_for_status()
    if len({tuple(s) for s in scores}) != len(scores) or min(map(len, scores)) < 5:
        raise RuntimeError("the artifacts' scores do not tell them apart")
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()
    with scratch("sidecar-races-") as work:
        backbone = build_backbone("mobilenet_v2", allow_download=False, preprocess=PreprocessSpec(size=320))
        folders = make_tasks(backbone, 4, "cst", work / "a") + make_tasks(backbone, 2, "linear_probe", work / "b")
        blobs = [((f / WEIGHTS).read_bytes(), (f / MANIFEST).read_bytes()) for f in folders]
        size, image = len(blobs[0][0]), jpeg()
        flags = ["--device-cache-bytes", str(5 * 2 * size), "--host-cache-bytes", str(3 * size)]
        with Server(work / "store", [*flags, "--keep-versions", "2", "--cache-wait-s", "2"]) as server:
            run = Run(server.url, blobs, reference_scores(server.url, blobs, image), image)
            rss = [rss_mib(server.process.pid)]
            threads = [threading.Thread(target=run.client, args=(k,)) for k in range(args.clients)]
            for thread in threads:
                thread.start()
            time.sleep(args.seconds)
            run.stop.set()
            for thread in threads:
                thread.join()
            rss.append(rss_mib(server.process.pid))
            ready = httpx.get(f"{server.url}/readyz", timeout=30).status_code
            tracebacks = open(server.log.name).read().count("Traceback")
    print(f"\n{args.clients} clients, {args.seconds:g} s\n\n| call | answers by status |\n|---|---|")
    for name in sorted({name for name, _ in run.answers}):
        statuses = ", ".join(f"{s}: {n}" for (c, s), n in sorted(run.answers.items()) if c == name)
        print(f"| {name} | {statuses} |")
    print(
        f"\n- detect results checked against their upload's weights: {run.checked}, mismatched or unexpected "
        f"answers: {len(run.problems)}\n- /readyz after: {ready}; tracebacks in the server's log: {tracebacks}; "
        f"server RSS {rss[0]:.0f} MiB before, {rss[1]:.0f} MiB after"
    )
    for problem in run.problems[:10]:
        print(f"  - {problem}")
    sys.exit(1 if run.problems or tracebacks or ready != 200 else 0)


if __name__ == "__main__":
    main()
