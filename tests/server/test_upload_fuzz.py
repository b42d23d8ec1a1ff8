"""Mutated uploads: whatever a client sends as an artifact, the server answers with a domain error
(a 4xx) or takes it, and it keeps listing and serving every task it took.

Seeded, so a failure reproduces. Each case changes a real artifact of a random method: its
manifest gets JSON values of other types at random places (the kind of upload that once stored a
version which made every listing fail), its weights get flipped bits, a cut, or header entries
with other shapes, dtypes or offsets, or both.
"""

from __future__ import annotations

import asyncio
import json
import random
import struct
from pathlib import Path
from typing import Any

from models.postprocess import PostprocessConfig
from server.exceptions import SidecarError
from server.services import build_services
from tests.server.conftest import make_artifact, settings
from tuners.artifact import MANIFEST, WEIGHTS
from tuners.errors import ArtifactError, IncompatibleBackboneError

METHODS = ["linear_probe", "cst", "e3va", "lst", "side_tuning", "hst", "conv_adapter", "dyn_adapter"]
ODD_VALUES = [None, -1, 0, 2**70, 1.5, 1e308, "", "x" * 5000, [], {}, True, [1, 2], ["a"] * 300, "cst"]
CASES = 160


def mutated_manifest(rng: random.Random, manifest: dict[str, Any]) -> bytes:
    """``manifest`` with one to three values, at any depth, replaced or removed."""
    for _ in range(rng.randint(1, 3)):
        node: Any = manifest
        while True:
            keys = list(node) if isinstance(node, dict) else list(range(len(node)))
            if not keys:
                break
            key = rng.choice(keys)
            if isinstance(node[key], dict | list) and node[key] and rng.random() < 0.5:
                node = node[key]
                continue
            if isinstance(node, dict) and rng.random() < 0.2:
                del node[key]
            else:
                node[key] = rng.choice(ODD_VALUES)
            break
    return json.dumps(manifest).encode()


def mutated_weights(rng: random.Random, data: bytes) -> bytes:
    """safetensors ``data`` with flipped bits, a cut, or one header entry changed."""
    choice = rng.randrange(3)
    if choice == 0:
        flipped = bytearray(data)
        for _ in range(rng.randint(1, 16)):
            flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
        return bytes(flipped)
    if choice == 1:
        return data[: rng.randrange(len(data))]
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    entry = header[rng.choice([k for k in header if k != "__metadata__"])]
    field, values = rng.choice([
        ("shape", [[], [0], [1 << 40], [-1, 3], [2, 2, 2, 2, 2]]),
        ("dtype", ["F16", "BF16", "I64", "BOOL", "F8_E4M3", "XX", 5]),
        ("data_offsets", [[0, 0], [-4, 8], [0, len(data) * 2], [8, 4]]),
    ])  # fmt: skip
    entry[field] = rng.choice(values)
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data[8 + length :]


def test_mutated_uploads_get_domain_errors_and_the_server_keeps_serving(tmp_path: Path, backbone, photo_bytes):
    rng = random.Random(20261207)
    originals = {m: make_artifact(backbone, tmp_path / "artifacts", m, seed=0) for m in METHODS}
    refused: dict[str, int] = {}

    async def run() -> None:
        services = build_services(settings(tmp_path / "store"), backbone)
        services.start()
        try:
            for case in range(CASES):
                folder = originals[rng.choice(METHODS)]
                weights, manifest = (folder / WEIGHTS).read_bytes(), json.loads((folder / MANIFEST).read_text())
                what = rng.random()
                weights = mutated_weights(rng, weights) if what < 0.4 or what > 0.85 else weights
                config = mutated_manifest(rng, manifest) if what >= 0.4 else json.dumps(manifest).encode()
                try:
                    await services.tasks.publish(f"t{case % 6}", weights, config)
                except (ArtifactError, IncompatibleBackboneError, SidecarError) as e:
                    refused[type(e).__name__] = refused.get(type(e).__name__, 0) + 1
            listed = (await services.tasks.list()).tasks
            for task in listed:
                answer = await services.engine.detect(photo_bytes, task.id, PostprocessConfig())
                assert answer.results[0].error is None, answer.results[0].error
        finally:
            await services.stop()

    asyncio.run(run())
    assert sum(refused.values()) > CASES // 2, refused  # the mutations mostly break an artifact
