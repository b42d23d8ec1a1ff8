"""GPU figures, in one run of a few minutes (``make bench-gpu``); needs CUDA and says so otherwise.

- Backbone throughput at batch 32, 320 px: mobilenet_v2 with the real offline weights, and
  resnet50 with **random** weights (no offline ResNet weights exist; speed does not depend on
  them), in torch fp32, fp16 autocast, fp16 with CUDA graphs, and ONNX Runtime's CUDA provider.
- The fraction of wall time the GPU spends in kernels (torch.profiler), fp16 + CUDA graphs.
- Fan-out through the server's executor: K = 1, 2, 4, 8 ``cst`` tasks on one image, tasks stacked
  (the CUDA default), fp16; the ratio K=8 / K=1 (the issue's target is 1.2 or less).

Run: ``.venv/bin/python -m bench.gpu``. Every figure is a median of the repeats, with its ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench.common import scratch
from models import FrozenBackbone, PreprocessSpec, build_backbone
from models.postprocess import PostprocessConfig
from models.runtime import build_runtime
from server.executor import Executor, WorkItem
from server.imaging import decode_image
from server.metrics import Metrics
from server.stacks import StackCache
from tuners import build_task_model
from tuners.data.synth import photo


def cuda_median(fn: Callable[[], object], repeats: int, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def throughput(backbone: FrozenBackbone, batch: int, repeats: int, cache: Path) -> dict[str, float]:
    taps = list(backbone.stage_taps)
    x = torch.randn(batch, 3, 320, 320, device="cuda")
    runtimes = {
        "torch fp32": build_runtime(backbone, "torch", "cuda"),
        "torch fp16": build_runtime(backbone, "torch", "cuda", dtype="fp16"),
        "torch fp16 + CUDA graphs": build_runtime(backbone, "torch", "cuda", dtype="fp16", cuda_graphs=True),
    }
    try:
        runtimes["ONNX Runtime CUDA fp32"] = build_runtime(backbone, "onnx", "cuda", taps=taps, cache_dir=cache)
    except RuntimeError as e:  # the CUDA provider did not load: say so, keep the rest
        print(f"  ONNX Runtime CUDA: not available ({e})")
    with torch.inference_mode():
        return {name: batch / cuda_median(lambda r=rt: r(x, taps), repeats) for name, rt in runtimes.items()}


def kernel_fraction(backbone: FrozenBackbone, batch: int) -> float:
    """Share of wall time with a CUDA kernel running, fp16 + CUDA graphs, 20 passes."""
    runtime = build_runtime(backbone, "torch", "cuda", dtype="fp16", cuda_graphs=True)
    x, taps = torch.randn(batch, 3, 320, 320, device="cuda"), list(backbone.stage_taps)
    with torch.inference_mode():
        for _ in range(5):
            runtime(x, taps)
        torch.cuda.synchronize()
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as prof:
            start = time.perf_counter()
            for _ in range(20):
                runtime(x, taps)
            torch.cuda.synchronize()
            wall = time.perf_counter() - start
    kernels = sum(e.device_time_total for e in prof.key_averages() if e.device_type.name == "CUDA") / 1e6
    return kernels / wall


def fan_out(backbone: FrozenBackbone, repeats: int) -> dict[int, float]:
    runtime = build_runtime(backbone, "torch", "cuda", dtype="fp16", cuda_graphs=True)
    executor = Executor(backbone, runtime, Metrics(), stacks=StackCache(), dtype="fp16")
    image = decode_image(photo("astronaut.png").read_bytes(), 1 << 26, 1 << 26)
    tasks = {}
    for i in range(8):
        torch.manual_seed(i)
        tasks[f"cst{i}"] = build_task_model("cst", {}, backbone, [f"c{j}" for j in range(10)]).cuda().eval()
    post = PostprocessConfig(score_thresh=0.3)
    return {
        k: cuda_median(lambda c=dict(list(tasks.items())[:k]): executor.run([WorkItem(image, "x", c, post)]), repeats)
        for k in (1, 2, 4, 8)
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench.gpu needs a CUDA device; torch sees none")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    with scratch("sidecar-gpu-") as cache:
        spec = PreprocessSpec(size=320)
        models = {
            "mobilenet_v2 (offline ImageNet weights)": build_backbone(
                "mobilenet_v2", allow_download=False, preprocess=spec
            ),
            "resnet50 (RANDOM weights)": build_backbone("resnet50", weights="random", preprocess=spec),
        }
        print(f"\n| backbone, batch {args.batch}, 320 px | runtime | images/s | vs torch fp32 |\n|---|---|---|---|")
        for name, backbone in models.items():
            figures = throughput(backbone.cuda(), args.batch, args.repeats, cache)
            for runtime, ips in figures.items():
                print(f"| {name} | {runtime} | {ips:.0f} | {ips / figures['torch fp32']:.2f} |", flush=True)
        mobilenet = models["mobilenet_v2 (offline ImageNet weights)"]
        print(
            f"\nGPU time in kernels, mobilenet_v2 fp16 + CUDA graphs, batch {args.batch}: "
            f"{kernel_fraction(mobilenet, args.batch):.2f} of wall time"
        )
        times = fan_out(mobilenet, args.repeats)
        print("\n| K cst tasks, one image, stacked, fp16 | 1 | 2 | 4 | 8 |\n|---|---|---|---|---|")
        print("| ms (executor, batch 1) | " + " | ".join(f"{times[k] * 1e3:.2f}" for k in (1, 2, 4, 8)) + " |")
        print(f"\nfan-out 8 / 1: {times[8] / times[1]:.2f}")


if __name__ == "__main__":
    main()
