"""A side task's tuner + head compiled to one ONNX Runtime session: taps in, raw head tensors out.

On the CPU this runs several times faster than eager torch for the small convolutions of a
tuner and a light head (ARCHITECTURE.md, cost model). Decoding and NMS stay in torch
(:meth:`DetectionHead.candidates`), so a compiled task and its torch model share every step
after the head. Only side tasks compile: an inline task's forward runs its own backbone pass.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from models.backbones.base import FrozenBackbone
from models.heads import HeadOutputs
from models.runtime.onnx import OPSET, export_atomic, make_session, to_numpy
from tuners.fold import fold_calibration
from tuners.task_model import TaskModel

IMAGES = "images"
GRAPH_VERSION = 2  # 2: calibrations folded into the head's laterals (tuners.fold)


class _TaskGraph(nn.Module):
    """``(images?, *taps) -> head tensors`` in ``outputs`` order, for export; calibrations folded
    into the head where that is cheaper (:func:`tuners.fold.fold_calibration`)."""

    def __init__(self, model: TaskModel, taps: list[str], outputs: list[str], fold: bool = True) -> None:
        super().__init__()
        self.model, self.tap_names, self.outputs = model, taps, outputs
        self.folded = fold_calibration(model) if fold else None

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        images = inputs[0] if self.model.tuner.needs_images else None
        taps = dict(zip(self.tap_names, inputs[1:] if images is not None else inputs))
        out = self.folded(taps, images) if self.folded is not None else self.model.head_outputs(taps, images)
        return tuple(out.tensors[k] for k in self.outputs)


def graph_key(manifest: dict[str, Any], backbone: FrozenBackbone) -> str:
    """Names one compiled graph: the task's weights and architecture, the backbone and the canvas."""
    what = {k: manifest.get(k) for k in ("method", "config", "head", "labels", "weights_sha256")}
    what.update(fingerprint=backbone.fingerprint, canvas=backbone.preprocess.canvas, opset=OPSET, graph=GRAPH_VERSION)
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:24]


class CompiledTask:
    """Runs ``model.head_outputs`` in ONNX Runtime; outputs agree with torch within 1e-3 (tested).

    Args:
        model: a side task model, in eval mode (a copy is exported; ``model`` is left alone).
        backbone: the backbone whose taps feed it (for tap shapes and the canvas).
        path: the ``.onnx`` file; reused when it exists (it is named by :func:`graph_key`).
        device: ``cpu``, ``cuda`` or ``auto`` for the session.
        threads: intra-op threads (0: one per core).
        fold: fold affine calibrations into the head where cheaper (:mod:`tuners.fold`); off only
            to measure what folding saves (``bench.head_cost``).

    Attributes:
        folded_levels: levels whose calibration the export folded into the head (:mod:`tuners.fold`).
    """

    def __init__(
        self,
        model: TaskModel,
        backbone: FrozenBackbone,
        path: Path,
        device: str = "cpu",
        threads: int = 0,
        fold: bool = True,
    ) -> None:
        if model.kind != "side":
            raise ValueError(f"only side tasks compile; {model.method} is {model.kind}")
        canvas, probe = backbone.preprocess.canvas, torch.Generator().manual_seed(0)
        self.taps = list(model.required_taps())
        self.needs_images = model.tuner.needs_images
        taps = {  # a seeded probe, not zeros: the export is checked against torch on it
            t: torch.rand(1, spec.channels, canvas // spec.stride, canvas // spec.stride, generator=probe)
            for t, spec in ((t, backbone.feature_spec[t]) for t in self.taps)
        }
        images = torch.rand(1, 3, canvas, canvas, generator=probe)
        graph = copy.deepcopy(model).cpu().eval()
        with torch.no_grad():
            reference = graph.head_outputs(taps, images if self.needs_images else None)
        self.outputs, self.level_shapes = sorted(reference.tensors), reference.level_shapes
        inputs = ([IMAGES] if self.needs_images else []) + self.taps
        args = tuple(([images] if self.needs_images else []) + [taps[t] for t in self.taps])
        task_graph = _TaskGraph(graph, self.taps, self.outputs, fold)
        self.folded_levels = sum(task_graph.folded.folded) if task_graph.folded is not None else 0
        for attempt in range(2):  # a graph on disk that disagrees (written from other weights) is exported again
            export_atomic(task_graph, args, path, inputs, self.outputs)
            self.session = make_session(path, device, threads)
            self.inputs = [i.name for i in self.session.get_inputs()]  # the exporter drops inputs the task never reads
            got = self(taps, images).tensors
            if all(torch.allclose(got[k], reference.tensors[k], rtol=1e-3, atol=1e-3) for k in self.outputs):
                break
            path.unlink(missing_ok=True)
            if attempt:
                raise RuntimeError(f"the compiled graph of {model.method} disagrees with torch beyond 1e-3")
        self.provider = self.session.get_providers()[0]

    def __call__(self, taps: dict[str, Tensor], images: Tensor | None = None) -> HeadOutputs:
        """``{tap: [B, C, h, w]}`` (and the ``[B, 3, S, S]`` canvas when the tuner reads it) -> head outputs."""
        if IMAGES in self.inputs and images is None:
            raise ValueError("this task's tuner reads the canvas images; pass them")
        feeds = {name: to_numpy(images if name == IMAGES else taps[name]) for name in self.inputs}  # type: ignore[arg-type]
        arrays = self.session.run(self.outputs, feeds)
        return HeadOutputs({k: torch.from_numpy(a) for k, a in zip(self.outputs, arrays)}, self.level_shapes)
