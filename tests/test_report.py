"""Metrics for 3+ classes, report.md, the PNG plots, and a 3-class local CSV end to end."""

import dataclasses
import json
import re
import struct
import sys

import pytest
import yaml
from conftest import sentiment_rows, tiny_args, write_csv

import eval as evaluation
import reporting
import train_loop

NAMES = ["negative", "neutral", "positive"]
# 9 eval rows, 3 per class. Before: everything "negative". After: two mistakes.
TRUE = [0, 0, 0, 1, 1, 1, 2, 2, 2]
BEFORE = [0] * 9
AFTER = [0, 0, 1, 1, 1, 2, 2, 2, 2]


def fake_results(label_names=NAMES, true=TRUE, before=BEFORE, after=AFTER) -> dict:
    """A results dict shaped exactly like train_loop.train()'s metrics.json, from real compute_metrics."""
    baseline = {**evaluation.compute_metrics(true, before, label_names), "loss": 1.1}
    final = {**evaluation.compute_metrics(true, after, label_names), "loss": 0.4}
    speed = {"train/samples_per_s": 50.0, "train/tokens_per_s": 900.0}
    history = [
        {"step": 5, "epoch": 0, "train/loss": 1.0, "train/lr": 1e-3, **speed},
        {"step": 10, "epoch": 1, "train/loss": 0.6, "train/lr": 5e-4, **speed},
        {"step": 10, "epoch": 1, **{f"eval/{k}": v for k, v in final.items() if isinstance(v, float)}},
    ]
    config = {f.name: f.default for f in dataclasses.fields(train_loop.TrainConfig)}
    config.update(model="tiny-bert", dataset="reviews.csv", target_modules=["query", "value"], learning_rate=1e-5)
    return {"baseline": baseline, "final": final, "label_names": label_names, "history": history,
            "trainable_parameters": 1_971, "total_parameters": 8_294, "trainable_share": 1_971 / 8_294,
            "optimizer_steps": 10, "train_seconds": 125.4, "train_samples_per_s": 51.0, "train_tokens_per_s": 925.0,
            "num_processes": 1, "mixed_precision": "no", "config": config}


