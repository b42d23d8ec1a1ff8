"""GPU figures of the engine, in one run (``make bench-gpu``); needs CUDA.

1. Precision: every tap of the real mobilenet_v2 at 320 px on a real photo, as relative L2 error
   against the CPU's float32, for IEEE float32 (what ``--dtype fp32`` serves), TF32 (torch's
   default for cuDNN convolutions), and fp16 and bf16 autocast.
2. Backbone throughput at batch 32, 320 px: mobilenet_v2 with the real offline weights, and
   resnet50 with **random** weights (no offline ResNet weights exist; speed does not depend on
   them), in torch fp32, fp16 and bf16, eager and with CUDA graphs, and ONNX Runtime's CUDA
   provider when it loads; and mobilenet_v2 at batch 1 and 8, the sizes the server runs.
3. The fraction of wall time the GPU spends in kernels (torch.profiler), fp16, eager and with
   CUDA graphs, at batch 32, 8 and 1.
4. Fan-out through the server's executor, after decoding (the canvas is made on the request's
   thread in the server too): K = 1, 2, 4, 8 ``cst`` or ``linear_probe`` tasks on one image,
   stacked (the CUDA default) or one by one, in fp32 and fp16, with CUDA graphs for the backbone;
   the ratio K=8 / K=1 and one more task in backbone passes (batch 1, same precision).
5. Invariant 3 per precision: stacked against one-by-one head outputs of 8 ``cst`` tasks, and a
   row's taps in a batch of 8 against the same image alone, as the largest absolute difference.

Run: ``.venv/bin/python -m bench.gpu``. Every time is a median of ``--repeats`` after a warm-up. A section
that fails prints its error, the others still run, and the run exits non-zero.
"""

from __future__ import annotations

import argparse
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import onnxruntime as ort
import torch
from torch import Tensor

from bench.common import median_seconds, scratch, untrained_tasks
from models import FrozenBackbone, PreprocessSpec, build_backbone
from models.postprocess import PostprocessConfig
from models.runtime import build_runtime
from models.runtime.torch import DTYPES, set_float32_precision
from models.transform import ImageMeta, ImageTransform
from server.executor import Executor, WorkItem
from server.imaging import decode_image
from server.metrics import Metrics
from server.stacks import StackCache
from tuners.data.synth import photo

# (label, runtime, dtype, CUDA graphs); "fp32 TF32" is fp32 under TF32 convolutions
RUNTIMES = [
    ("torch fp32", "torch", "fp32", False),
    ("torch fp32 TF32", "torch", "fp32", False),
    ("torch fp32 + CUDA graphs", "torch", "fp32", True),
    ("torch fp16", "torch", "fp16", False),
    ("torch fp16 + CUDA graphs", "torch", "fp16", True),
    ("torch bf16 + CUDA graphs", "torch", "bf16", True),
    ("ONNX Runtime CUDA fp32", "onnx", "fp32", False),
]


def precision(label: str, dtype: str) -> None:
    """Sets this process's float32 precision as the server would for ``dtype``, then TF32 on when
    ``label`` says so (torch's default for convolutions)."""
    set_float32_precision(dtype)
    if "TF32" in label:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True


def photo_canvas(backbone: FrozenBackbone) -> tuple[Tensor, ImageMeta]:
    """Scikit-image's astronaut as the ``[3, S, S]`` canvas the server makes on a request's thread."""
    image = decode_image(photo("astronaut.png").read_bytes(), 1 << 26, 1 << 26)
    return ImageTransform(backbone.preprocess).one(image)


def tap_errors(backbone: FrozenBackbone) -> None:
    """Section 1: relative L2 error of each tap against CPU float32, per precision."""
    taps = sorted(set(backbone.stage_taps) | set(backbone.pyramid_taps))
    x = photo_canvas(backbone)[0][None]
    with torch.inference_mode():
        ref = {t: v.double() for t, v in backbone.cpu()(x, taps).items()}
    print(f"\n| precision, mobilenet_v2 @ 320, astronaut | {' | '.join(taps)} |\n|---|{'---|' * len(taps)}")
    for label, dtype in (("fp32 (IEEE)", "fp32"), ("fp32 TF32", "fp32"), ("fp16", "fp16"), ("bf16", "bf16")):
        precision(label, dtype)
        runtime = build_runtime(backbone, "torch", "cuda", dtype=dtype)
        with torch.inference_mode():
            out = runtime(x, taps)
        errors = [float((out[t].double().cpu() - ref[t]).norm() / ref[t].norm()) for t in taps]
        print(f"| {label} | " + " | ".join(f"{e:.1e}" for e in errors) + " |")


