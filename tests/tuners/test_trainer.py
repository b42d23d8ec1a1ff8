"""server-train on a small synth set with the real offline mobilenet_v2 (128 px canvas)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from models import PreprocessSpec, build_backbone
from models.runtime.onnx import OnnxRuntime
from tuners.artifact import load_artifact
from tuners.data.synth import SynthConfig, generate
from tuners.data.transforms import DetectionDataset
from tuners.trainer.cli import describe_methods, main
from tuners.trainer.config import ConfigError, build_config, read_config_file
from tuners.trainer.loop import Trainer

REPORT_FIELDS = {
    "AP",
    "AP50",
    "AP75",
    "trainable_params",
    "artifact_bytes",
    "peak_memory_bytes",
    "seconds_per_epoch",
    "images_per_second",
    "task_cost_fraction_of_backbone",
    "method",
    "kind",
    "backbone",
    "best_epoch",
}


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("digits")
    generate(SynthConfig(task="digits", images=20, size=128, min_scale=16, max_scale=48, val_fraction=0.2), out)
    return out


def _args(data: Path, out: Path, method: str, *extra: str) -> list[str]:
    return [
        "--method",
        method,
        "--data",
        str(data),
        "--format",
        "coco",
        "--epochs",
        "1",
        "--image-size",
        "128",
        "--batch-size",
        "8",
        "--augmentation",
        "none",
        "--out",
        str(out),
        "--no-progress",
        *extra,
    ]


def _config(data: Path, out: Path, method: str, **overrides: object):
    values = {
        "method": method,
        "data": data,
        "epochs": 1,
        "image_size": 128,
        "batch_size": 8,
        "augmentation": "none",
        "out": out,
        "progress": False,
    }
    return build_config({**values, **overrides})


@pytest.mark.parametrize("method", ["cst", "lora"])
def test_one_epoch_smoke_writes_a_loadable_artifact_and_a_full_report(
    digits: Path, tmp_path: Path, method: str, device: str
):
    assert main(_args(digits, tmp_path / method, method, "--device", device)) == 0
    report = json.loads((tmp_path / method / "report.json").read_text())
    assert REPORT_FIELDS <= set(report), REPORT_FIELDS - set(report)
    assert report["trainable_params"] > 0 and report["artifact_bytes"] > 0 and report["peak_memory_bytes"] > 0
    assert report["task_cost_fraction_of_backbone"] > 0
    backbone = build_backbone("mobilenet_v2", allow_download=False, preprocess=PreprocessSpec(size=128))
    model, manifest = load_artifact(tmp_path / method / "best", backbone)
    assert manifest["method"] == method and manifest["labels"] == [str(d) for d in range(10)]
    assert {"created_at", "package_version", "train_config", "dataset"} <= set(manifest["provenance"])


def test_side_training_leaves_the_backbone_untouched_and_gradients_out_of_it(digits: Path, tmp_path: Path):
    trainer = Trainer(_config(digits, tmp_path, "cst"))
    before = {k: v.clone() for k, v in trainer.backbone.state_dict().items()}
    trainer.train_epoch()
    assert all(torch.equal(before[k], v) for k, v in trainer.backbone.state_dict().items())
    assert all(p.grad is None for p in trainer.backbone.parameters())


def test_memory_of_side_tuners_is_below_full_finetune(digits: Path, tmp_path: Path):
    peak = {}
    for method in ("cst", "e3va", "lst", "linear_probe", "full_finetune"):
        trainer = Trainer(_config(digits, tmp_path / method, method))
        trainer.train_epoch()
        peak[method] = trainer.memory.report(trainer.optimizer)["peak_memory_bytes"]
    for method in ("cst", "e3va", "lst", "linear_probe"):
        assert peak[method] < peak["full_finetune"], peak


def test_feature_cache_is_faster_and_keeps_the_loss_trajectory(
    digits: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    plain = Trainer(_config(digits, tmp_path / "plain", "linear_probe", epochs=3))
    options = {"epochs": 3, "cache_features": "memory", "feature_runtime": "torch"}  # exactly the uncached taps
    cached = Trainer(_config(digits, tmp_path / "cached", "linear_probe", **options))
    plain_losses = [plain.train_epoch()["loss"] for plain.epoch in range(3)]
    runs = [cached.train_epoch()]

    def no_decoding(*_: object) -> None:
        raise AssertionError("an image was read although its taps are cached")

    with monkeypatch.context() as patch:  # later epochs read labels only
        patch.setattr(DetectionDataset, "__getitem__", no_decoding)
        for cached.epoch in range(1, 3):
            runs.append(cached.train_epoch())
    assert cached.cache is not None and cached.cache.stats()["hits"] == 2 * len(cached.train_set)
    assert [r["loss"] for r in runs] == pytest.approx(plain_losses, rel=1e-4)
    assert min(r["seconds"] for r in runs[1:]) < runs[0]["seconds"]
    cached.evaluate()  # fills the cache with the validation split
    hits = cached.cache.stats()["hits"]
    with monkeypatch.context() as patch:
        patch.setattr(DetectionDataset, "__getitem__", no_decoding)
        again, _ = cached.evaluate()
    assert cached.cache.stats()["hits"] == hits + len(cached.val_set)
    cache, cached.cache = cached.cache, None
    assert again == cached.evaluate()[0]  # the same metrics as without the cache
    cached.cache = cache


def test_cached_taps_come_from_onnx_runtime_on_the_cpu(digits: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)  # the graph is exported to ./.cache/onnx, where a server started here finds it
    trainer = Trainer(_config(digits, tmp_path / "run", "cst", cache_features="memory"))
    assert isinstance(trainer.extractor, OnnxRuntime) and trainer.extractor.provider == "CPUExecutionProvider"
    assert list((tmp_path / ".cache" / "onnx").glob("*.onnx"))
    images, names = torch.stack([trainer.train_set[i].image for i in range(4)]), trainer.model.required_taps()
    with torch.no_grad():
        eager = trainer.backbone(images, names)
    onnx = trainer.extractor(images, names)
    assert all(torch.allclose(onnx[n], eager[n], atol=1e-4) for n in names)
    losses = [trainer.train_epoch()["loss"] for trainer.epoch in range(2)]
    assert trainer.cache is not None and trainer.cache.stats()["hits"] == len(trainer.train_set)
    in_torch = Trainer(_config(digits, tmp_path / "torch", "cst", cache_features="memory", feature_runtime="torch"))
    assert in_torch.extractor is in_torch.backbone
    assert [in_torch.train_epoch()["loss"] for in_torch.epoch in range(2)] == pytest.approx(losses, rel=1e-3)


def test_resume_continues_exactly(digits: Path, tmp_path: Path):
    straight = Trainer(_config(digits, tmp_path / "a", "cst", epochs=2))
    straight.fit()
    first = Trainer(_config(digits, tmp_path / "b", "cst", epochs=1))
    first.fit()
    resumed = Trainer(_config(digits, tmp_path / "b", "cst", epochs=2, resume=True))
    resumed.fit()
    a = load_file(str(tmp_path / "a" / "state" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "state" / "model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert len(json.loads((tmp_path / "b" / "report.json").read_text())["history"]) == 2


def test_unknown_keys_are_rejected_with_the_valid_ones(digits: Path, tmp_path: Path):
    with pytest.raises(ConfigError, match="unknown keys \\['epochz'\\].*valid keys"):
        build_config({"data": digits, "epochz": 3})
    with pytest.raises(Exception, match="unknown keys \\['rnak'\\].*valid keys"):
        _config(digits, tmp_path, "e3va", tuner={"rnak": 4})
    assert main(_args(digits, tmp_path, "cst", "--set", "tuner.bogus=1")) == 2


def test_feature_cache_is_refused_when_invalid(digits: Path, tmp_path: Path):
    with pytest.raises(ConfigError, match="augmentation"):
        _config(digits, tmp_path, "cst", cache_features="memory", augmentation="flip")
    with pytest.raises(ConfigError, match="inline"):
        _config(digits, tmp_path, "lora", cache_features="memory")


def test_config_file_then_flags_then_set(digits: Path, tmp_path: Path):
    toml = tmp_path / "train.toml"
    toml.write_text(f'method = "e3va"\ndata = "{digits}"\nepochs = 7\nlr = 0.01\n[tuner]\nrank = 4\n')
    yaml_file = tmp_path / "train.yaml"
    yaml_file.write_text(f"method: e3va\ndata: {digits}\nepochs: 7\ntuner:\n  rank: 4\n")
    assert read_config_file(toml) == {**read_config_file(yaml_file), "lr": 0.01}
    from tuners.trainer.cli import config_from_args, parser

    args = parser().parse_args(["--config", str(toml), "--epochs", "2", "--set", "tuner.rank=8"])
    config = config_from_args(args)
    assert (config.method, config.epochs, config.lr, config.tuner) == ("e3va", 2, 0.01, {"rank": 8})
    bad = tmp_path / "bad.toml"
    bad.write_text("epochs = [")
    with pytest.raises(ConfigError, match="not valid TOML"):
        read_config_file(bad)


def test_list_methods_shows_kind_and_defaults(capsys: pytest.CaptureFixture[str]):
    assert main(["--list-methods", "--json"]) == 0
    listed = {row["method"]: row for row in json.loads(capsys.readouterr().out)}
    assert set(listed) == {row["method"] for row in describe_methods()}
    assert listed["cst"]["kind"] == "side" and listed["lora"]["kind"] == "inline"
    assert listed["e3va"]["options"]["rank"]["default"] == 16
    assert listed["conv_adapter"]["about"].endswith(
        "spatial convolution. Inline: the adapter output re-enters the residual stream."
    )
    assert main(["--list-methods"]) == 0
    text = capsys.readouterr().out.splitlines()
    assert any(line.split()[:2] == ["lora", "inline"] for line in text)
    assert any(line.split()[:1] == ["rank=8"] for line in text)  # lora's rank, with its default


def test_disk_feature_cache_is_fp16_and_bounded(tmp_path: Path):
    from tests.conftest import small_backbone
    from tuners.trainer.features_cache import FeatureCache

    backbone = small_backbone("mobilenet_v2")
    images = torch.randn(3, 3, 64, 64)
    taps = ["c3", "c4"]
    one_image = sum(backbone.feature_spec[t].channels * (64 // backbone.feature_spec[t].stride) ** 2 for t in taps)
    cache = FeatureCache("disk", budget_bytes=2 * one_image * 2, folder=tmp_path / "cache")  # room for 2 in fp16
    first = cache.taps(backbone, images, [0, 1, 2], taps)
    second = cache.taps(backbone, images, [0, 1, 2], taps)
    assert cache.stats()["hits"] == 2 and cache.stats()["not_cached_over_budget"] == 2  # the 3rd, each time
    assert cache.bytes <= cache.budget_bytes
    assert len(list((tmp_path / "cache").iterdir())) == 2
    for t in taps:
        torch.testing.assert_close(second[t], first[t], atol=1e-2, rtol=1e-2)


def test_publish_uploads_the_best_artifact_to_a_running_server(digits: Path, tmp_path: Path):
    from server.config import Settings
    from server.main import create_app
    from tests.server.conftest import LiveServer

    backbone = build_backbone("mobilenet_v2", allow_download=False, preprocess=PreprocessSpec(size=128))
    settings = Settings(store_dir=tmp_path / "store", image_size=128, device="cpu", admin_key="secret")
    with LiveServer(create_app(settings, backbone=backbone)) as live:
        args = _args(digits, tmp_path / "run", "cst", "--publish", live.url, "--api-key", "secret", "--task-id", "dg")
        assert main(args) == 0
        from clients import SidecarClient

        with SidecarClient(live.url) as client:
            task = client.get_task("dg")
    assert task.method == "cst" and task.version == 1 and task.labels == [str(d) for d in range(10)]
