"""The API contract, proven by fuzzing: schemathesis runs every check against a live server, from
the server's own OpenAPI document, and must find nothing (tests/schemathesis.toml says why the
image and artifact operations may answer 4xx to bytes that are valid by the schema)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from server.main import create_app
from server.store import TaskStore
from tests.server.conftest import LiveServer, settings
from tuners.artifact import MANIFEST, WEIGHTS

CONFIG = Path(__file__).parents[1] / "schemathesis.toml"


def test_schemathesis_finds_no_failure_in_any_operation(tmp_path: Path, backbone, artifacts):
    root = tmp_path / "store"
    folder = artifacts["side0"]
    TaskStore(root).publish(
        "digits", (folder / WEIGHTS).read_bytes(), (folder / MANIFEST).read_bytes(), lambda _: None
    )
    app = create_app(settings(root), backbone=backbone)
    with LiveServer(app) as live:
        st = Path(sys.executable).with_name("st")
        command = [str(st), "--no-color", "--config-file", str(CONFIG), "run", f"{live.url}/openapi.json",
                   "--checks", "all", "--seed", "1", "--max-examples", "50", "--workers", "1"]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    summary = result.stdout[-3000:]
    assert result.returncode == 0, summary
    operations = re.search(r"Tested: (\d+)", summary)
    cases = re.search(r"(\d+) generated, (\d+) passed", summary)
    every = sum(len(methods) for methods in app.openapi()["paths"].values())
    assert operations is not None and int(operations[1]) == every >= 14, summary  # every operation, DELETE too
    assert cases is not None and cases[1] == cases[2] and int(cases[1]) > 500, summary
