"""Ordinary mistakes end in one line that names the problem (and the fix) and a non-zero exit code,
never a traceback; the data folder is checked before any weights load; every command has --version."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tuners.data.synth import SynthConfig, generate

ROOT = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("data")
    generate(SynthConfig(task="digits", images=6, size=64, min_scale=16, max_scale=32), out)
    return out


def _run(module: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": "", **(env or {})})  # fmt: skip


def _one_line(result: subprocess.CompletedProcess, code: int, *words: str) -> None:
    errors = [line for line in result.stderr.splitlines() if ": error: " in line]  # progress logs may precede it
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr and len(errors) == 1, result.stderr
    assert all(w in errors[0] for w in words), errors[0]


TRAIN = [
    (["--set", "head.name=yolo"], 2, ["unknown head 'yolo'", "light"]),
    (["--set", "head.widht=64"], 2, ["widht: unknown option", "width=96"]),
    (["--set", "tuner.reduction=abc"], 2, ["reduction", "valid integer"]),
    (["--backbone", "resnet5"], 2, ["unknown backbone 'resnet5'", "resnet18"]),
    (["--device", "cuda"], 2, ["no CUDA GPU", "--device cpu"]),
    (["--backbone", "resnet18"], 1, ["no offline weights for 'resnet18'", "--weights PATH"]),
    (["--image-size", "100000"], 2, ["image_size", "less than or equal to 4096"]),  # was an allocation failure
    (["--lr", "inf"], 2, ["lr", "finite number"]),  # was accepted
    (["--seed", str(2**80)], 2, ["seed", "less than 4294967296"]),  # was a traceback (Overflow)
    (["--method", "lora", "--set", "tuner.rank=8000"], 2, ["lora options make a task of 566 MiB", "512 MiB"]),
]


@pytest.mark.parametrize(("flags", "code", "words"), TRAIN, ids=[" ".join(f) for f, _, _ in TRAIN])
def test_server_train_mistakes_are_one_line(data: Path, tmp_path: Path, flags: list[str], code: int, words: list[str]):
    result = _run("tuners.trainer.cli", "--data", str(data), "--out", str(tmp_path / "run"), "--epochs", "1",
                  "--image-size", "64", "--no-progress", *flags)  # fmt: skip
    _one_line(result, code, *words)


def test_a_missing_data_folder_is_reported_before_any_weights_load(tmp_path: Path):
    result = _run("tuners.trainer.cli", "--data", str(tmp_path / "nope"), "--weights", str(tmp_path / "missing.pt"))
    _one_line(result, 2, "nope does not exist")  # the missing weights file was never reached


def test_a_malformed_coco_file_is_one_line_naming_it(data: Path, tmp_path: Path):
    broken = tmp_path / "data"
    shutil.copytree(data, broken)
    (broken / "train" / "annotations.json").write_text(json.dumps({"images": [], "annotations": []}))
    result = _run("tuners.trainer.cli", "--data", str(broken), "--out", str(tmp_path / "run"), "--epochs", "1")
    _one_line(result, 2, "train/annotations.json is not a COCO document", "KeyError('categories')")


def test_a_failing_publish_keeps_the_artifact_and_prints_the_retry(data: Path, tmp_path: Path):
    result = _run("tuners.trainer.cli", "--data", str(data), "--out", str(tmp_path / "run"), "--epochs", "1",
                  "--image-size", "64", "--weights", "random", "--method", "linear_probe", "--no-progress",
                  "--augmentation", "none", "--publish", "http://127.0.0.1:9", "--task-id", "digits")  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr
    retry = f"sidecar-client --url http://127.0.0.1:9 upload digits {tmp_path / 'run' / 'best'}"
    assert "the publish to http://127.0.0.1:9 failed" in result.stderr and retry in result.stderr
    assert (tmp_path / "run" / "best" / "tuner.safetensors").is_file()


def test_server_serve_settings_mistakes_are_one_line():
    _one_line(_run("server.main", "--port", "abc"), 2, "--port (env SIDECAR_PORT)", "valid integer")
    _one_line(_run("server.main", "--image-size", "100000"), 2, "--image-size", "less than or equal to 4096")
    bad_env = _run("server.main", env={"SIDECAR_MAX_BATCH_SIZE": "0"})
    _one_line(bad_env, 2, "--max-batch-size (env SIDECAR_MAX_BATCH_SIZE)", "greater than or equal to 1")
    _one_line(_run("server.main", "--device", "cuda", "--weights", "random"), 1, "no CUDA GPU")
    assert "(default: 64; env SIDECAR_MAX_QUEUE)" in " ".join(_run("server.main", "--help").stdout.split())


def test_server_serve_start_up_mistakes_are_one_line_before_serving(tmp_path: Path):
    """Each was a traceback from the lifespan, an allocation failure, or uvicorn's error after the start-up."""
    at = ["--store-dir", str(tmp_path / "store"), "--cache-dir", str(tmp_path / "cache")]
    sizes = _run("server.main", *at, "--max-batch-size", "100000", "--threads", "100000", "--cache-wait-s", "inf")
    _one_line(sizes, 2, "--max-batch-size", "less than or equal to 256", "--threads", "--cache-wait-s", "finite")
    (tmp_path / "keys").write_text("\n")
    _one_line(_run("server.main", *at, "--admin-key-file", str(tmp_path / "keys")), 2, "keys holds no key")
    cors = _run("server.main", *at, "--cors-origins", "http://localhost:3000/")
    _one_line(cors, 2, "are not origins", "no path or '/'")
    _one_line(_run("server.main", *at, "--log-level", "nope"), 2, "--log-level: invalid choice: 'nope'")
    _one_line(_run("server.main", *at, "--weights", str(tmp_path / "nope.pt")), 1, "nope.pt does not exist")
    store = _run("server.main", *at, "--weights", "random", "--image-size", "64", "--store-url", "zzz://bucket")
    _one_line(store, 1, "--store-url zzz://bucket cannot be opened", "zzz")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = _run("server.main", *at, "--weights", "random", "--port", str(port))
    _one_line(busy, 1, f"cannot serve on 127.0.0.1:{port}", "in use")


@pytest.mark.parametrize("module", ["server.main", "tuners.trainer.cli", "tuners.data.cli", "tuners.tools.predict",
                                    "tuners.tools.val", "tuners.tools.export", "clients.cli"])  # fmt: skip
def test_every_command_has_a_version(module: str):
    result = _run(module, "--version")
    assert result.returncode == 0 and result.stdout.split()[1][0].isdigit(), result.stdout + result.stderr


def test_server_data_synth_options_that_cannot_go_together_are_one_line(tmp_path: Path):
    """Objects up to 72 px (the default --scale) do not fit a 96 px image twice over; this was a traceback."""
    result = _run("tuners.data.cli", "synth", "--out", str(tmp_path / "d"), "--image-size", "96")
    _one_line(result, 2, "max_scale <= size / 2, got 24 and 72 with size 96", "--scale MIN MAX")
    huge = _run("tuners.data.cli", "synth", "--out", str(tmp_path / "e"), "--image-size", "100000")  # OOM
    _one_line(huge, 2, "need size <= 4096 px, got 100000")
