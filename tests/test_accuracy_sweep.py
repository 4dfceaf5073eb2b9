"""bench/accuracy_sweep.py: each variant changes what it says and nothing else, and its table adds up."""

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_args

import train_loop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import accuracy_sweep  # noqa: E402


@pytest.fixture
def tiny_model(tiny_model_dir):
    cfg = train_loop.TrainConfig(model=tiny_model_dir("bert"), lora_r=4, lora_alpha=8)
    model, _ = train_loop.build_model(cfg, ["neg", "pos"], 0)
    return model


def learning_rates(optimizer) -> dict[int, float]:
    return {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}


@pytest.mark.parametrize("hook, faster", [(accuracy_sweep.head_learning_rate, "modules_to_save"),
                                          (accuracy_sweep.loraplus, "lora_B")])
def test_a_faster_group_speeds_up_only_its_parameters(tiny_model, hook, faster):
    optimizer = hook(10.0)(tiny_model, 1e-3, 0.01)
    rates = learning_rates(optimizer)
    trainable = [(n, p) for n, p in tiny_model.named_parameters() if p.requires_grad]
    assert set(rates) == {id(p) for _, p in trainable}  # every trainable parameter, once
    for name, param in trainable:
        assert rates[id(param)] == pytest.approx(1e-2 if faster in name else 1e-3), name
    assert {g["weight_decay"] for g in optimizer.param_groups if g["params"][0].ndim < 2} == {0.0}  # as train_loop


def test_full_finetuning_trains_the_base_and_not_the_zero_adapter(tiny_model_dir):
    build = accuracy_sweep.full_finetuning(train_loop.build_model)
    cfg = train_loop.TrainConfig(model=tiny_model_dir("bert"), lora_r=4, lora_alpha=8)
    model, _ = build(cfg, ["neg", "pos"], 0)
    for name, param in model.named_parameters():
        assert param.requires_grad == ("lora_" not in name), name


def test_dropout_hook_reaches_every_dropout_attention_included(tiny_model_dir):
    build = accuracy_sweep.with_dropout(train_loop.build_model, 0.0)
    cfg = train_loop.TrainConfig(model=tiny_model_dir("bert"), lora_r=4, lora_alpha=8)
    model, _ = build(cfg, ["neg", "pos"], 0)
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and all(m.p == 0.0 for m in dropouts)


def test_label_smoothing_changes_the_training_loss_only_by_its_epsilon():
    logits, labels = torch.randn(6, 3), torch.tensor([0, 1, 2, 0, 1, 2])
    smoothed = accuracy_sweep.SmoothedFunctional(0.1)
    assert smoothed.cross_entropy(logits, labels) == pytest.approx(F.cross_entropy(logits, labels, label_smoothing=0.1).item())
    assert smoothed.softmax is F.softmax  # everything else is torch's own


def test_one_run_appends_its_record(tiny_model_dir, tiny_csv, tmp_path, monkeypatch):
    for name in ("build_model", "build_optimizer", "F"):  # the hooks patch train_loop: restored after the test
        monkeypatch.setattr(train_loop, name, getattr(train_loop, name))
    results = tmp_path / "sweep.jsonl"
    flags = tiny_args(tiny_model_dir("bert"), tiny_csv, tmp_path / "ignored", "--max_steps", "4")
    flags = [f for f in flags if f not in ("--output_dir", str(tmp_path / "ignored"))]
    assert accuracy_sweep.main(["--variant", "head_lr10", "--seed", "3", "--output_dir", str(tmp_path / "run"),
                                "--results", str(results), *flags]) == 0
    record = json.loads(results.read_text())
    assert (record["variant"], record["seed"], record["optimizer_steps"]) == ("head_lr10", 3, 4)
    assert record["accuracy_last"] == record["evals"][-1][1]
    assert record["accuracy_best"] == max(acc for _, acc in record["evals"])
    assert (tmp_path / "run" / "adapter_config.json").is_file()


def test_the_table_averages_over_seeds_and_the_newest_record_counts():
    def record(variant, seed, best, last, seconds=100.0):
        return {"variant": variant, "seed": seed, "accuracy_best": best, "accuracy_last": last,
                "train_seconds": seconds}

    records = [record("default", 42, 0.80, 0.79), record("default", 43, 0.82, 0.82), record("default", 44, 0.84, 0.83),
               record("lr1e-3", 42, 0.50, 0.50), record("lr1e-3", 42, 0.83, 0.81, 300.0)]  # a rerun replaces
    lines = accuracy_sweep.table(records).splitlines()
    assert lines[0] == "| variant | seed 42 | seed 43 | seed 44 | mean (sd) | mean at last eval | train s |"
    assert lines[2] == "| default | 80.0 (79.0) | 82.0 (82.0) | 84.0 (83.0) | 82.0 (2.0) | 81.3 | 100 |"
    assert lines[3] == "| lr1e-3 | 83.0 (81.0) |  |  | 83.0 | 81.0 | 300 |"
