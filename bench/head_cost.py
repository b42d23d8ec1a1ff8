"""Cost of each head per task, as a fraction of one mobilenet_v2 pass (same run, same input); each
side method's arithmetic (tuner + default light head, multiply-accumulates counted by
``torch.utils.flop_counter``) as a fraction of the pass's; and the time of ``linear_probe`` and
``cst`` compiled graphs as the server runs them (ONNX Runtime, one thread each, 8 distinct tasks on
2 worker threads) against the ONNX Runtime pass at batch 1: the floor under "one more task" in the
fan-out figures, before any of the engine's own per-task work (decoding, NMS, the response); and
the graphs of ``cst`` and ``side_tuning`` against the same tasks exported without folding their
calibration into the head (``tuners.fold``), the two timed alternately. Last, what is left to take
from 8 ``cst`` graphs on one thread beyond their arithmetic: the 8 run one after another against
the same 8 exported as one graph (one session run instead of 8), and against the 8 with ONNX
Runtime's NCHWc layout transformer off (what its layout optimisation already gives).

Usage: .venv/bin/python -m bench.head_cost [--size 320] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import onnxruntime as ort
import torch
from torch import nn

from bench.common import median_seconds, paired_median_seconds, scratch, untrained_tasks
from models import FrozenBackbone, build_backbone, build_head
from models.runtime import build_runtime
from models.runtime.onnx import export_atomic, make_session, session_options, to_numpy
from tuners import TUNERS, build_task_model
from tuners.compiled import CompiledTask, _TaskGraph
from tuners.task_model import TaskModel


def macs(fn) -> int:  # noqa: ANN001  (any callable)
    """Multiply-accumulates of one call of ``fn`` (``torch.utils.flop_counter`` counts 2 per MAC)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        fn()
    return counter.get_total_flops() // 2


def side_task_arithmetic(backbone, x: torch.Tensor) -> None:  # noqa: ANN001  (a FrozenBackbone)
    """Prints each side method's MACs (tuner + light head, default options) against the backbone's."""
    base = macs(lambda: backbone(x, list(backbone.stage_taps)))
    print(f"\nmobilenet_v2 pass to c5 at {x.shape[-1]}px: {base / 1e9:.3f} GMACs")
    print("| side method | GMACs per image | fraction of the backbone pass |")
    print("|---|---|---|")
    for method in (m for m in TUNERS.names() if TUNERS.get(m).kind == "side"):
        try:
            model = build_task_model(method, {}, backbone, [f"c{j}" for j in range(10)]).eval()
        except Exception as e:  # noqa: BLE001  (a method that does not fit this backbone)
            print(f"| {method} | not built: {e} | - |")
            continue
        with torch.inference_mode():
            maps = backbone(x, model.required_taps())
        n = macs(lambda m=model, t=maps: m.head_outputs(t, x if m.tuner.needs_images else None))
        print(f"| {method} | {n / 1e9:.3f} | {n / base:.3f} |")


def compiled_graphs(backbone, x: torch.Tensor, repeats: int) -> None:  # noqa: ANN001  (a FrozenBackbone)
    """Prints one compiled graph alone, and 8 graphs of distinct tasks on 2 worker threads (per graph),
    each timed alternately with the ONNX Runtime backbone pass (batch 1, 2 threads)."""
    taps = list(backbone.stage_taps)
    with scratch("sidecar-head-cost-") as work, ThreadPoolExecutor(2) as pool, torch.inference_mode():
        runtime = build_runtime(backbone, "onnx", "cpu", taps=taps, cache_dir=work)
        maps = runtime(x, taps)
        print("\n| method | one graph, ms | of the ORT pass | 8 graphs on 2 threads, ms per graph | of the ORT pass |")
        print("|---|---|---|---|---|")
        for method in ("linear_probe", "cst"):
            graphs = graph_set(backbone, method, work)
            one, pass_one = paired_median_seconds(lambda g=graphs[0]: g(maps), lambda: runtime(x, taps), repeats)
            eight, pass_eight = paired_median_seconds(
                lambda g=graphs: list(pool.map(lambda graph: graph(maps), g)), lambda: runtime(x, taps), repeats
            )
            print(f"| {method} | {one * 1e3:.2f} | {one / pass_one:.3f} | {eight / 8 * 1e3:.2f} | "
                  f"{eight / 8 / pass_eight:.3f} |")  # fmt: skip
        print(f"ONNX Runtime backbone pass, batch 1, 2 threads: {pass_eight * 1e3:.2f} ms (last median)")
        fold_saving(backbone, maps, x, pool, work, repeats)
        one_session_and_layout(backbone, maps, work, repeats)


def graph_set(
    backbone: FrozenBackbone, method: str, work: Path, fold: bool = True, head: dict | None = None
) -> list[CompiledTask]:
    """8 distinct untrained tasks of ``method`` (with ``head``), compiled as the server compiles them
    (one thread each)."""
    tag = "-".join(f"{k}{v}" for k, v in sorted((head or {}).items()))
    return [
        CompiledTask(model, backbone, work / f"{method}-{fold}-{tag}-{i}.onnx", "cpu", threads=1, fold=fold)
        for i, model in enumerate(untrained_tasks(backbone, method, 8, head))
    ]


