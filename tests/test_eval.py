"""eval.py: metrics equal scikit-learn's computed directly; evaluate() scores every sample once."""

import json

import datasets
import numpy as np
import pytest
import torch
from accelerate import Accelerator
from conftest import sentiment_rows, tiny_args, write_csv
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_score, recall_score

import data
import eval as evaluation
import reporting
import lora_setup


def test_binary_metrics_equal_sklearn():
    rng = np.random.default_rng(0)
    labels, predictions = rng.integers(0, 2, 200), rng.integers(0, 2, 200)
    metrics = evaluation.compute_metrics(labels, predictions, ["neg", "pos"])
    assert metrics["accuracy"] == accuracy_score(labels, predictions)
    assert metrics["f1"] == f1_score(labels, predictions)
    assert metrics["precision"] == precision_score(labels, predictions)
    assert metrics["recall"] == recall_score(labels, predictions)
    assert metrics["confusion_matrix"] == confusion_matrix(labels, predictions).tolist()


def test_multiclass_metrics_are_macro_averages():
    rng = np.random.default_rng(1)
    labels, predictions = rng.integers(0, 3, 300), rng.integers(0, 3, 300)
    metrics = evaluation.compute_metrics(labels, predictions, ["a", "b", "c"])
    assert metrics["f1"] == f1_score(labels, predictions, average="macro")
    assert metrics["f1_weighted"] == f1_score(labels, predictions, average="weighted")
    assert metrics["f1_micro"] == pytest.approx(accuracy_score(labels, predictions))


