"""The artifact: a folder with ``tuner.safetensors`` (the task's tensors only) and ``tuner.json``.

Reading is strict and never unpickles: every missing, extra or mis-shaped key and every NaN or
Inf tensor is reported in one :class:`ArtifactError`; a different backbone fingerprint raises
:class:`IncompatibleBackboneError`. An upload's layout is checked against the model its manifest
describes, built on the meta device, before any tensor is allocated. Writing is atomic: temp
folder, fsync, rename.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from models.backbones.base import FrozenBackbone
from models.files import replacing_folder
from tuners.base import TUNERS
from tuners.errors import ArtifactError, IncompatibleBackboneError, TunerError
from tuners.manifest import field_problems
from tuners.read_plan import ReadPlan
from tuners.task_model import TaskModel, architecture_key, build_task_model

# 2: the manifest's "head" holds every option of the head. A version-1 manifest holds only the options
# given at training, and its head is read with the defaults of that time (LEGACY_HEAD_DEFAULTS).
FORMAT_VERSION = 2
LEGACY_HEAD_DEFAULTS = {"light": {"width": 96, "num_convs": 2}}
WEIGHTS, MANIFEST = "tuner.safetensors", "tuner.json"
UPLOAD_LIMIT_BYTES = 512 << 20  # the largest artifact a server accepts by default (its max_upload_bytes)
BUILD_ERRORS = (TunerError, KeyError, TypeError, ValueError, RuntimeError)  # a manifest's options that do not build
# (RuntimeError: torch's, on a bad size)
REQUIRED = ("format_version", "method", "config", "head", "labels", "backbone", "preprocess", "weights_sha256")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def parse_json(data: bytes | str) -> Any:
    """``json.loads`` for documents from users (manifests, safetensors headers). Every way one can be
    unreadable raises ``ValueError``: malformed, not UTF-8, or nested deeper than Python's parser
    recurses (``RecursionError`` there)."""
    try:
        return json.loads(data)
    except RecursionError as e:
        raise ValueError("the JSON is nested too deeply") from e


def write_artifact_files(folder: Path, tensors: dict[str, torch.Tensor], manifest: dict[str, Any]) -> None:
    """Writes the two files into an existing (temporary) folder."""
    weights = folder / WEIGHTS
    save_file(
        {k: v.detach().contiguous().cpu() for k, v in tensors.items()},
        str(weights),
        metadata={"format": "pt", "method": str(manifest["method"])},
    )
    manifest = {**manifest, "weights_sha256": _sha256(weights), "weights_bytes": weights.stat().st_size}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))


def save_artifact(
    model: TaskModel, backbone: FrozenBackbone, out: Path, metrics: dict | None = None, provenance: dict | None = None
) -> Path:
    """Atomically writes ``model`` to folder ``out`` (replacing an existing one)."""
    manifest = {
        "format_version": FORMAT_VERSION,
        "method": model.method,
        "kind": model.kind,
        "carries_backbone_copy": bool(getattr(model.tuner, "carries_backbone_copy", False)),
        "config": model.tuner.config.to_dict(),
        "head": model.head_config,
        "labels": model.labels,
        "backbone": {"name": backbone.name, "fingerprint": backbone.fingerprint},
        "preprocess": backbone.preprocess.to_dict(),
        "metrics": metrics or {},
        "provenance": provenance or {},
    }
    with replacing_folder(out) as tmp:
        write_artifact_files(tmp, model.state_dict(), manifest)
    return out


def read_manifest(folder: Path) -> dict[str, Any]:
    try:
        manifest = parse_json((folder / MANIFEST).read_bytes())
    except FileNotFoundError as e:
        raise ArtifactError([f"{MANIFEST} is missing"]) from e
    except ValueError as e:
        raise ArtifactError([f"{MANIFEST} is not valid JSON: {e}"]) from e
    if not isinstance(manifest, dict):
        raise ArtifactError([f"{MANIFEST} must hold a JSON object"])
    problems = [f"{MANIFEST} lacks '{k}'" for k in REQUIRED if k not in manifest] + field_problems(manifest, MANIFEST)
    if isinstance(manifest.get("method"), str) and manifest["method"] not in TUNERS:
        problems.append(f"unknown method {manifest['method']!r}; known: {', '.join(TUNERS.names())}")
    if manifest.get("format_version") not in (1, FORMAT_VERSION):
        problems.append(f"format_version {manifest.get('format_version')!r} is not 1 or {FORMAT_VERSION}")
    if problems:
        raise ArtifactError(problems)
    return upgrade_manifest(manifest)


def upgrade_manifest(manifest: dict[str, Any]) -> dict[str, Any]:
    """A version-1 manifest as version 2: its head's options completed with the defaults it was trained
    with, which later versions changed. Other versions come back as they are."""
    if manifest["format_version"] != 1 or not isinstance(manifest["head"], dict):
        return manifest
    head = {"name": "light", **manifest["head"]}
    return {
        **manifest,
        "format_version": FORMAT_VERSION,
        "head": {**LEGACY_HEAD_DEFAULTS.get(head["name"], {}), **head},
    }


DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip


def _read_header(f: Any, size: int) -> tuple[dict[str, Any], int]:
    """The header's entries (unchecked, see :func:`_check_entries`) and the offset where tensor data starts.

    Raises:
        ValueError: the header does not fit the file, or is not a JSON object.
    """
    raw = f.read(8)
    if len(raw) < 8:
        raise ValueError("the file is shorter than a safetensors header")
    (length,) = struct.unpack("<Q", raw)
    if length > min(size - 8, 100 << 20):
        raise ValueError(f"header length {length} does not fit the file")
    header = parse_json(f.read(length))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    header.pop("__metadata__", None)
    return header, 8 + length


def _check_entries(header: dict[str, Any]) -> None:
    """Raises ``ValueError`` unless every entry has a string ``dtype``, a ``shape`` of integers and two
    integer ``data_offsets``."""
    for key, info in header.items():
        if not (
            isinstance(info, dict)
            and isinstance(info.get("dtype"), str)
            and _ints(info.get("shape"))
            and _ints(info.get("data_offsets"))
            and len(info["data_offsets"]) == 2
        ):
            raise ValueError(f"the header's entry for {key!r} is not a dtype, a shape and two data offsets")


def _ints(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


def _unreadable(e: ValueError) -> str:
    return f"{WEIGHTS} is not a readable safetensors file ({e}); pickle files are never read"


def _problems(header: dict[str, Any], base: int, size: int, state: dict[str, torch.Tensor]) -> list[str]:
    """Every problem of a file's header against ``state`` (missing, extra or mis-shaped key, wrong dtype,
    bad offsets), which may be on the meta device."""
    try:
        _check_entries(header)
    except ValueError as e:
        return [_unreadable(e)]
    problems = [f"missing key {k}" for k in sorted(set(state) - set(header))]
    problems += [f"extra key {k}" for k in sorted(set(header) - set(state))]
    for k in sorted(set(state) & set(header)):
        info, t = header[k], state[k]
        begin, end = info["data_offsets"]
        if tuple(info["shape"]) != tuple(t.shape):
            problems.append(f"{k}: shape {tuple(info['shape'])}, expected {tuple(t.shape)}")
        elif DTYPES.get(info["dtype"]) != t.dtype:
            problems.append(f"{k}: dtype {info['dtype']}, expected {t.dtype}")
        elif end - begin != t.numel() * t.element_size() or begin < 0 or base + end > size:
            problems.append(f"{k}: data offsets {begin}..{end} do not fit the tensor or the file")
    return problems


def layout_problems(path: Path, state: dict[str, torch.Tensor]) -> list[str]:
    """:func:`read_weights`'s checks alone, for tensors that need not exist yet (meta tensors)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        try:
            header, base = _read_header(f, size)
        except ValueError as e:
            return [_unreadable(e)]
    return _problems(header, base, size, state)


