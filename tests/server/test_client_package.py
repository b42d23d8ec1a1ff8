"""The client as users install it: ``pip install ./clients`` alone (``make test`` builds that venv,
``.venv-client``), typed results equal to the server's OpenAPI schemas, every image type, the CLI."""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from clients import SidecarClient, calls
from clients.cli import main as cli
from clients.models import MODELS
from server.main import create_app
from tests.server.conftest import LiveServer, settings

ROOT = Path(__file__).parents[2]
CLIENT_VENV = ROOT / ".venv-client"
HEAVY = {"torch", "torchvision", "onnxruntime", "onnxruntime-gpu", "onnx", "numpy", "pillow", "fastapi", "sidecar"}


def _shape(schema: dict[str, Any], defs: dict[str, Any]) -> Any:
    """A JSON schema reduced to its types: references by name, unions as sets, containers with items."""
    if "$ref" in schema:
        return schema["$ref"].rsplit("/", 1)[1]
    if "anyOf" in schema:
        return frozenset(_shape(s, defs) for s in schema["anyOf"])
    kind = schema.get("type", "any")
    if kind == "array":
        return ("array", _shape(schema.get("items", {}), defs))
    if kind == "object" and isinstance(schema.get("additionalProperties"), dict):
        return ("object", _shape(schema["additionalProperties"], defs))
    return kind


def _fields(schema: dict[str, Any], defs: dict[str, Any]) -> tuple[dict[str, Any], set[str]]:
    return {k: _shape(v, defs) for k, v in schema["properties"].items()}, set(schema.get("required", []))


def test_the_client_models_are_the_servers_schemas(tmp_path: Path):
    served = create_app(settings(tmp_path / "store")).openapi()["components"]["schemas"]
    for model in MODELS:
        mine = model.model_json_schema(ref_template="#/components/schemas/{model}")
        assert model.__name__ in served, f"the server has no schema {model.__name__}"
        assert _fields(mine, {}) == _fields(served[model.__name__], {}), f"{model.__name__} drifted from the server"


def test_the_installed_client_pulls_in_no_torch_and_works_from_its_own_venv(live: LiveServer, artifacts, photo_bytes,
                                                                           tmp_path: Path):  # fmt: skip
    if not (CLIENT_VENV / "bin" / "python").exists():
        pytest.fail("no .venv-client: `make test` builds it with `pip install ./clients` in a fresh venv")
    listed = subprocess.run([CLIENT_VENV / "bin" / "python", "-m", "pip", "list", "--format", "json"],
                            capture_output=True, text=True, check=True)  # fmt: skip
    installed = {d["name"].lower() for d in json.loads(listed.stdout)}
    assert "sidecar-client" in installed and {"httpx", "pydantic"} <= installed
    assert not installed & HEAVY, installed & HEAVY
    (tmp_path / "photo.png").write_bytes(photo_bytes)
    sidecar_client = [str(CLIENT_VENV / "bin" / "sidecar-client"), "--url", live.url]
    upload = subprocess.run(
        [*sidecar_client, "upload", "digits", str(artifacts["side1"])], capture_output=True, text=True
    )
    assert upload.returncode == 0 and json.loads(upload.stdout)["version"] == 1, upload.stderr
    detect = subprocess.run([*sidecar_client, "detect", "--tasks", "digits", str(tmp_path / "photo.png")],
                            capture_output=True, text=True)  # fmt: skip
    assert detect.returncode == 0, detect.stderr
    assert json.loads(detect.stdout)["results"][0]["task"] == "digits"
    annotate = [*sidecar_client, "detect", "--tasks", "digits", str(tmp_path / "photo.png"), "--annotate", "x.jpg"]
    failed = subprocess.run(annotate, capture_output=True, text=True)  # no Pillow in a bare install: one clear line
    assert failed.returncode != 0 and "sidecar-client[images]" in failed.stderr and "Traceback" not in failed.stderr
    missing = subprocess.run([*sidecar_client, "task", "nope"], capture_output=True, text=True)
    assert missing.returncode == 1 and missing.stderr.startswith("sidecar-client: 404 unknown_task: no task 'nope'")
    assert len(missing.stderr.strip().splitlines()) == 1


def test_every_image_type_gives_the_same_detections(live: LiveServer, artifacts, photo_bytes, tmp_path: Path):
    picture = Image.open(io.BytesIO(photo_bytes)).convert("RGB")
    (tmp_path / "photo.png").write_bytes(photo_bytes)
    with SidecarClient(live.url) as client:
        client.upload_task("digits", artifacts["side1"])
        answers = [
            client.detect(image, "digits").results[0].detections
            for image in (
                photo_bytes,
                tmp_path / "photo.png",
                str(tmp_path / "photo.png"),
                picture,
                np.asarray(picture),
            )
        ]
    assert answers[0]
    for other in answers[1:]:  # equal pixels; after two uses the task may serve from its compiled graph (1e-3)
        assert [d.label for d in other] == [d.label for d in answers[0]]
        assert [d.score for d in other] == pytest.approx([d.score for d in answers[0]], abs=2e-3)
    with pytest.raises(TypeError, match="uint8"):
        calls.detect(np.zeros((4, 4, 3), np.float32), "digits", None, None)
    with pytest.raises(TypeError, match="a path, bytes"):
        calls.detect(12, "digits", None, None)


def test_tasks_as_a_string_or_a_list_are_sent_whole():
    sent = []

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(request.content)
        return httpx.Response(404, json={"error": {"code": "unknown_task", "message": "no", "details": []}})

    with SidecarClient("http://sidecar.test", transport=httpx.MockTransport(answer)) as client:
        for tasks in ("digits", "digits,faces@2", ["digits", "faces@2"]):
            with pytest.raises(Exception, match="unknown_task"):
                client.detect(b"\x89PNG", tasks)
    assert b'name="tasks"\r\n\r\ndigits\r\n' in sent[0]
    assert all(b'name="tasks"\r\n\r\ndigits,faces@2\r\n' in body for body in sent[1:])
    with pytest.raises(ValueError, match="no empty one"):
        calls.detect(b"x", "digits,,faces", None, None)


def test_the_cli_annotates_with_each_tasks_colour(live: LiveServer, artifacts, photo_bytes, tmp_path: Path, capsys):
    (tmp_path / "photo.png").write_bytes(photo_bytes)
    with SidecarClient(live.url) as client:
        client.upload_task("digits", artifacts["side1"])
        client.upload_task("faces", artifacts["side2"])
    out = tmp_path / "annotated.jpg"
    args = [
        "--url",
        live.url,
        "detect",
        "--tasks",
        "digits,faces",
        str(tmp_path / "photo.png"),
        "--annotate",
        str(out),
    ]
    assert cli(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert [r["task"] for r in result["results"]] == ["digits", "faces"]
    drawn, original = np.asarray(Image.open(out).convert("RGB")), np.asarray(Image.open(tmp_path / "photo.png"))
    assert drawn.shape == original.shape[:2] + (3,) and (np.abs(drawn.astype(int) - original[..., :3]) > 60).any()
    assert cli(["--url", "http://127.0.0.1:9", "ready"]) == 1
