"""The artifact: a folder with ``tuner.safetensors`` (the task's tensors only) and ``tuner.json``.

Reading is strict and never unpickles: every missing, extra or mis-shaped key and every NaN or
Inf tensor is reported in one :class:`ArtifactError`; a different backbone fingerprint raises
:class:`IncompatibleBackboneError`. Writing is atomic: temp folder, fsync, rename.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from models.backbones.base import FrozenBackbone
from tuners.base import TUNERS
from tuners.errors import ArtifactError, IncompatibleBackboneError, TunerError
from tuners.task_model import TaskModel, build_task_model

FORMAT_VERSION = 1
WEIGHTS, MANIFEST = "tuner.safetensors", "tuner.json"
REQUIRED = ("format_version", "method", "config", "head", "labels", "backbone", "preprocess", "weights_sha256")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
    """fsync a folder, so a rename inside it is durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_artifact_files(folder: Path, tensors: dict[str, torch.Tensor], manifest: dict[str, Any]) -> None:
    """Writes the two files into an existing (temporary) folder and fsyncs them."""
    weights = folder / WEIGHTS
    save_file(
        {k: v.detach().contiguous().cpu() for k, v in tensors.items()},
        str(weights),
        metadata={"format": "pt", "method": str(manifest["method"])},
    )
    manifest = {**manifest, "weights_sha256": _sha256(weights), "weights_bytes": weights.stat().st_size}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    for path in (weights, folder / MANIFEST):
        with open(path, "rb+") as f:
            os.fsync(f.fileno())


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
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write_artifact_files(tmp, model.state_dict(), manifest)
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
        fsync_dir(out.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def read_manifest(folder: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError as e:
        raise ArtifactError([f"{MANIFEST} is missing"]) from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError([f"{MANIFEST} is not valid JSON: {e}"]) from e
    if not isinstance(manifest, dict):
        raise ArtifactError([f"{MANIFEST} must hold a JSON object"])
    problems = [f"{MANIFEST} lacks '{k}'" for k in REQUIRED if k not in manifest]
    if "method" in manifest and manifest["method"] not in TUNERS:
        problems.append(f"unknown method {manifest['method']!r}; known: {', '.join(TUNERS.names())}")
    if manifest.get("format_version") not in (None, FORMAT_VERSION):
        problems.append(f"format_version {manifest.get('format_version')} is not {FORMAT_VERSION}")
    if problems:
        raise ArtifactError(problems)
    return manifest


def _read_tensors(path: Path, expected_sha: str, problems: list[str]) -> dict[str, torch.Tensor] | None:
    if not path.is_file():
        problems.append(f"{WEIGHTS} is missing")
        return None
    if _sha256(path) != expected_sha:
        problems.append(f"{WEIGHTS} sha256 does not match tuner.json (truncated or altered file)")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        problems.append(f"{WEIGHTS} is not a readable safetensors file ({e}); pickle files are never read")
        return None


def check_state(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> list[str]:
    """Every missing, extra or mis-shaped key, and every tensor with NaN or Inf."""
    problems = [f"missing key {k}" for k in sorted(set(expected) - set(got))]
    problems += [f"extra key {k}" for k in sorted(set(got) - set(expected))]
    for k in sorted(set(expected) & set(got)):
        if tuple(got[k].shape) != tuple(expected[k].shape):
            problems.append(f"{k}: shape {tuple(got[k].shape)}, expected {tuple(expected[k].shape)}")
        elif got[k].is_floating_point() and not torch.isfinite(got[k]).all():
            problems.append(f"{k}: contains NaN or Inf")
    return problems


def load_artifact(folder: Path, backbone: FrozenBackbone) -> tuple[TaskModel, dict[str, Any]]:
    """Reads, checks and builds an artifact for ``backbone``. See the module docstring for the checks."""
    manifest = read_manifest(folder)
    fp = manifest["backbone"].get("fingerprint") if isinstance(manifest["backbone"], dict) else None
    if fp != backbone.fingerprint:
        raise IncompatibleBackboneError(
            f"artifact was trained on backbone {manifest['backbone']!r}; this server runs {backbone.name} "
            f"with fingerprint {backbone.fingerprint}"
        )
    problems: list[str] = []
    tensors = _read_tensors(folder / WEIGHTS, manifest["weights_sha256"], problems)
    try:
        model = build_task_model(
            manifest["method"], manifest["config"], backbone, manifest["labels"], manifest["head"]
        )
    except (TunerError, KeyError, TypeError, ValueError) as e:
        raise ArtifactError(problems + [f"cannot build {manifest['method']}: {e}"]) from e
    if tensors is not None:
        problems += check_state(model.state_dict(), tensors)
    if problems:
        raise ArtifactError(problems)
    model.load_state_dict(tensors, strict=True)
    return model.eval(), manifest
