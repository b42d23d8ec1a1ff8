"""A stored task version's weights, read into a spare model of its architecture or a model built for it.

Building a model is Python module construction, most of a cold load; refilling a spare is one read
of the weights file. A version is verified in full (sha256, NaN/Inf) on its first load after a start,
whichever model it fills; later loads check only that the file's layout fits the model.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from models.backbones.base import FrozenBackbone
from server.exceptions import SidecarError, TaskQuarantined
from server.store import TaskVersion, VersionedStore
from tuners.artifact import WEIGHTS, load_artifact, read_weights
from tuners.errors import ArtifactError
from tuners.task_model import TaskModel

log = logging.getLogger(__name__)


def read_version(
    path: Path,
    manifest: dict[str, Any],
    backbone: FrozenBackbone,
    device: torch.device,
    spare: TaskModel | None,
    verified: bool,
) -> TaskModel:
    """The version in ``path`` as a model on ``device`` in eval mode: ``spare`` refilled when it fits,
    else a model built for it. ``verified``: the version was verified in full since the start.

    Raises:
        ArtifactError: the version is unreadable, altered, or does not fit ``backbone``.
        OSError: its files could not be read.
    """
    if spare is not None:
        try:
            _refill(spare, path, manifest, backbone, verified)
        except ArtifactError as e:  # a bad file fails again below, with its every problem
            log.warning("%s did not fit a spare model (%s); building a model for it", path, e.problems[0])
        else:
            # a new generation: whatever held this object (a stack) must not take it for the old task
            spare.generation += 1
            return spare  # on the device and in eval mode since its first load
    model, _ = load_artifact(path, backbone, manifest=manifest, verify=not verified, from_store=True)
    return model.to(device).eval()


def _refill(spare: TaskModel, path: Path, manifest: dict[str, Any], backbone: FrozenBackbone, verified: bool) -> None:
    """Reads the version into ``spare``: only the layout is checked again for a version verified once."""
    if not verified:
        load_artifact(path, backbone, manifest=manifest, verify=True, from_store=True, into=spare)
        return
    problems = read_weights(path / WEIGHTS, spare)
    if problems:
        raise ArtifactError(problems)
    spare.labels = list(manifest["labels"])


def quarantine_damaged(store: VersionedStore, version: TaskVersion, error: ArtifactError) -> None:
    """Raises :class:`TaskQuarantined` (from ``error``) after quarantining the task, when ``version`` is
    its current one, whose files no longer read (damaged on disk since they were published); returns
    for another version, whose request gets ``error`` itself."""
    try:
        current = store.get(version.task_id).version
    except SidecarError:
        return
    if current == version.version:
        reason = f"v{version.version} cannot be read ({error})"
        store.quarantine(version.task_id, reason)
        raise TaskQuarantined(f"task {version.task_id!r} is quarantined: {reason}") from error