def png_size(path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", header[16:24])


# --- metrics ----------------------------------------------------------------------------------


def test_three_class_metrics_by_hand():
    m = evaluation.compute_metrics(TRUE, AFTER, NAMES)
    # negative: 2 of 3 found, both right; neutral: 2 of 3 found, 2 of 3 predicted right;
    # positive: 3 of 3 found, 3 of 4 predicted right.
    assert m["per_class"]["negative"] == {"precision": 1.0, "recall": 2 / 3, "f1": 0.8, "support": 3}
    assert m["per_class"]["neutral"] == pytest.approx({"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "support": 3})
    assert m["per_class"]["positive"] == pytest.approx({"precision": 0.75, "recall": 1.0, "f1": 6 / 7, "support": 3})
    macro_f1 = (0.8 + 2 / 3 + 6 / 7) / 3
    assert m["f1"] == pytest.approx(macro_f1) and m["f1_macro"] == pytest.approx(macro_f1)
    assert m["f1_micro"] == pytest.approx(7 / 9) == m["accuracy"]
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 2, 1], [0, 0, 3]]


def test_balanced_accuracy_sees_an_ignored_rare_class():
    labels = [0] * 8 + [1] * 2  # 80/20 imbalance; the model never predicts the rare class
    m = evaluation.compute_metrics(labels, [0] * 10, ["common", "rare"])
    assert m["accuracy"] == 0.8 and m["balanced_accuracy"] == 0.5
    assert m["per_class"]["rare"]["recall"] == 0.0


# --- report.md --------------------------------------------------------------------------------


def test_report_holds_tables_time_share_and_a_reusable_config(tmp_path):
    results = fake_results()
    text = reporting.write_report(tmp_path, results).read_text()
    assert "| accuracy | 0.3333 | 0.7778 | +0.4444 |" in text
    assert "| balanced_accuracy | 0.3333 | 0.7778 | +0.4444 |" in text
    assert "| loss | 1.1000 | 0.4000 | -0.7000 |" in text
    assert "macro averages" in text
    # per class, after training (with F1 before) ...
    assert "| neutral | 0.6667 | 0.6667 | 0.6667 | 0.0000 | 3 |" in text
    # ... and both confusion matrices, rows = true class, in label order
    assert "| true \\ predicted | negative | neutral | positive |" in text
    assert "| **negative** | 3 | 0 | 0 |\n| **neutral** | 3 | 0 | 0 |" in text
    assert "| **negative** | 2 | 1 | 0 |\n| **neutral** | 0 | 2 | 1 |\n| **positive** | 0 | 0 | 3 |" in text
    assert "training time: 2 min 5 s" in text and "51.0 samples/s" in text
    assert "1,971 of 8,294 (23.76 %)" in text
    assert "## Plots" not in text  # none saved yet
    config_block = text.split("```yaml\n")[1].split("```")[0]
    # How the run was started is left out: fed back, --overwrite would move the very run aside.
    assert yaml.safe_load(config_block) == {k: v for k, v in results["config"].items()
                                            if k not in ("overwrite", "resume_from_checkpoint")}


def test_binary_report_names_the_positive_class():
    text = reporting.format_report(fake_results(["bad", "good"], [0, 0, 1, 1], [0, 0, 0, 0], [0, 1, 1, 1]))
    assert "positive class `good`" in text and "| **good** | 0 | 2 |" in text


def test_report_links_the_plots_that_exist(tmp_path):
    pytest.importorskip("matplotlib")
    results = fake_results()
    paths = reporting.save_plots(tmp_path, results)
    text = reporting.write_report(tmp_path, results).read_text()
    assert [p.name for p in paths] == [reporting.CURVES_FILE, reporting.CONFUSION_FILE]
    for path in paths:
        assert f"]({path.name})" in text


def test_report_from_the_command_line(tmp_path, capsys):
    assert evaluation.main(["--adapter_dir", str(tmp_path), "--report"]) == 2
    assert "metrics.json' does not exist" in capsys.readouterr().err
    (tmp_path / "metrics.json").write_text(json.dumps(fake_results()))
    assert evaluation.main(["--adapter_dir", str(tmp_path), "--report"]) == 0
    assert "| accuracy | 0.3333 | 0.7778 | +0.4444 |" in (tmp_path / reporting.REPORT_FILE).read_text()


# --- plots ------------------------------------------------------------------------------------


def test_plots_are_pngs_sized_for_reading(tmp_path):
    pytest.importorskip("matplotlib")
    curves, confusion = reporting.save_plots(tmp_path, fake_results())
    width, height = png_size(curves)
    assert width > 2 * height > 800  # three panels side by side
    width, height = png_size(confusion)
    assert width > 1.5 * height > 500  # two matrices side by side


def test_plots_are_skipped_with_a_note_without_matplotlib(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    assert reporting.save_plots(tmp_path, fake_results()) == []
    note = capsys.readouterr().out
    assert "matplotlib is not installed" in note and "pip install" in note and note.count("\n") == 1
    assert not list(tmp_path.iterdir())


# --- a 3-class local CSV, end to end ----------------------------------------------------------


def test_three_class_csv_end_to_end(tiny_model_dir, tmp_path):
    rows = [(text, NAMES[[0, 2, 1][label]]) for text, label in sentiment_rows(150, num_classes=3)]
    csv_path = write_csv(tmp_path / "three.csv", rows)
    out = tmp_path / "run"
    assert train_loop.main(tiny_args(tiny_model_dir("bert"), str(csv_path), out, "--max_steps", "6")) == 0
    results = json.loads((out / "metrics.json").read_text())
    assert results["label_names"] == NAMES  # string labels, read from the data, in sorted order
    for key in ("baseline", "final"):
        metrics = results[key]
        assert sorted(metrics["per_class"]) == NAMES
        assert sum(row["support"] for row in metrics["per_class"].values()) == metrics["num_samples"] == 40
        assert len(metrics["confusion_matrix"]) == 3 and all(len(row) == 3 for row in metrics["confusion_matrix"])
        assert metrics["f1"] == metrics["f1_macro"]
    text = reporting.write_report(out, results).read_text()
    assert "| **neutral** |" in text and str(results["config"]["max_steps"]) in text


@pytest.mark.parametrize("label_names, true, shown", [
    (["negative", "positive"], [0, 0, 1, 1], "f1 (class 'positive')"),
    (NAMES, TRUE, "f1 (macro)"),
])
def test_console_table_says_which_f1(label_names, true, shown):
    """With two classes f1 is the positive class's, with more the macro average: the table says which."""
    results = fake_results(label_names, true, [0] * len(true), true)
    table = reporting.format_comparison(results["baseline"], results["final"], label_names)
    rows = [line for line in table.splitlines() if line.startswith("f1")]
    assert len(rows) == 1 and rows[0].startswith(shown + " ") and rows[0].split()[-3:] == [
        f"{results['baseline']['f1']:.4f}", f"{results['final']['f1']:.4f}",
        f"{results['final']['f1'] - results['baseline']['f1']:+.4f}"]
    summary = table.splitlines()[:1 + len(reporting.SUMMARY_METRICS)]
    assert len({len(line) for line in summary}) == 1  # the wider name keeps the columns in line


def test_baseline_line_says_which_f1(tiny_model_dir, tmp_path, capsys):
    path = write_csv(tmp_path / "r.csv", [(t, ["bad", "good"][y]) for t, y in sentiment_rows(60)])
    assert train_loop.main(tiny_args(tiny_model_dir("bert"), str(path), tmp_path / "run", "--eval_size", "20",
                                     "--max_steps", "1")) == 0
    assert re.search(r"baseline \(before training\): accuracy [\d.]+, f1 \(class 'good'\) [\d.]+",
                     capsys.readouterr().out)