def throughput(backbone: FrozenBackbone, batch: int, repeats: int, cache: Path) -> dict[str, float]:
    """Section 2: images/s of each runtime at ``batch``; a runtime that cannot start is reported and left out."""
    taps = list(backbone.stage_taps)
    x = torch.randn(batch, 3, 320, 320, device="cuda")
    found = {}
    for label, kind, dtype, graphs in RUNTIMES:
        if kind == "onnx" and "CUDAExecutionProvider" not in ort.get_available_providers():
            print(f"  {label}: not available (this onnxruntime has no CUDA provider: {ort.get_available_providers()})")
            continue
        try:
            precision(label, dtype)
            runtime = build_runtime(
                backbone, kind, "cuda", dtype=dtype, taps=taps, cache_dir=cache, cuda_graphs=graphs
            )
        except RuntimeError as e:  # ONNX Runtime without its CUDA provider says so; keep the rest
            print(f"  {label}: not available ({str(e).splitlines()[0][:160]})")
            continue
        found[label] = batch / median_seconds(lambda r=runtime: r(x, taps), repeats, warmup=5)
    set_float32_precision("fp32")
    return found


def kernel_fraction(backbone: FrozenBackbone, batch: int, graphs: bool, passes: int = 20) -> float:
    """Section 3: share of wall time with a CUDA kernel running, fp16, ``passes`` passes."""
    set_float32_precision("fp16")
    runtime = build_runtime(backbone, "torch", "cuda", dtype="fp16", cuda_graphs=graphs)
    x, taps = torch.randn(batch, 3, 320, 320, device="cuda"), list(backbone.stage_taps)
    with torch.inference_mode():
        for _ in range(5):
            runtime(x, taps)
        torch.cuda.synchronize()
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as prof:
            start = time.perf_counter()
            for _ in range(passes):
                runtime(x, taps)
            torch.cuda.synchronize()
            wall = time.perf_counter() - start
    set_float32_precision("fp32")
    kernels = sum(e.device_time_total for e in prof.key_averages() if e.device_type.name == "CUDA") / 1e6
    return kernels / wall


def fan_out(backbone: FrozenBackbone, method: str, dtype: str, stacked: bool, repeats: int) -> dict[int, float]:
    """Section 4: seconds per request of K = 1, 2, 4, 8 tasks on one image, through the executor."""
    set_float32_precision(dtype)
    runtime = build_runtime(backbone, "torch", "cuda", dtype=dtype, cuda_graphs=True)
    executor = Executor(backbone, runtime, Metrics(), stacks=StackCache() if stacked else None, dtype=dtype)
    canvas, meta = photo_canvas(backbone)
    tasks = [(f"{method}{i}", m) for i, m in enumerate(untrained_tasks(backbone, method, 8))]
    post = PostprocessConfig(score_thresh=0.3)

    def request(k: int) -> Callable[[], object]:
        return lambda: executor.run([WorkItem(canvas, "x", dict(tasks[:k]), post, meta=meta)])

    times = {k: median_seconds(request(k), repeats, warmup=5) for k in (1, 2, 4, 8)}
    pass_s = median_seconds(lambda: runtime(canvas[None].cuda(), sorted(tasks[0][1].required_taps())), repeats)
    executor.close()
    set_float32_precision("fp32")
    return times | {0: pass_s}


def invariance(backbone: FrozenBackbone, label: str, dtype: str) -> tuple[float, float]:
    """Section 5: (largest |stacked - alone| over 8 ``cst`` tasks' head outputs, largest |row in a
    batch of 8 - alone| over the taps) under ``label``'s precision."""
    precision(label, dtype)
    runtime = build_runtime(backbone, "torch", "cuda", dtype=dtype)
    models = untrained_tasks(backbone, "cst", 8)
    x = torch.cat([photo_canvas(backbone)[0][None], torch.randn(7, 3, 320, 320)]).cuda()
    taps = sorted(models[0].required_taps())
    autocast = torch.autocast("cuda", DTYPES[dtype], enabled=dtype != "fp32")
    with torch.inference_mode():
        batch, alone = runtime(x, taps), runtime(x[:1], taps)
        rows = max(float((batch[t][:1] - alone[t]).abs().max()) for t in taps)
        one = {t: v[:1] for t, v in alone.items()}
        with autocast:
            stacked = StackCache().get(models)(one, (320, 320), None)
            each = [m.head_outputs(one, None).tensors for m in models]
    heads = max(float((s.tensors[k].float() - e[k].float()).abs().max()) for s, e in zip(stacked, each) for k in e)
    set_float32_precision("fp32")
    return heads, rows