def fold_saving(
    backbone: FrozenBackbone, maps: dict, images: torch.Tensor, pool: ThreadPoolExecutor, work: Path, repeats: int
) -> None:
    """Prints the graphs of ``cst`` and ``side_tuning`` (which reads ``images``) against the same tasks
    exported without folding their calibration into the head (``tuners.fold``), the two timed
    alternately: one graph, and 8 on 2 worker threads."""

    def every(graphs: list[CompiledTask]) -> list:
        return list(pool.map(lambda graph: graph(maps, images), graphs))

    for method in ("cst", "side_tuning"):
        folded, unfolded = graph_set(backbone, method, work), graph_set(backbone, method, work, fold=False)
        one, one_plain = paired_median_seconds(
            lambda f=folded[0]: f(maps, images), lambda u=unfolded[0]: u(maps, images), repeats
        )
        eight, eight_plain = paired_median_seconds(lambda f=folded: every(f), lambda u=unfolded: every(u), repeats)
        print(f"{method}, calibration folded / not folded (alternated): one graph {one * 1e3:.2f} / "
              f"{one_plain * 1e3:.2f} ms = {one / one_plain:.3f}; 8 graphs on 2 threads {eight / 8 * 1e3:.2f} / "
              f"{eight_plain / 8 * 1e3:.2f} ms per graph = {eight / eight_plain:.3f}")  # fmt: skip


class _Merged(nn.Module):
    """Several side tasks' graphs (as ``CompiledTask`` exports each, calibrations folded) in one module,
    for one ONNX graph: taps in, every task's head tensors out."""

    def __init__(self, models: list[TaskModel], taps: list[str], outputs: list[str]) -> None:
        super().__init__()
        self.graphs = nn.ModuleList(_TaskGraph(copy.deepcopy(m).eval(), taps, outputs) for m in models)

    def forward(self, *taps: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(t for graph in self.graphs for t in graph(*taps))


def one_session_and_layout(backbone: FrozenBackbone, maps: dict, work: Path, repeats: int) -> None:
    """Prints 8 ``cst`` graphs on one thread, one after another, against the same 8 as one graph and
    against the 8 with ONNX Runtime's NCHWc layout transformer off, each pair timed alternately."""
    models = untrained_tasks(backbone, "cst", 8)
    graphs = [CompiledTask(m, backbone, work / f"cst-one-{i}.onnx", "cpu", threads=1) for i, m in enumerate(models)]
    taps, outputs = graphs[0].taps, graphs[0].outputs
    names = [f"{o}_{i}" for i in range(len(models)) for o in outputs]
    args = tuple(maps[t] for t in taps)
    one = make_session(export_atomic(_Merged(models, taps, outputs), args, work / "cst-8-as-one.onnx", taps, names),
                       "cpu", threads=1)  # fmt: skip
    plain = [
        ort.InferenceSession(str(work / f"cst-one-{i}.onnx"), session_options(1), ["CPUExecutionProvider"],
                             disabled_optimizers=["NchwcTransformer"])
        for i in range(len(models))
    ]  # fmt: skip

    def feeds(session: ort.InferenceSession) -> dict:
        return {i.name: to_numpy(maps[i.name]) for i in session.get_inputs()}

    eight, merged = paired_median_seconds(
        lambda: [g(maps) for g in graphs], lambda f=feeds(one): one.run(None, f), repeats
    )
    plain_feeds = [feeds(s) for s in plain]
    eight_again, no_layout = paired_median_seconds(
        lambda: [g(maps) for g in graphs], lambda: [s.run(None, f) for s, f in zip(plain, plain_feeds)], repeats
    )
    print(f"cst, 8 graphs on one thread (alternated): one after another {eight * 1e3:.2f} ms, as one graph "
          f"{merged * 1e3:.2f} ms = {merged / eight:.3f}; one after another {eight_again * 1e3:.2f} ms, with "
          f"NCHWc layouts off {no_layout * 1e3:.2f} ms = {no_layout / eight_again:.3f}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    backbone = build_backbone("mobilenet_v2")
    taps = list(backbone.pyramid_taps)
    x = torch.randn(1, 3, args.size, args.size)
    with torch.inference_mode():
        maps = [backbone(x, taps)[t] for t in taps]
    channels = [backbone.feature_spec[t].channels for t in taps]
    strides = [backbone.feature_spec[t].stride for t in taps]
    base = median_seconds(lambda: backbone(x, taps), args.repeats)
    print(f"mobilenet_v2 pass at {args.size}px, {args.threads} threads: {base * 1e3:.2f} ms")
    print("| head | options | params | ms | fraction of a backbone pass |")
    print("|---|---|---|---|---|")
    for name, options in [
        ("light", {}),
        ("fcos", {"width": 128, "num_convs": 2}),
        ("fcos", {"width": 256, "num_convs": 4}),
        ("retinanet", {"width": 128}),
    ]:
        head = build_head(name, 10, channels, strides, **options).eval()
        params = sum(p.numel() for p in head.parameters())
        t = median_seconds(lambda head=head: head(maps), args.repeats)
        print(f"| {name} | {options or 'default'} | {params / 1e6:.2f}M | {t * 1e3:.2f} | {t / base:.3f} |")
    side_task_arithmetic(backbone, x)
    compiled_graphs(backbone, x, args.repeats)


if __name__ == "__main__":
    main()
