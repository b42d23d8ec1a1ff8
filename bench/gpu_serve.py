"""Load on a real ``server-serve --device cuda`` over HTTP (``make bench-gpu``); needs CUDA.

What ``bench.serve_load`` does on the CPU, for the engine issue's GPU figures. A server subprocess on
loopback serves the real offline mobilenet_v2 at 320 px, with its CUDA defaults: torch, CUDA graphs,
side tasks stacked. It holds N untrained ``cst`` tasks and 8 untrained ``linear_probe`` tasks. Clients
send a JPEG photo (scikit-image's astronaut, 512 x 512) with ``score_threshold=0.3``. This runs once
per precision, ``--dtype fp32`` (the default, IEEE float32) and ``fp16``:

- fan-out: p50 latency at K=8 against K=1, C=1, for ``cst`` and ``linear_probe``; one more task in
  ms and in backbone passes (batch 1, same precision, CUDA graphs, measured in this process);
- throughput: one task at C=4 and C=16 against the backbone alone (batch 8, same precision, CUDA
  graphs, input already on the GPU), measured just before and just after, with the server idle;
- N tasks uniformly against one task, C=4.

When this onnxruntime has its CUDA provider, the same loads also run, between those two, on a
``--runtime onnx`` server in fp32 (the backbone in ONNX Runtime on the GPU, side tasks in torch),
against the same torch baseline: whether ONNX Runtime should be the CUDA default too.

Run: ``.venv/bin/python -m bench.gpu_serve``.
"""

from __future__ import annotations

import argparse
import traceback
from pathlib import Path

import onnxruntime as ort
import torch

from bench.common import median_seconds, scratch
from bench.load import LoadResult, Server, closed_loop, jpeg
from bench.serve_load import detect, make_tasks, uniform, upload, warm
from models import FrozenBackbone, PreprocessSpec, build_backbone
from models.runtime import build_runtime
from models.runtime.torch import set_float32_precision


def backbone_alone(backbone: FrozenBackbone, dtype: str, repeats: int = 50) -> tuple[float, float]:
    """(ms per batch-1 pass, images/s at batch 8): torch on CUDA with graphs, in ``dtype``."""
    set_float32_precision(dtype)
    runtime = build_runtime(backbone, "torch", "cuda", dtype=dtype, cuda_graphs=True)
    taps = list(backbone.stage_taps)
    one, eight = (torch.randn(b, 3, 320, 320, device="cuda") for b in (1, 8))
    ms = median_seconds(lambda: runtime(one, taps), repeats) * 1e3
    return ms, 8 / median_seconds(lambda: runtime(eight, taps), repeats)


def run_server(
    store: Path,
    config: tuple[str, str],
    tasks: list[Path],
    probes: list[Path],
    backbone: FrozenBackbone,
    seconds: float,
) -> tuple[dict[str, LoadResult], dict[str, float]]:
    """Every load on one ``--device cuda --dtype dtype --runtime runtime`` server (``config``: dtype,
    runtime); returns the loads and the ratios."""
    dtype, runtime = config
    ids, probe_ids, image = [f"t{i}" for i in range(len(tasks))], [f"lp{i}" for i in range(len(probes))], jpeg()
    loads: dict[str, LoadResult] = {}
    ratios: dict[str, float] = {}
    with Server(store, ["--device", "cuda", "--dtype", dtype, "--runtime", runtime]) as server:
        for task_id, folder in zip(ids + probe_ids, tasks + probes):
            upload(server.url, task_id, folder)
        warm(server.url, ids + probe_ids, image, compiles=False)  # side tasks run in torch on CUDA
        pass_ms, ips_before = backbone_alone(backbone, dtype)
        for c in (4, 16):
            loads[f"one task, C={c}"] = closed_loop(server.url, c, seconds, detect(ids[:1], image))
        pass_after, ips_after = backbone_alone(backbone, dtype)
        pass_ms, ips8 = (pass_ms + pass_after) / 2, (ips_before + ips_after) / 2
        loads[f"{len(ids)} tasks uniformly, C=4"] = closed_loop(server.url, 4, seconds, uniform(ids, image))
        for method, names in (("cst", ids), ("linear_probe", probe_ids)):
            fan = {k: closed_loop(server.url, 1, seconds, detect(names[:k], image)) for k in (1, 8)}
            p50 = {k: r.quantile(0.5) * 1e3 for k, r in fan.items()}
            loads |= {f"fan-out K={k}, {method}, C=1": r for k, r in fan.items()}
            ratios[f"fan-out 8 / 1 {method} task (p50)"] = p50[8] / p50[1]
            ratios[f"one more {method} task at K=8, ms"] = (p50[8] - p50[1]) / 7
            ratios[f"one more {method} task at K=8, backbone passes"] = (p50[8] - p50[1]) / 7 / pass_ms
    set_float32_precision("fp32")
    one = loads["one task, C=4"].rps
    ratios["throughput, one task, C=4, of the backbone alone"] = one / ips8
    ratios["throughput, one task, C=16, of the backbone alone"] = loads["one task, C=16"].rps / ips8
    ratios[f"{len(ids)} tasks uniformly / one task, C=4"] = loads[f"{len(ids)} tasks uniformly, C=4"].rps / one
    ratios["backbone alone: batch-1 pass ms"], ratios["backbone alone: images/s at batch 8"] = pass_ms, ips8
    return loads, ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=3.0, help="per load")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench.gpu_serve needs a CUDA device; torch sees none")
    with scratch("sidecar-gpu-load-") as work:
        backbone = build_backbone("mobilenet_v2", allow_download=False, preprocess=PreprocessSpec(size=320))
        tasks = make_tasks(backbone, args.tasks, "cst", work / "artifacts")
        probes = make_tasks(backbone, 8, "linear_probe", work / "artifacts")
        backbone.cuda()
        failed = []
        configs = [("fp32", "torch"), ("fp16", "torch")]
        if "CUDAExecutionProvider" in ort.get_available_providers():
            configs.insert(1, ("fp32", "onnx"))  # beside torch at the same precision
        for config in configs:  # a failed server is reported with its log, and the next one still runs
            store = work / f"store-{'-'.join(config)}"
            try:
                loads, ratios = run_server(store, config, tasks, probes, backbone, args.seconds)
            except Exception:  # noqa: BLE001
                traceback.print_exc()
                log = store.with_suffix(".log")
                tail = log.read_text(errors="replace").splitlines()[-60:] if log.is_file() else []
                print(f"server log ({log}), last {len(tail)} lines:", *tail, sep="\n", flush=True)
                failed.append(" ".join(config))
                continue
            report(config, loads, ratios)
    if failed:
        raise SystemExit(f"bench.gpu_serve: the {', '.join(failed)} server failed")


def report(config: tuple[str, str], loads: dict[str, LoadResult], ratios: dict[str, float]) -> None:
    dtype, runtime = config
    print(f"\n### server-serve --device cuda --dtype {dtype} --runtime {runtime}, {torch.cuda.get_device_name()}\n")
    print("| load | req/s | p50 ms | p99 ms | errors |\n|---|---|---|---|---|")
    for label, r in loads.items():
        p50, p99 = r.quantile(0.5) * 1e3, r.quantile(0.99) * 1e3
        print(f"| {label} | {r.rps:.1f} | {p50:.1f} | {p99:.1f} | {r.errors} |")
    print()
    for label, value in ratios.items():
        print(f"- {label}: {value:.3f}", flush=True)


if __name__ == "__main__":
    main()