def test_evaluate_matches_a_direct_forward_pass(tiny_model_dir):
    model_dir = tiny_model_dir("bert")
    tokenizer = lora_setup.load_tokenizer(model_dir)
    model, heads = lora_setup.load_base_model(model_dir, ["0", "1"], tokenizer.pad_token_id)
    rows = sentiment_rows(37)
    ds = datasets.Dataset.from_dict({"text": [t for t, _ in rows], "label": [y for _, y in rows]})
    tokenized = data.tokenize(ds, tokenizer, 32)
    accelerator = Accelerator(cpu=True)
    loader = accelerator.prepare(data.build_dataloader(tokenized, tokenizer.pad_token_id, 8, train=False))
    metrics = evaluation.evaluate(model, loader, accelerator, ["0", "1"])
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(input_ids=torch.tensor([ids])).logits for ids in tokenized["input_ids"]])
    labels = torch.tensor(list(ds["label"]))
    assert metrics["num_samples"] == 37
    assert metrics["accuracy"] == pytest.approx((logits.argmax(-1) == labels).float().mean().item())
    assert metrics["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-5)


# --- eval.py re-scores a run on the very split it trained with (issue #9.7) ------------------------


def _trained_run(tmp_path, model_dir, dataset, *flags):
    import train_loop

    out = tmp_path / "run"
    assert train_loop.main(tiny_args(model_dir, dataset, out, "--max_steps", "2", *flags)) == 0
    return out, json.loads((out / "metrics.json").read_text())["final"]


def _rescore(out, capsys) -> dict:
    capsys.readouterr()
    assert evaluation.main(["--adapter_dir", str(out)]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    return json.loads(printed[printed.index("{"):])


def test_eval_rescores_a_drop_empty_texts_run(tiny_model_dir, tmp_path, capsys):
    rows = [("", 0), (" ", 1)] + sentiment_rows(100)
    csv_path = write_csv(tmp_path / "r.csv", rows)
    out, final = _trained_run(tmp_path, tiny_model_dir("bert"), str(csv_path), "--drop_empty_texts")
    rescored = _rescore(out, capsys)
    assert (rescored["num_samples"], rescored["accuracy"]) == (final["num_samples"], final["accuracy"])


def _fake_hub(sizes: dict):
    """data.load_raw for a Hub dataset with labelled splits of the given sizes (the Hub is offline)."""
    def load_raw(dataset, eval_file=None, dataset_config=None, eval_split=None, notes=None):
        def split(name):
            rows = sentiment_rows(sizes[name], seed=len(name))
            return datasets.Dataset.from_dict({"text": [f"{name} {t}" for t, _ in rows], "label": [y for _, y in rows]})
        return split("train"), split(eval_split or "validation")
    return load_raw


def test_eval_rescores_the_eval_split_the_run_used(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(data, "load_raw", _fake_hub({"train": 80, "validation": 10, "test": 16}))
    out, final = _trained_run(tmp_path, tiny_model_dir("bert"), "someone/reviews", "--eval_split", "test")
    assert final["num_samples"] == 16
    rescored = _rescore(out, capsys)
    assert (rescored["num_samples"], rescored["accuracy"]) == (16, final["accuracy"])


# --- eval.py --predict: one writer, clean errors (issue #9.10) -----------------------------------


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, tmp_path_factory):
    import train_loop

    folder = tmp_path_factory.mktemp("eval-run")
    out = folder / "run"
    csv_path = write_csv(folder / "r.csv", sentiment_rows(60))
    assert train_loop.main(tiny_args(tiny_model_dir("bert"), str(csv_path), out, "--max_steps", "2",
                                     "--eval_size", "20")) == 0
    return out


def test_predict_writes_and_prints_only_on_the_main_process(tiny_run, tmp_path, capsys, monkeypatch):
    import accelerate

    class OtherRank(accelerate.Accelerator):
        is_main_process = property(lambda self: False)

    monkeypatch.setattr(accelerate, "Accelerator", OtherRank)
    output = tmp_path / "p.csv"
    capsys.readouterr()
    assert evaluation.main(["--adapter_dir", str(tiny_run), "--predict", "good film", "--output", str(output)]) == 0
    assert not output.exists() and capsys.readouterr().out == ""
    assert evaluation.main(["--adapter_dir", str(tiny_run), "--predict", "good film"]) == 0
    assert capsys.readouterr().out == ""


def test_empty_predict_file_is_a_clean_error(tiny_run, tmp_path, capsys):
    texts = tmp_path / "texts.txt"
    texts.write_text("\n  \n")
    capsys.readouterr()
    code = evaluation.main(["--adapter_dir", str(tiny_run), "--predict_file", str(texts),
                            "--output", str(tmp_path / "p.csv")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "holds no text" in err
    assert not (tmp_path / "p.csv").exists()


def test_report_says_macro_f1_counts_classes_absent_from_the_eval_split():
    from test_report import fake_results

    true, predicted = [0, 0, 0, 2, 2, 2], [0, 0, 1, 2, 2, 2]  # no eval sample of class 1 ("neutral")
    report = reporting.format_report(fake_results(true=true, before=[0] * 6, after=predicted))
    assert "the eval split holds no sample of `neutral`" in report and "f1_macro" in report
    assert "holds no sample" not in reporting.format_report(fake_results())


def test_predict_reads_a_long_text_as_averaged_windows(tiny_model_dir):
    """--long_text windows: every window of a too-long text is scored and the logits averaged."""
    import eval as evaluation
    import lora_setup
    import train_loop

    model, _ = train_loop.build_model(train_loop.TrainConfig(model=tiny_model_dir("bert")), ["neg", "pos"], 0)
    model.eval()
    tokenizer = lora_setup.load_tokenizer(tiny_model_dir("bert"))
    text = " ".join(["good film"] * 12 + ["bad plot"] * 12)  # 48 words: [CLS] + 48 + [SEP]
    ids = tokenizer(text)["input_ids"]
    windows = data.window_ids(ids, 16, 1, 1)
    assert len(windows) > 2 and all(len(w) == 16 and w[0] == ids[0] and w[-1] == ids[-1] for w in windows)
    assert windows[0][1:-1] == ids[1:15] and windows[-1][1:-1] == ids[-15:-1]  # from the start to the end
    with torch.inference_mode():
        expected = torch.stack([model(input_ids=torch.tensor([w])).logits[0] for w in windows]).mean(0).softmax(-1)
        tail = model(input_ids=torch.tensor([data.truncate_ids(ids, 16, "tail", 1, 1)])).logits[0].softmax(-1)
    whole = evaluation.predict(model, tokenizer, [text, "good"], max_length=16, long_text="windows", batch_size=2)[0]
    assert [whole["p_neg"], whole["p_pos"]] == pytest.approx(expected.tolist(), abs=1e-5)
    cut = evaluation.predict(model, tokenizer, [text], max_length=16, truncation="tail")[0]
    assert [cut["p_neg"], cut["p_pos"]] == pytest.approx(tail.tolist(), abs=1e-5)  # cut as the run trained
