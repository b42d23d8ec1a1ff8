"""The ONNX Runtime executor: one exported graph per tap set, each stopping at its deepest tap.

Exports are cached on disk, keyed by backbone fingerprint, taps, opset and canvas size, and
written atomically. Sessions never spin: ONNX Runtime's intra-op threads would otherwise keep
busy-waiting after each run and take the cores from the torch code that follows (task heads).
The session asks for CUDA when torch sees a GPU and reports the provider it actually got
(``session.get_providers()``): onnxruntime falls back to the CPU silently. Runs bind torch tensors
in and out (I/O binding): under the CUDA provider the taps stay in CUDA memory, where
side tasks read them, with no round trip through the host.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import threading
from collections.abc import Collection
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import Tensor, nn

from models.backbones.base import FrozenBackbone
from models.files import replacing

logger = logging.getLogger(__name__)

OPSET = 17
# torch's legacy exporter keeps process-global state: two exports at once (a task compiling on its
# thread while the engine exports a new tap set) fail its "not already exporting" assertion.
_EXPORT_LOCK = threading.Lock()
NO_SPIN = ("session.intra_op.allow_spinning", "session.inter_op.allow_spinning")


def session_options(threads: int = 0) -> ort.SessionOptions:
    """Options for every session here: no spinning, ``threads`` intra-op threads (0: one per core)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    for key in NO_SPIN:
        options.add_session_config_entry(key, "0")
    return options


def make_session(path: Path, device: str, threads: int = 0) -> ort.InferenceSession:
    """A session on CUDA when asked for (``cuda`` or ``cuda:N``) or available (``auto``), else the CPU.
    On CUDA, convolutions run in IEEE float32 (no TF32), as the torch runtime's ``fp32`` does.

    Raises:
        RuntimeError: ``cuda`` was asked for and onnxruntime fell back to the CPU.
    """
    want_cuda = device != "cpu" and torch.cuda.is_available()
    providers: list[str | tuple[str, dict[str, str]]] = ["CPUExecutionProvider"]
    if want_cuda:
        _load_cuda_libraries()
        index = torch.device(device).index if device.startswith("cuda") else None
        options = {"device_id": str(torch.cuda.current_device() if index is None else index), "use_tf32": "0"}
        providers.insert(0, ("CUDAExecutionProvider", options))
    session = ort.InferenceSession(str(path), session_options(threads), providers=providers)
    if device.startswith("cuda") and session.get_providers()[0] != "CUDAExecutionProvider":
        raise RuntimeError(f"CUDA was requested but onnxruntime runs on {session.get_providers()}")
    return session


@functools.cache
def _load_cuda_libraries() -> None:
    """Loads the CUDA and cuDNN libraries ONNX Runtime's CUDA provider links against (torch's, or the
    ``nvidia-*`` packages'), once: without them the provider falls back to the CPU."""
    if hasattr(ort, "preload_dlls"):
        try:
            ort.preload_dlls()
        except Exception as e:  # noqa: BLE001  (make_session says whether the provider loaded)
            logger.warning("onnxruntime could not preload the CUDA libraries: %s", e)


def session_device(session: ort.InferenceSession) -> torch.device:
    """Where ``session`` computes: the CUDA device its CUDA provider was given, else the CPU."""
    if session.get_providers()[0] != "CUDAExecutionProvider":
        return torch.device("cpu")
    return torch.device("cuda", int(session.get_provider_options()["CUDAExecutionProvider"]["device_id"]))


def run_bound(
    session: ort.InferenceSession, feeds: dict[str, Tensor], outputs: list[str], device: torch.device
) -> list[Tensor]:
    """Runs ``session`` on torch tensors with no copy in or out: each input is bound where it lies, and
    the session writes each output into a torch tensor on ``device`` (:func:`session_device`) made for
    it, so torch owns the memory (ONNX Runtime's arena keeps none of it). An output whose shape is not
    static past the batch axis is left in the session's memory and handed over through DLPack. Inputs
    must be float32 and share their batch size."""
    binding = session.io_binding()
    kept = []  # the contiguous inputs live until the run ends
    for name, x in feeds.items():
        x = x.contiguous()
        if x.is_cuda:
            torch.cuda.current_stream(x.device).synchronize()  # the provider reads it on a stream of its own
        binding.bind_input(name, x.device.type, x.device.index or 0, np.float32, list(x.shape), x.data_ptr())
        kept.append(x)
    batch, shapes = kept[0].shape[0], {o.name: o.shape[1:] for o in session.get_outputs()}
    made: dict[str, Tensor] = {}
    for name in outputs:
        if all(isinstance(d, int) for d in shapes[name]):
            out = made[name] = torch.empty((batch, *shapes[name]), dtype=torch.float32, device=device)
            binding.bind_output(name, device.type, device.index or 0, np.float32, list(out.shape), out.data_ptr())
        else:
            binding.bind_output(name, device.type, device.index or 0)
    session.run_with_iobinding(binding)
    values = binding.get_outputs()  # in binding order
    return [made[name] if name in made else torch.from_dlpack(value) for name, value in zip(outputs, values)]


