"""Server fixtures: a random mobilenet_v2 on a 64 px canvas, task artifacts, a live uvicorn server."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn
from fastapi import FastAPI
from PIL import Image

from models import FrozenBackbone, PreprocessSpec, build_backbone
from server.config import Settings
from server.main import create_app, uvicorn_options
from server.metrics import Metrics
from server.store import TaskStore
from server.tuner_cache import TunerCache, model_bytes
from tuners import build_task_model
from tuners.artifact import MANIFEST, WEIGHTS, load_artifact, save_artifact
from tuners.data.synth import photo

SIDE_METHODS = ["linear_probe", "cst", "e3va", "lst", "side_tuning", "hst"]


def server_backbone() -> FrozenBackbone:
    """What ``server-serve --weights random --image-size 64`` builds (seeded, so the fingerprint is stable)."""
    return build_backbone("mobilenet_v2", weights="random", preprocess=PreprocessSpec(size=64))


@pytest.fixture(scope="session")
def backbone() -> FrozenBackbone:
    return server_backbone()


def make_artifact(
    backbone: FrozenBackbone, out: Path, method: str, seed: int, labels: list[str] | None = None
) -> Path:
    """A task with seeded, perturbed weights whose head fires (so results have boxes to compare)."""
    torch.manual_seed(seed)
    model = build_task_model(method, {}, backbone, labels or ["cat", "dog"], {"name": "light", "width": 32})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        model.head.predictor.bias[: len(model.labels)] += 3.0
    return save_artifact(model, backbone, out / f"{method}-{seed}", metrics={"AP50": 0.0})


@pytest.fixture(scope="session")
def artifacts(backbone: FrozenBackbone, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Eight side tasks, two inline tasks."""
    out = tmp_path_factory.mktemp("artifacts")
    found = {f"side{i}": make_artifact(backbone, out, SIDE_METHODS[i % 6], i) for i in range(8)}
    found["inline0"] = make_artifact(backbone, out, "lora", 100)
    found["inline1"] = make_artifact(backbone, out, "dyn_adapter", 101)
    return found


@pytest.fixture(scope="session")
def photo_bytes() -> bytes:
    return photo("astronaut.png").read_bytes()


@pytest.fixture(scope="session")
def photos() -> list[bytes]:
    import io

    out = []
    for name in ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg"):
        buf = io.BytesIO()
        Image.open(photo(name)).convert("RGB").save(buf, format="JPEG")
        out.append(buf.getvalue())
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_server(tmp_path: Path, *flags: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """``server-serve`` on the small random backbone in a subprocess, once ``/readyz`` answers 200.

    Returns the process (the caller terminates it) and its base URL.
    """
    port = free_port()
    command = [sys.executable, "-m", "server.main", "--weights", "random", "--image-size", "64", "--port", str(port),
               "--store-dir", str(tmp_path / "store"), "--cache-dir", str(tmp_path / "cache"), "--device", "cpu",
               "--log-level", "warning", *flags]  # fmt: skip
    server = subprocess.Popen(command, env={**os.environ, **(env or {})}, cwd=Path(__file__).parents[2])
    url, deadline = f"http://127.0.0.1:{port}", time.time() + 120
    while True:
        if time.time() > deadline or server.poll() is not None:
            server.kill()
            raise RuntimeError("server-serve did not start")
        try:
            if httpx.get(f"{url}/readyz").status_code == 200:
                return server, url
        except httpx.TransportError:
            time.sleep(0.2)


def self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """(cert.pem, key.pem) in ``folder``: a self-signed certificate for 127.0.0.1, valid for a day."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


def settings(store: Path, **overrides: object) -> Settings:
    values = {"weights": "random", "image_size": 64, "store_dir": store, "device": "cpu", "batch_window_ms": 2.0}
    return Settings(**{**values, **overrides})


class LiveServer:
    """uvicorn in a background thread, serving ``app`` on its settings' host (and TLS files); reached over
    127.0.0.1 whatever the host (a server bound to 0.0.0.0 answers there too)."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.port = free_port()
        s = app.state.settings
        self.url = f"{'https' if s.ssl_certfile else 'http'}://127.0.0.1:{self.port}"
        options = {**uvicorn_options(s), "port": self.port, "log_level": "warning"}
        config = uvicorn.Config(app, **options, lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture
def live(tmp_path: Path, backbone: FrozenBackbone) -> Iterator[LiveServer]:
    with LiveServer(create_app(settings(tmp_path / "store"), backbone=backbone)) as server:
        yield server


def copies_cache(tmp_path: Path, backbone, artifact: Path, tasks: int, room: int, wait_s: float) -> TunerCache:  # noqa: ANN001
    """``tasks`` copies of ``artifact`` (t0, t1, ...) behind a device tier with room for ``room`` of them."""
    store = TaskStore(tmp_path / "store")
    for i in range(tasks):
        store.publish(f"t{i}", (artifact / WEIGHTS).read_bytes(), (artifact / MANIFEST).read_bytes(), lambda _: None)
    size = model_bytes(load_artifact(artifact, backbone)[0])
    budgets = {"device": room * size, "host": 0}
    return TunerCache(store, backbone, torch.device("cpu"), budgets, Metrics(), wait_s=wait_s)


def lease_counts(cache: TunerCache) -> dict[str, int]:
    """Task id -> references held on its device-tier entry."""
    return {key[0]: entry.refs for key, entry in cache.tiers["device"].items()}
