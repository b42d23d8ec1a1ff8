"""The backbone executors on CUDA (skipped without a GPU): IEEE float32 matches the CPU, fp16 and
bf16 autocast stay near it, and CUDA graphs replay the eager pass, keep padded rows out, and return
outputs that a later replay does not overwrite."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor

from models import FrozenBackbone
from models.runtime import build_runtime
from models.runtime.cuda_graphs import CudaGraphRuntime
from models.runtime.torch import set_float32_precision
from models.transform import ImageTransform
from server.imaging import decode_image
from tests.conftest import needs_cuda
from tuners.data.synth import photo

pytestmark = needs_cuda

# Relative L2 error of a tap against float32, at the worst tap (c5): 4.6e-3 (fp16) and 5.2e-2 (bf16)
# under CPU autocast at 128 px, 5.5e-3 and 8.0e-2 on an H200 at 320 px (docs/BENCHMARKS.md, GPU).
# The bounds leave room for other inputs; a lost autocast (0) or a wrong cast (NaN, or errors near 1) fails.
AUTOCAST_BOUNDS = {"fp16": 2e-2, "bf16": 2e-1}


def _images(backbone: FrozenBackbone) -> Tensor:
    """``[4, 3, S, S]``: a real photo on the canvas, then three random rows."""
    image = decode_image(photo("astronaut.png").read_bytes(), 1 << 26, 1 << 26)
    canvas = ImageTransform(backbone.preprocess).one(image)[0]
    return torch.cat([canvas[None], torch.randn(3, *canvas.shape, generator=torch.Generator().manual_seed(0))])


def _relative(a: Tensor, b: Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm())


def test_cuda_float32_matches_the_cpu_and_autocast_stays_near_it(mobilenet: FrozenBackbone) -> None:
    taps = sorted(set(mobilenet.stage_taps) | set(mobilenet.pyramid_taps))
    x = _images(mobilenet)
    ref = build_runtime(mobilenet, "torch", "cpu")(x, taps)
    gpu = copy.deepcopy(mobilenet)
    set_float32_precision("fp32")
    got = build_runtime(gpu, "torch", "cuda")(x, taps)
    for tap in taps:
        assert got[tap].device.type == "cuda" and got[tap].dtype == torch.float32
        torch.testing.assert_close(got[tap].cpu(), ref[tap], rtol=0, atol=1e-3, msg=f"tap {tap}")
    for dtype, bound in AUTOCAST_BOUNDS.items():
        set_float32_precision(dtype)
        low = build_runtime(gpu, "torch", "cuda", dtype=dtype)(x, taps)
        errors = {tap: _relative(low[tap], ref[tap]) for tap in taps}
        assert all(0 < e <= bound for e in errors.values()), (dtype, errors)  # 0: autocast never ran
        assert all(low[tap].dtype == torch.float32 for tap in taps)  # taps leave the runtime in float32
    set_float32_precision("fp32")


def test_cuda_graphs_replay_the_eager_pass(mobilenet: FrozenBackbone) -> None:
    set_float32_precision("fp32")
    backbone = copy.deepcopy(mobilenet)
    graphs = build_runtime(backbone, "torch", "cuda", cuda_graphs=True)
    assert isinstance(graphs, CudaGraphRuntime)
    taps, x = list(backbone.pyramid_taps), _images(backbone).cuda()
    got = graphs(x[:3], taps)  # bucket 4: one padded row
    eager = graphs.eager(torch.cat([x[:3], torch.zeros_like(x[:1])]), taps)
    for tap in taps:
        assert got[tap].shape[0] == 3
        torch.testing.assert_close(got[tap], eager[tap][:3], rtol=1e-5, atol=1e-5, msg=f"tap {tap}")
    alone = graphs(x[:1], taps)  # bucket 1, another graph: a row's taps do not depend on its batch
    for tap in taps:
        torch.testing.assert_close(alone[tap], got[tap][:1], rtol=1e-4, atol=1e-4, msg=f"tap {tap}")
    kept = {tap: v.clone() for tap, v in got.items()}
    graphs(x[1:4].flip(0), taps)  # the same graph again, on other inputs
    assert all(torch.equal(got[tap], kept[tap]) for tap in taps)  # outputs are the caller's own
    above = graphs(torch.randn(33, *x.shape[1:], device="cuda"), taps[:1])  # past the largest bucket: eager
    assert above[taps[0]].shape[0] == 33 and len(graphs._graphs) == 2


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_cuda_graphs_replay_autocast_too(mobilenet: FrozenBackbone, dtype: str) -> None:
    set_float32_precision(dtype)
    backbone = copy.deepcopy(mobilenet)
    graphs = build_runtime(backbone, "torch", "cuda", dtype=dtype, cuda_graphs=True)
    taps, x = list(backbone.pyramid_taps), _images(backbone).cuda()
    got, eager = graphs(x, taps), graphs.eager(x, taps)
    for tap in taps:
        assert got[tap].dtype == torch.float32
        torch.testing.assert_close(got[tap], eager[tap], rtol=1e-3, atol=1e-3, msg=f"tap {tap}")
    set_float32_precision("fp32")