def export_atomic(module: nn.Module, args: tuple, path: Path, input_names: list[str], output_names: list[str]) -> Path:
    """Exports ``module`` with the legacy exporter (batch axis dynamic) unless ``path`` exists; atomic."""
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with _EXPORT_LOCK, replacing(path) as tmp:
        _export(module, args, str(tmp), input_names, output_names)
    return path


def _export(module: nn.Module, args: tuple, tmp: str, input_names: list[str], output_names: list[str]) -> None:
    torch.onnx.export(
        module,
        args,
        tmp,
        input_names=input_names,
        output_names=output_names,
        dynamic_axes={name: {0: "batch"} for name in [*input_names, *output_names]},
        opset_version=OPSET,
        dynamo=False,
    )


class _TapGraph(nn.Module):
    def __init__(self, backbone: FrozenBackbone, taps: list[str]) -> None:
        super().__init__()
        self.backbone, self.taps = backbone, taps

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        out = self.backbone(images, self.taps)
        return tuple(out[t] for t in self.taps)


def export_path(backbone: FrozenBackbone, taps: list[str], cache_dir: Path, opset: int = OPSET) -> Path:
    key = f"{backbone.fingerprint}|{','.join(taps)}|{opset}|{backbone.preprocess.canvas}"
    return cache_dir / f"{backbone.name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.onnx"


def export_onnx(backbone: FrozenBackbone, taps: list[str], cache_dir: Path) -> Path:
    """Exports (or reuses) the graph that returns ``taps`` and stops after the deepest of them."""
    path = export_path(backbone, taps, cache_dir)
    if not path.is_file():
        canvas = backbone.preprocess.canvas
        graph = _TapGraph(backbone, taps)
        export_atomic(graph, (torch.zeros(1, 3, canvas, canvas, device=_device_of(backbone)),), path, ["images"], taps)
        logger.info("exported %s taps %s to %s", backbone.name, taps, path)
    return path


def _device_of(module: nn.Module) -> torch.device:
    return next(iter(module.parameters())).device


def to_numpy(x: Tensor) -> np.ndarray:
    return x.detach().to("cpu", torch.float32).contiguous().numpy()


class OnnxRuntime:
    """Runs the backbone in ONNX Runtime. Inputs must be on the canvas of the backbone's preprocess spec.

    Args:
        backbone: the frozen backbone (exported from its own device).
        taps: tap sets to prepare now (more are exported on first use, see :meth:`prepare`).
        cache_dir: where exported graphs are kept.
        device: ``auto``, ``cpu`` or ``cuda``.
        threads: intra-op threads per session (0: one per core).
    """

    def __init__(
        self,
        backbone: FrozenBackbone,
        taps: Collection[str],
        cache_dir: Path,
        device: str = "auto",
        threads: int = 0,
    ) -> None:
        self.backbone, self.cache_dir, self.device_name, self.threads = backbone, cache_dir, device, threads
        self._sessions: dict[frozenset[str], tuple[list[str], ort.InferenceSession]] = {}
        self._lock = threading.Lock()
        self.exports = 0  # graphs exported or loaded by this runtime (tests read it)
        self.concurrent = True  # InferenceSession.run is thread-safe; only an export reads the torch module
        first = self.prepare(taps)
        self.provider, self.device = first.get_providers()[0], session_device(first)

    @property
    def taps(self) -> list[str]:
        return sorted({t for key in self._sessions for t in key})

    @property
    def tap_sets(self) -> list[list[str]]:
        return [names for names, _ in self._sessions.values()]

    def prepare(self, taps: Collection[str]) -> ort.InferenceSession:
        """The session for exactly ``taps``: exported and built on first call, then reused."""
        key = frozenset(taps)
        with self._lock:
            found = self._sessions.get(key)
            if found is None:
                names = sorted(key, key=lambda t: (self.backbone.feature_spec[t].depth, t))
                path = export_onnx(self.backbone, names, self.cache_dir)
                found = self._sessions[key] = (names, make_session(path, self.device_name, self.threads))
                self.exports += 1
            return found[1]

    def __call__(self, images: Tensor, taps: Collection[str]) -> dict[str, Tensor]:
        """``[B, 3, S, S]`` canvas batch -> ``{tap: [B, C, h, w]}`` float32 on this runtime's device
        (CUDA under the CUDA provider, where side tasks read them; the CPU otherwise)."""
        session = self.prepare(taps)
        names = self._sessions[frozenset(taps)][0]
        feeds = {"images": images.to(self.device, torch.float32)}
        return dict(zip(names, run_bound(session, feeds, names, self.device)))
