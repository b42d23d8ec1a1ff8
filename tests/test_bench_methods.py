"""The methods benchmark's protocol: each method is reported at the learning rate that did best on
val, never at the one that did best on test, and its table says which rate that was."""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.methods import Run, best_by_val, data_for, extensions
from bench.methods_table import markdown
from tuners.data.formats import read_coco
from tuners.data.synth import SynthConfig, generate


def _result(method: str, lr: float, val: float, test: float, **extra: object) -> dict:
    kind = "inline" if method in ("lora", "full_finetune") else "side"
    return {"method": method, "kind": kind, "lr": lr, "seed": 0, "fraction": 1.0, "val_AP50": val,
            "test_AP50": test, "test_AP": test / 2, "trainable_params": 1e6 if kind == "side" else 4e6,
            "peak_memory_bytes": 2**27 if kind == "side" else 2**30, "artifact_bytes": 4e6,
            "seconds_per_epoch": 3.0, "task_cost_fraction_of_backbone": 0.3, **extra}  # fmt: skip


def test_each_method_is_chosen_on_val_and_reported_on_test() -> None:
    sweep = [
        _result("cst", 0.002, val=0.40, test=0.55),  # best on test, not on val: not chosen
        _result("cst", 0.004, val=0.50, test=0.45),
        _result("cst", 0.008, val=0.50, test=0.47),  # a tie on val goes to the lower rate
        _result("full_finetune", 0.0005, val=0.30, test=0.30),
        _result("full_finetune", 0.001, val=0.35, test=0.33),
        {"method": "lora", "lr": 0.001, "seed": 0, "fraction": 1.0, "error": "loss is nan"},
    ]
    best = best_by_val(sweep)
    assert best["cst"]["lr"] == 0.004 and best["full_finetune"]["lr"] == 0.001 and "lora" not in best
    later = [_result("cst", 0.004, val=0.5, test=0.41, seed=1), _result("cst", 0.004, val=0.3, test=0.2, fraction=0.5)]
    args = argparse.Namespace(images=300, test_images=120, epochs=8, top=1, workers=2)
    table = markdown(sweep, best, later, args)
    row = next(line for line in table.splitlines() if line.startswith("| `cst` | side | 0.004"))
    assert "0.430 (0.450, 0.410)" in row  # mean of two seeds, then each
    assert "| 0.25 |" in row and "| 0.12 |" in row  # params and memory as fractions of full_finetune's
    assert "| `lora` | inline | - | no result: loss is nan |" in table
    assert "| `cst` | 0.002: 0.400 · 0.004: 0.500 · 0.008: 0.500 |" in table
    assert "| `cst` | 0.200 | 0.450 |" in table  # the data-efficiency curve: 50%, then 100%


def test_data_fractions_keep_the_first_training_images_and_the_whole_val_split(tmp_path: Path) -> None:
    generate(SynthConfig(task="digits", images=10, size=64, min_scale=16, max_scale=24, seed=0), tmp_path / "d")
    half = data_for(tmp_path / "d", 0.5)
    whole, part = read_coco(tmp_path / "d" / "train"), read_coco(half / "train")
    assert [r.path.name for r in part.records] == [r.path.name for r in whole.records[:4]]
    assert len(read_coco(half / "val").records) == 2 and data_for(tmp_path / "d", 1.0) == tmp_path / "d"
    assert Run("cst", 0.004, 1, 0.5).name == "cst-lr0.004-seed1-data0.5"


def test_a_grid_grows_only_where_its_best_rate_is_its_top() -> None:
    grid = {"cst": [0.002, 0.004], "full_finetune": [0.0005, 0.001], "lora": [0.001]}
    sweep = [
        _result("cst", 0.002, val=0.40, test=0.4),
        _result("cst", 0.004, val=0.45, test=0.4),  # best at the top: cst goes on to 0.008
        _result("full_finetune", 0.0005, val=0.35, test=0.3),
        _result("full_finetune", 0.001, val=0.30, test=0.3),  # best inside the grid: stays
        {"method": "lora", "lr": 0.001, "seed": 0, "fraction": 1.0, "error": "loss is nan"},  # no best: stays
    ]
    assert extensions(sweep, grid) == [Run("cst", 0.008)]
    assert grid == {"cst": [0.002, 0.004, 0.008], "full_finetune": [0.0005, 0.001], "lora": [0.001]}