def read_weights(path: Path, model: nn.Module) -> list[str]:
    """Reads ``path`` (safetensors) straight into the tensors of ``model`` (``model.state_dict()``'s keys).

    The bytes go from the file into the tensors' own memory, with no intermediate copy and without
    ``safe_open``, which leaks about 8 KB per read (ENVIRONMENT.md). A file whose header entries this
    model was read from before (a reload into a spare model of the same architecture) is read with
    one system call and nothing else to check (:class:`~tuners.read_plan.ReadPlan`; tensors on a GPU,
    or in bfloat16, with one read through a staging buffer); any other is checked against the model
    first. Returns every problem (missing, extra or mis-shaped key, wrong dtype, bad offsets, a file
    shorter than its header says); the tensors are only written when there is none.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        try:
            header, base = _read_header(f, size)
        except ValueError as e:
            return [_unreadable(e)]
        plan = ReadPlan.of(model, header)
        if plan is None or base + plan.nbytes > size:
            state = model.state_dict()
            problems = _problems(header, base, size, state)
            if problems:
                return problems
            plan = ReadPlan.make(model, state, header)
        read = None
        if plan is not None:
            buffers = plan.buffers()
            read = os.preadv(f.fileno(), buffers, base) if buffers is not None else plan.read_staged(f, base)
        if read is None:  # no plan, or one that cannot fill these tensors in place
            _read_each(f, base, header, model.state_dict())
        elif read != plan.nbytes:  # type: ignore[union-attr]
            return [f"{WEIGHTS} is shorter than its header says"]
    return []


def _read_each(f: Any, base: int, header: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
    """Reads every tensor of ``state`` on its own, where one :class:`ReadPlan` call cannot fill them."""
    for k, t in state.items():
        f.seek(base + header[k]["data_offsets"][0])
        target = t.detach().cpu() if t.is_contiguous() else t.detach().cpu().contiguous()
        if target.numel():
            f.readinto(memoryview(target.reshape(-1).view(torch.uint8).numpy()))
        if target.data_ptr() != t.data_ptr():
            t.detach().copy_(target)


def build_spare(manifest: dict[str, Any], backbone: FrozenBackbone) -> TaskModel:
    """A model of the architecture ``manifest`` (read with :func:`read_manifest`) describes, with fresh
    weights, in eval mode: one to read a task of that architecture into (:func:`load_artifact`'s ``into``).

    Raises:
        IncompatibleBackboneError: the manifest was made for another backbone.
        ArtifactError: its options do not build.
    """
    check_backbone(manifest, backbone)
    try:
        return _build(manifest, backbone).eval()
    except BUILD_ERRORS as e:
        raise ArtifactError([f"cannot build {manifest['method']}: {e}"]) from e


def manifest_architecture(manifest: dict[str, Any]) -> str:
    """The :func:`~tuners.task_model.architecture_key` of the model ``manifest`` describes."""
    return architecture_key(manifest["method"], manifest["config"], manifest["head"], len(manifest["labels"]))


def check_backbone(manifest: dict[str, Any], backbone: FrozenBackbone) -> None:
    """Raises :class:`IncompatibleBackboneError` unless ``manifest`` was made for ``backbone`` (its fingerprint)."""
    fp = manifest["backbone"].get("fingerprint") if isinstance(manifest["backbone"], dict) else None
    if fp != backbone.fingerprint:
        raise IncompatibleBackboneError(
            f"artifact was trained on backbone {manifest['backbone']!r}; this server runs {backbone.name} "
            f"with fingerprint {backbone.fingerprint}"
        )


def _build(manifest: dict[str, Any], backbone: FrozenBackbone, device: str | None = None) -> TaskModel:
    with torch.device(device) if device else contextlib.nullcontext():
        return build_task_model(manifest["method"], manifest["config"], backbone, manifest["labels"], manifest["head"])


CHECK_ELEMENTS = 1 << 20
"""Elements checked for NaN and Inf at a time: a check's temporaries stay a few MiB whatever the artifact's size."""


def nonfinite(state: dict[str, torch.Tensor]) -> list[str]:
    """Every floating-point tensor holding NaN or Inf. The tensors of each device and dtype are checked
    together, in pieces of ``CHECK_ELEMENTS`` (for a ``cst`` task, 136 checks one by one took 3 ms of a
    7 ms load; one concatenation of a 300 MB task took another 300 MB), and one by one only to name
    those that fail."""
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for t in state.values():
        if t.is_floating_point():
            groups.setdefault((t.device, t.dtype), []).append(t.detach())
    if all(_all_finite(piece) for tensors in groups.values() for piece in _pieces(tensors, CHECK_ELEMENTS)):
        return []
    return [f"{k}: contains NaN or Inf" for k, t in state.items() if t.is_floating_point() and not t.isfinite().all()]


def _pieces(tensors: list[torch.Tensor], size: int) -> Iterator[torch.Tensor]:
    """The elements of same-device, same-dtype ``tensors``, flat, in pieces of at most ``size``: small
    tensors joined, large ones cut in views."""
    pending: list[torch.Tensor] = []
    count = 0
    for t in tensors:
        flat = t.reshape(-1)
        for start in range(0, flat.numel(), size):
            piece = flat[start : start + size]
            if count + piece.numel() > size:
                yield torch.cat(pending)
                pending, count = [], 0
            pending.append(piece)
            count += piece.numel()
    if pending:
        yield torch.cat(pending)


def _all_finite(x: torch.Tensor) -> bool:
    """Whether every element of ``x`` is finite; in NumPy where it can view it (no intra-op threads to
    wait for on a loaded machine), else in torch (CUDA, bfloat16)."""
    try:
        return bool(np.isfinite(x.numpy()).all())
    except TypeError:
        return bool(x.isfinite().all())


def load_artifact(
    folder: Path,
    backbone: FrozenBackbone,
    manifest: dict[str, Any] | None = None,
    verify: bool = True,
    from_store: bool = False,
    into: TaskModel | None = None,
) -> tuple[TaskModel, dict[str, Any]]:
    """Reads, checks and builds an artifact for ``backbone``. See the module docstring for the checks.

    Args:
        manifest: the folder's parsed ``tuner.json``, when the caller has it already.
        verify: also check the weights' sha256 and look for NaN or Inf. A version that was fully
            checked once (at upload) is reloaded without them; keys, shapes and dtypes are always checked.
        from_store: a version from the server's store, whose layout was checked when it was published:
            the meta-device pass (about as long as building the model) is left off a cold load.
        into: a model of the same architecture to read the weights into instead of building one (most
            of a cold load's time is building it), left in the mode it is in. Its old weights are lost,
            even when this raises.
    """
    manifest = manifest if manifest is not None else read_manifest(folder)
    check_backbone(manifest, backbone)
    weights, problems = folder / WEIGHTS, []
    if not weights.is_file():
        problems.append(f"{WEIGHTS} is missing")
    elif verify and _sha256(weights) != manifest["weights_sha256"]:
        problems.append(f"{WEIGHTS} sha256 does not match tuner.json (truncated or altered file)")
    try:  # the layout is checked on the meta device first: options that ask for terabytes allocate nothing
        if verify and not from_store and weights.is_file():
            problems += layout_problems(weights, _build(manifest, backbone, "meta").state_dict())
        model = None if problems else into if into is not None else _build(manifest, backbone)
    except BUILD_ERRORS as e:
        raise ArtifactError(problems + [f"cannot build {manifest['method']}: {e}"]) from e
    if model is None:
        raise ArtifactError(problems)
    if weights.is_file():
        problems += read_weights(weights, model)
    if verify and not problems:
        problems += nonfinite(model.state_dict())
    if problems:
        raise ArtifactError(problems)
    model.labels = list(manifest["labels"])
    return (model if into is not None else model.eval()), manifest
