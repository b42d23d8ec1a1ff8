"""``server-export``: a task as one ONNX graph, backbone + tuner + head up to decoded boxes and scores.

Input ``images``: ``[B, 3, S, S]`` float, the backbone's canvas (longest side resized to S, padded
bottom-right, normalised with the mean and std in the graph's metadata). Outputs ``boxes``
``[B, N, 4]`` (xyxy canvas pixels) and ``scores`` ``[B, N, C]``, before any threshold: run a
class-wise NMS after it, or :func:`models.postprocess.from_dense`, which is what the server does.
The export is checked in ONNX Runtime against torch on a real photo (1e-3) before it is kept.

``--merge`` (``lora``, ``bitfit``) folds the task's backbone deltas into a copy of the backbone,
as PEFT's ``merge_and_unload`` does: ``OUT.backbone.safetensors`` (a state dict in the backbone's
own names, for ``FrozenBackbone.load_state_dict``) and a graph that runs the plain merged backbone.

    server-export runs/digits/best --out digits.onnx
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from models.backbones.base import FrozenBackbone
from models.files import replacing
from models.imaging import read_image
from models.runtime.onnx import OPSET, make_session
from models.transform import ImageTransform
from tuners.commands import UsageError, run
from tuners.data.synth import photo
from tuners.task_model import TaskModel
from tuners.tools.common import Task, add_task_arguments, load_task

TOLERANCE = 1e-3


class TaskGraph(nn.Module):
    """``images [B, 3, S, S] -> (boxes [B, N, 4], scores [B, N, C])`` for one task."""

    def __init__(self, backbone: FrozenBackbone, model: TaskModel, merged: bool = False) -> None:
        super().__init__()
        self.backbone, self.model, self.merged = backbone, model, merged

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        if self.merged:  # the merged backbone's plain pass feeds the head directly
            taps = self.backbone(images, self.model.required_taps())
            outputs = self.model.head_outputs(taps, images)
        else:
            outputs = self.model(self.backbone, images)
        return self.model.head.dense(outputs)


def merge(task: Task, out: Path) -> FrozenBackbone:
    """A copy of the backbone with the task's deltas folded in, saved as ``OUT.backbone.safetensors``."""
    merged_tensors = getattr(task.model.tuner, "merged", None)
    if merged_tensors is None:
        raise UsageError(f"--merge folds lora or bitfit deltas into the backbone; {task.manifest['method']} has none")
    backbone = copy.deepcopy(task.backbone)
    with torch.no_grad():
        replaced = merged_tensors(task.backbone)
        state = {name: replaced.get(name, tensor) for name, tensor in backbone.state_dict().items()}
        backbone.load_state_dict(state)
    save_file(
        {k: v.detach().contiguous().cpu() for k, v in state.items()}, str(out.with_suffix(".backbone.safetensors"))
    )
    return backbone


def export(graph: TaskGraph, canvas: int, out: Path, metadata: dict[str, str]) -> None:
    """Legacy exporter (batch axis dynamic), metadata added, written atomically."""
    with replacing(out) as tmp:
        batch = {name: {0: "batch"} for name in ("images", "boxes", "scores")}
        example = (torch.zeros(1, 3, canvas, canvas),)
        torch.onnx.export(graph.eval(), example, str(tmp), input_names=["images"], output_names=["boxes", "scores"],
                          opset_version=OPSET, dynamo=False, dynamic_axes=batch)  # fmt: skip
        model = onnx.load(tmp)
        for key, value in metadata.items():
            model.metadata_props.add(key=key, value=value)
        onnx.save(model, tmp)


@torch.no_grad()
def check(reference: TaskGraph, out: Path, canvas_images: Tensor) -> float:
    """Largest difference between ONNX Runtime's outputs and torch's; raises above :data:`TOLERANCE`."""
    session = make_session(out, "cpu")
    got = session.run(None, {"images": canvas_images.numpy()})
    want = [t.numpy() for t in reference(canvas_images)]
    worst = max(float(np.abs(g - w).max()) for g, w in zip(got, want))
    if worst > TOLERANCE:
        raise RuntimeError(f"the exported graph differs from torch by {worst:.2e} (> {TOLERANCE}); not kept")
    return worst


def main_export(args: argparse.Namespace) -> int:
    if args.out.suffix != ".onnx":
        raise UsageError(f"--out must name a .onnx file, not {args.out}")
    task = load_task(args.artifact, args.weights, "cpu")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    backbone = merge(task, args.out) if args.merge else task.backbone
    graph = TaskGraph(backbone, task.model, merged=args.merge)
    spec = task.backbone.preprocess
    metadata = {"labels": json.dumps(task.manifest["labels"]), "preprocess": json.dumps(spec.to_dict()),
                "method": task.manifest["method"], "weights_sha256": task.manifest["weights_sha256"]}  # fmt: skip
    export(graph, spec.canvas, args.out, metadata)
    images = [read_image(photo(name)) for name in ("astronaut.png", "coffee.png")]
    canvas, _ = ImageTransform(spec)(images)
    worst = check(TaskGraph(task.backbone, task.model), args.out, canvas)  # against the unmerged task
    result = {"onnx": str(args.out), "max_abs_difference_vs_torch": worst, "inputs": {"images": [-1, 3, spec.canvas,
              spec.canvas]}, "outputs": ["boxes", "scores"], "merged_backbone": str(args.out.with_suffix(
              ".backbone.safetensors")) if args.merge else None}  # fmt: skip
    sys.stdout.write(json.dumps(result, indent=2) + "\n")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="server-export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add_task_arguments(p)
    p.add_argument("--out", type=Path, required=True, help="the .onnx file to write")
    p.add_argument("--merge", action="store_true", help="lora, bitfit: fold the deltas into a backbone copy")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return run("server-export", lambda: main_export(args), args.verbose)


if __name__ == "__main__":
    raise SystemExit(main())
