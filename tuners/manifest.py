"""The JSON types of a manifest's (``tuner.json``) fields, checked where a manifest is read.

A manifest comes from a user's upload. Every field the server reads must have the type it reads it
as, or the artifact is refused at upload; otherwise a stored version would fail later, where it is
listed or loaded, and keep failing (an upload whose ``metrics`` was a list once made every task
listing answer 500).
"""

from __future__ import annotations

from typing import Any

from tuners.base import TUNERS

# Every field read anywhere, and its JSON type. The required ones are tuners.artifact.REQUIRED.
FIELD_TYPES: dict[str, type] = {
    "format_version": int,
    "method": str,
    "kind": str,
    "carries_backbone_copy": bool,
    "config": dict,
    "head": dict,
    "labels": list,
    "backbone": dict,
    "preprocess": dict,
    "weights_sha256": str,
    "weights_bytes": int,
    "metrics": dict,
    "provenance": dict,
}
JSON_NAMES = {int: "an integer", str: "a string", bool: "true or false", dict: "an object", list: "a list"}


def field_problems(manifest: dict[str, Any], name: str) -> list[str]:
    """Every field of ``manifest`` (a parsed ``name``) whose JSON type or value the server cannot use."""
    problems = [
        f"{name}: '{key}' must be {JSON_NAMES[kind]}, got {type(manifest[key]).__name__}"
        for key, kind in FIELD_TYPES.items()
        if key in manifest and not _is(manifest[key], kind)
    ]
    labels = manifest.get("labels")
    if isinstance(labels, list) and not (labels and all(isinstance(label, str) for label in labels)):
        problems.append(f"{name}: 'labels' must list one or more class names (strings)")
    method, kind = manifest.get("method"), manifest.get("kind")
    if method in TUNERS and isinstance(kind, str) and kind != TUNERS.get(method).kind:
        problems.append(f"{name}: 'kind' is {kind!r}, but {method} tasks are {TUNERS.get(method).kind!r}")
    provenance = manifest.get("provenance")
    created = provenance.get("created_at") if isinstance(provenance, dict) else None
    if created is not None and not isinstance(created, str):
        problems.append(f"{name}: 'provenance.created_at' must be a string")
    return problems


def _is(value: Any, kind: type) -> bool:
    """Whether ``value`` is of JSON type ``kind`` (JSON's true is no integer, though Python's is)."""
    return isinstance(value, kind) and not (kind is int and isinstance(value, bool))
