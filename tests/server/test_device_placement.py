"""The serving and training paths name the device of every tensor they make, so what passes on the
CPU also runs on CUDA. A factory call without ``device=`` makes a CPU tensor beside CUDA ones: the first GPU run of
``make bench-gpu`` failed every request on one, in ``models.postprocess.finish`` (docs/BENCHMARKS.md)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from models.heads import list_heads
from models.postprocess import PostprocessConfig
from models.runtime import build_runtime
from models.transform import ImageTransform
from models.types import Detections
from server.executor import Executor, WorkItem
from server.imaging import decode_image
from server.metrics import Metrics
from server.stacks import StackCache
from tests.conftest import small_backbone
from tuners import TaskModel, build_task_model, list_tuners
from tuners.data.synth import SynthConfig, generate
from tuners.errors import TunerError
from tuners.trainer.config import build_config
from tuners.trainer.loop import Trainer

ROOT = Path(__file__).parents[2]
PACKAGES = ("models", "server", "tuners")
FACTORIES = {
    torch.arange, torch.as_tensor, torch.empty, torch.eye, torch.full, torch.linspace, torch.ones,
    torch.rand, torch.randint, torch.randn, torch.randperm, torch.tensor, torch.zeros,
}  # fmt: skip
CPU_BY_DESIGN = "models/transform.py"  # preprocessing: canvases are made where images are decoded


class DevicelessFactories(TorchFunctionMode):
    """Records ``path:line`` of each tensor factory that this project's code calls without ``device``."""

    def __init__(self) -> None:
        super().__init__()
        self.found: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        if func in FACTORIES and "device" not in kwargs:
            frame = sys._getframe(1)  # the caller of the factory
            caller = Path(frame.f_code.co_filename)
            if caller.is_relative_to(ROOT) and caller.relative_to(ROOT).parts[0] in PACKAGES:
                self.found.add(f"{caller.relative_to(ROOT)}:{frame.f_lineno}")
        return func(*args, **kwargs)


def _tasks(backbone) -> dict[str, TaskModel]:  # noqa: ANN001  (a FrozenBackbone)
    """Every method that builds on ``backbone`` (light head), and ``cst`` with every other head."""
    tasks = {}
    for i, (method, head) in enumerate([(m, "light") for m in list_tuners()] + [("cst", h) for h in list_heads()]):
        torch.manual_seed(i)
        try:
            tasks[f"{method}-{head}"] = build_task_model(method, {}, backbone, ["a", "b"], {"name": head}).eval()
        except TunerError:  # a method for the other family (hst_full needs a ViT)
            continue
    return tasks


@pytest.mark.parametrize("stacked", [False, True])
def test_the_serving_path_names_the_device_of_every_tensor_it_makes(backbone, photos, stacked: bool):
    """Two images in one batch with every task, on the server's mobilenet_v2 and on a small ViT;
    the canvases are made beforehand, as the server makes them on the request's thread (CPU)."""
    covered = set()
    for net in (backbone, small_backbone("vit_b_16")):
        tasks = _tasks(net)
        covered |= {t.split("-")[0] for t in tasks}
        transform = ImageTransform(net.preprocess)
        ready = [transform.one(decode_image(p, 1 << 24, 1 << 26)) for p in photos[:2]]
        stacks = StackCache() if stacked else None
        executor = Executor(net, build_runtime(net, "torch", "cpu"), Metrics(), stacks=stacks)
        post = PostprocessConfig(score_thresh=0.0)  # every candidate goes through NMS
        with DevicelessFactories() as mode:
            result = executor.run([WorkItem(c, str(i), tasks, post, meta=m) for i, (c, m) in enumerate(ready)])
        executor.close()
        assert not mode.found, (net.name, sorted(mode.found))
        failed = {t: d for row in result.detections for t, d in row.items() if not isinstance(d, Detections)}
        assert not failed and all(len(d) for row in result.detections for d in row.values()), failed
    assert covered == set(list_tuners())


@pytest.mark.parametrize("method", ["cst", "lora", "dyn_adapter"])
def test_training_names_the_device_of_every_tensor_it_makes(tmp_path: Path, method: str):
    """A training epoch and an evaluation of a side, an inline and an early-exit method. Only the
    data pipeline makes tensors on the CPU, by design: the loop moves each batch to the device."""
    generate(SynthConfig(task="digits", images=8, size=64, min_scale=12, max_scale=24, val_fraction=0.25), tmp_path)
    values = {"method": method, "data": tmp_path, "epochs": 1, "image_size": 64, "batch_size": 4}
    trainer = Trainer(build_config({**values, "augmentation": "none", "out": tmp_path / "out", "progress": False}))
    with DevicelessFactories() as mode:
        trainer.train_epoch()
        trainer.evaluate()
    assert not {f for f in mode.found if not f.startswith(CPU_BY_DESIGN)}, sorted(mode.found)