def report_fan_out(backbone: FrozenBackbone, repeats: int) -> None:
    print("\n| executor, one image, CUDA graphs | K=1 ms | K=2 | K=4 | K=8 | 8 / 1 | one more task, passes |")
    print("|---|---|---|---|---|---|---|")
    for method, dtype, stacked in (("cst", "fp32", True), ("cst", "fp32", False), ("cst", "fp16", True),
                                   ("linear_probe", "fp32", True), ("linear_probe", "fp16", True)):  # fmt: skip
        t = fan_out(backbone, method, dtype, stacked, repeats)
        more = (t[8] - t[1]) / 7 / t[0]
        name = f"{method}, {dtype}, {'stacked' if stacked else 'one by one'}"
        cells = " | ".join(f"{t[k] * 1e3:.2f}" for k in (1, 2, 4, 8))
        print(f"| {name} | {cells} | {t[8] / t[1]:.2f} | {more:.3f} (pass {t[0] * 1e3:.2f} ms) |", flush=True)


def report_throughput(mobilenet: FrozenBackbone, spec: PreprocessSpec, batch: int, repeats: int) -> None:
    """Section 2's table: both backbones at ``batch``, then mobilenet_v2 at 1 and 8."""
    with scratch("sidecar-gpu-") as cache:
        models = {
            "mobilenet_v2 (offline ImageNet weights)": mobilenet.cuda(),
            "resnet50 (RANDOM weights)": build_backbone("resnet50", weights="random", preprocess=spec).cuda(),
        }
        runs = [(name, backbone, batch) for name, backbone in models.items()]
        runs += [("mobilenet_v2 (offline ImageNet weights)", mobilenet, b) for b in (1, 8)]
        print("\n| backbone, 320 px | batch | runtime | images/s | of torch fp32 |\n|---|---|---|---|---|")
        for name, backbone, b in runs:
            figures = throughput(backbone, b, repeats, cache)
            for runtime, ips in figures.items():
                print(f"| {name} | {b} | {runtime} | {ips:.0f} | {ips / figures['torch fp32']:.2f} |", flush=True)


def report_kernels(mobilenet: FrozenBackbone, batch: int) -> None:
    print("\n| GPU time in kernels, of wall time, mobilenet_v2 fp16 | batch | eager | CUDA graphs |")
    print("|---|---|---|---|")
    for b in (batch, 8, 1):
        eager, graphs = (kernel_fraction(mobilenet.cuda(), b, g) for g in (False, True))
        print(f"| | {b} | {eager:.2f} | {graphs:.2f} |", flush=True)


def report_invariance(mobilenet: FrozenBackbone) -> None:
    print("\n| invariant 3, 8 cst tasks | stacked vs alone, head outputs, max abs | row of batch 8 vs alone, taps |")
    print("|---|---|---|")
    for label, dtype in (("fp32 (IEEE)", "fp32"), ("fp32 TF32", "fp32"), ("fp16", "fp16"), ("bf16", "bf16")):
        heads, rows = invariance(mobilenet.cuda(), label, dtype)
        print(f"| {label} | {heads:.1e} | {rows:.1e} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench.gpu needs a CUDA device; torch sees none")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}")
    spec = PreprocessSpec(size=320)
    mobilenet = build_backbone("mobilenet_v2", allow_download=False, preprocess=spec)
    sections: list[tuple[str, Callable[[], None]]] = [
        ("precision", lambda: tap_errors(mobilenet)),
        ("throughput", lambda: report_throughput(mobilenet, spec, args.batch, args.repeats)),
        ("kernel time", lambda: report_kernels(mobilenet, args.batch)),
        ("fan-out", lambda: report_fan_out(mobilenet, args.repeats)),
        ("invariant 3", lambda: report_invariance(mobilenet)),
    ]
    failed = []
    for name, run in sections:  # one section's failure is printed, and the others still run
        try:
            run()
        except Exception:  # noqa: BLE001
            traceback.print_exc()
            failed.append(name)
        mobilenet.cuda()
    if failed:
        raise SystemExit(f"bench.gpu: these sections failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
