"""The backbone executors: ONNX Runtime agrees with torch on every tap, stops at the deepest tap,
reuses its exports, never spins, and reports the provider it really runs on."""

from __future__ import annotations

import gc
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
import torch

from models import PreprocessSpec, build_backbone, list_backbones
from models.runtime import build_runtime
from models.runtime.onnx import NO_SPIN, OnnxRuntime, export_path, make_session, run_bound
from models.runtime.torch import default_runtime


def _backbone(name: str):  # noqa: ANN202
    weights = None if name == "mobilenet_v2" else "random"  # the real offline weights where we have them
    return build_backbone(name, weights=weights, allow_download=False, preprocess=PreprocessSpec(size=64))


@pytest.mark.parametrize("name", list_backbones())
def test_onnx_matches_torch_on_every_tap(name: str, tmp_path: Path) -> None:
    backbone = _backbone(name)
    taps = list(backbone.feature_spec)  # every tap any task may read
    onnx_rt = build_runtime(backbone, "onnx", "auto", taps=taps, cache_dir=tmp_path)
    expected = "CUDAExecutionProvider" if _onnx_cuda() else "CPUExecutionProvider"
    assert onnx_rt.provider == expected
    x = torch.randn(2, 3, 64, 64)
    got, ref = onnx_rt(x, taps), build_runtime(backbone, "torch", "cpu")(x, taps)
    assert set(got) == set(taps)
    for tap in taps:
        torch.testing.assert_close(got[tap].cpu(), ref[tap], rtol=0, atol=1e-3, msg=f"tap {tap}")


def test_one_graph_per_tap_set_stops_at_the_deepest_tap_and_is_reused(tmp_path: Path) -> None:
    backbone = _backbone("mobilenet_v2")
    runtime = OnnxRuntime(backbone, ["c3"], tmp_path, "cpu")
    runtime(torch.zeros(1, 3, 64, 64), ["c2", "c3", "c4", "c5"])
    shallow = onnx.load(export_path(backbone, ["c3"], tmp_path))
    deep = onnx.load(export_path(backbone, ["c2", "c3", "c4", "c5"], tmp_path))
    assert len(shallow.graph.initializer) < len(deep.graph.initializer) / 2  # c3 ends block 6 of 18
    assert [o.name for o in shallow.graph.output] == ["c3"]
    assert sorted(runtime.taps) == ["c2", "c3", "c4", "c5"] and runtime.exports == 2
    files = {p: p.stat().st_mtime_ns for p in tmp_path.glob("*.onnx")}
    again = OnnxRuntime(backbone, ["c2", "c3", "c4", "c5"], tmp_path, "cpu")
    assert {p: p.stat().st_mtime_ns for p in tmp_path.glob("*.onnx")} == files  # read back, not exported again
    assert again.tap_sets == [["c2", "c3", "c4", "c5"]]


def test_sessions_never_spin_and_use_the_given_threads(tmp_path: Path) -> None:
    runtime = OnnxRuntime(_backbone("mobilenet_v2"), ["c5"], tmp_path, "cpu", threads=2)
    options = runtime.prepare(["c5"]).get_session_options()
    assert [options.get_session_config_entry(key) for key in NO_SPIN] == ["0", "0"]
    assert options.intra_op_num_threads == 2


def test_onnx_is_the_cpu_default_and_cuda_is_never_faked(tmp_path: Path) -> None:
    assert default_runtime(torch.device("cpu")) == "onnx" and default_runtime(torch.device("cuda")) == "torch"
    backbone = _backbone("mobilenet_v2")
    runtime = build_runtime(backbone, "auto", "cpu", cache_dir=tmp_path)
    assert isinstance(runtime, OnnxRuntime) and runtime.provider == "CPUExecutionProvider"
    if _onnx_cuda():
        cuda = build_runtime(backbone, "onnx", "cuda", cache_dir=tmp_path)
        assert cuda.provider == "CUDAExecutionProvider" and cuda(torch.zeros(1, 3, 64, 64), ["c5"])["c5"].is_cuda
    else:  # no GPU, or an onnxruntime without its CUDA provider: asking for CUDA raises, never runs on the CPU
        with pytest.raises(RuntimeError, match="CUDA"):
            build_runtime(backbone, "onnx", "cuda", cache_dir=tmp_path)


def _onnx_cuda() -> bool:
    """Whether ONNX Runtime can run on CUDA here: a GPU torch sees, and an onnxruntime built with the
    CUDA provider (its provider list is a build-time fact: it names CUDA on machines with no GPU)."""
    return torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers()


def test_taps_are_bound_in_and_out_and_outlive_the_run(tmp_path: Path) -> None:
    """I/O binding hands the session's own output buffers to torch: they must hold what a plain run
    returns, also after the binding is gone and later runs have allocated again, and a strided input
    must be read as its values, not its storage."""
    backbone = _backbone("mobilenet_v2")
    runtime = OnnxRuntime(backbone, ["c3", "c5"], tmp_path, "cpu")
    session, names = runtime.prepare(["c3", "c5"]), ["c3", "c5"]
    x = torch.randn(2, 3, 64, 64)
    strided = torch.randn(2, 64, 64, 3).permute(0, 3, 1, 2)  # channels-last storage
    kept = [runtime(x, names), runtime(strided, names)]
    for _ in range(3):
        runtime(torch.randn(2, 3, 64, 64), names)
    gc.collect()
    for got, given in zip(kept, (x, strided)):
        plain = session.run(names, {"images": given.contiguous().numpy()})
        for tap, ref in zip(names, plain):
            assert got[tap].device.type == "cpu" and got[tap].dtype == torch.float32
            torch.testing.assert_close(got[tap], torch.from_numpy(ref), rtol=0, atol=0)


def test_an_output_of_unknown_shape_is_handed_over_through_dlpack(tmp_path: Path) -> None:
    """Outputs static past the batch axis are written into tensors torch made; one whose spatial size
    follows the input's (unknown to the graph) is taken from the session's own memory, in its place."""

    class TwoOutputs(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            y = self.conv(x)
            return y, y.mean(dim=(2, 3), keepdim=True)

    path = tmp_path / "two.onnx"
    axes = {"x": {0: "b", 2: "h", 3: "w"}, "free": {0: "b", 2: "h", 3: "w"}, "fixed": {0: "b"}}
    torch.onnx.export(
        TwoOutputs(),
        (torch.zeros(1, 3, 8, 8),),
        str(path),
        input_names=["x"],
        output_names=["free", "fixed"],
        dynamic_axes=axes,
        dynamo=False,
    )
    session = make_session(path, "cpu")
    x = torch.randn(2, 3, 10, 12)
    for order in (["free", "fixed"], ["fixed", "free"]):
        got = run_bound(session, {"x": x}, order, torch.device("cpu"))
        plain = dict(zip(["free", "fixed"], session.run(["free", "fixed"], {"x": x.numpy()})))
        assert [tuple(t.shape) for t in got] == [plain[name].shape for name in order]
        for name, t in zip(order, got):
            torch.testing.assert_close(t, torch.from_numpy(plain[name]), rtol=0, atol=0)
