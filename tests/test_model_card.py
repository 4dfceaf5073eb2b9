"""Issue #21: the model card every run writes (README.md), the plain-PEFT reload of the default adapter, and
the evaluations a default run makes (a curve, and the report saying when the best adapter was taken)."""

import json

import pytest
import yaml
from conftest import sentiment_rows, tiny_args, write_csv
from test_report import fake_results

import eval as evaluation
import lora_setup
import metric_names
import model_card
import reporting
import settings
import train_loop


def read_card(path) -> tuple[dict, str]:
    """``(front matter, body)`` of a README.md, the way the Hub splits it."""
    text = path.read_text()
    assert text.startswith("---\n"), "no YAML front matter"
    meta, body = text[len("---\n"):].split("\n---\n", 1)
    return yaml.safe_load(meta), body


# --- hub_id ------------------------------------------------------------------------------------


def test_hub_id_names_the_model_as_others_find_it(tmp_path):
    assert lora_setup.hub_id("embedded:minilm") == "sentence-transformers/all-MiniLM-L6-v2"
    assert lora_setup.hub_id("embedded:smollm2") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert lora_setup.hub_id("distilbert-base-uncased") == "distilbert-base-uncased"
    assert lora_setup.hub_id("FacebookAI/roberta-base") == "FacebookAI/roberta-base"
    (tmp_path / "my-bert").mkdir()
    assert lora_setup.hub_id(str(tmp_path / "my-bert")) == "my-bert"
    assert lora_setup.hub_id(str(tmp_path / "my-bert") + "/") == "my-bert"
    with pytest.raises(lora_setup.ModelSetupError, match="unknown embedded model 'embedded:bert'"):
        lora_setup.hub_id("embedded:bert")


# --- the card of a real run --------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """A tiny run with the default settings but size; the trained PeftModel is kept for comparison."""
    tmp = tmp_path_factory.mktemp("card")
    csv = str(write_csv(tmp / "reviews.csv", sentiment_rows(200)))
    out = tmp / "run"
    args = tiny_args(tiny_model_dir("bert"), csv, out, "--num_epochs", "2")  # 160 train rows / 8 = 20 steps per epoch
    kept = {}
    real_finish = train_loop.finish

    def finish(run, *rest):
        kept["model"] = run.accelerator.unwrap_model(run.model)  # holds the best adapter's weights by now
        return real_finish(run, *rest)

    train_loop.finish = finish
    try:
        assert train_loop.main(args) == 0
    finally:
        train_loop.finish = real_finish
    return {"out": out, "args": args, "model": kept["model"], "model_dir": tiny_model_dir("bert"),
            "results": json.loads((out / "metrics.json").read_text())}


def test_every_run_writes_a_card_whose_numbers_are_its_metrics(trained):
    out, results = trained["out"], trained["results"]
    meta, body = read_card(out / "README.md")
    assert meta["library_name"] == "peft" and meta["pipeline_tag"] == "text-classification"
    assert meta["base_model"] == lora_setup.hub_id(trained["model_dir"]) != trained["model_dir"]  # no local path
    assert meta["license"] == "other" and "datasets" not in meta  # a local CSV is no Hub dataset
    (entry,) = meta["model-index"]
    assert entry["name"] == "run"
    (result,) = entry["results"]
    assert result["dataset"]["type"] == "reviews.csv"
    assert "40 rows held out from train" in result["dataset"]["split"]
    scores = {m["type"]: m["value"] for m in result["metrics"]}
    assert scores == {"accuracy": round(results["final"]["accuracy"], 4), "f1": round(results["final"]["f1"], 4)}
    assert set(meta["metrics"]) == set(scores)
    from huggingface_hub import ModelCard  # the Hub's own reader of the metadata finds the same results

    hub = ModelCard.load(out / "README.md").data
    assert hub.library_name == "peft" and {r.metric_type: r.metric_value for r in hub.eval_results} == scores
    # the body: reporting's before/after and per-class tables of this run's metrics.json, its labels and time
    assert reporting.before_after_table(results["baseline"], results["final"], metric_names.REPORT_METRICS) in body
    assert "\n".join(reporting.per_class_section(results)[1:2]) in body
    assert "0 = `0`, 1 = `1`" in body and reporting.duration(results["train_seconds"]) in body
    assert f"taken at step {results['best_step']} of {results['optimizer_steps']}" in body
    assert "AutoPeftModelForSequenceClassification.from_pretrained(" in body and 'pipeline("text-classification"' in body
    assert "More Information Needed" not in body  # PEFT's template is gone ...
    best_meta, _ = read_card(out / "best_adapter" / "README.md")  # ... from best_adapter/ too
    assert best_meta["model-index"] == meta["model-index"]


def test_default_adapter_reloads_with_plain_peft_and_predicts_the_same(trained):
    """The README's plain-PEFT snippet on a run with the default head and LoRA targets (the CLS pooler
    included): the reloaded model gives the trained model's probabilities on the run's eval texts."""
    from peft import AutoPeftModelForSequenceClassification
    from transformers import AutoConfig, AutoTokenizer

    run = trained["out"]
    labels = AutoConfig.from_pretrained(run)
    reloaded = AutoPeftModelForSequenceClassification.from_pretrained(
        run, num_labels=labels.num_labels, id2label=labels.id2label, label2id=labels.label2id)
    tokenizer = AutoTokenizer.from_pretrained(run)
    splits = train_loop.load_data(train_loop.parse_config(trained["args"]))
    texts = list(splits.eval["text"])
    expected = evaluation.predict(trained["model"], tokenizer, texts, max_length=32)
    got = evaluation.predict(reloaded, tokenizer, texts, max_length=32)
    assert [r["label"] for r in got] == [r["label"] for r in expected]
    assert [r["p_1"] for r in got] == pytest.approx([r["p_1"] for r in expected], abs=1e-5)
    accuracy = sum(r["label_id"] == y for r, y in zip(got, splits.eval["label"])) / len(texts)
    assert accuracy == trained["results"]["final"]["accuracy"] > 0.5  # and it had learned something


def test_default_run_evaluates_three_times_per_epoch_and_reports_the_best_step(trained):
    results = trained["results"]
    assert results["steps_per_epoch"] == 20
    evals = [h for h in results["history"] if "eval/accuracy" in h]
    assert [h["step"] for h in evals] == [7, 14, 21, 28, 35, 40]  # every 7 steps, and the last one
    best = max(evals, key=lambda h: h["eval/accuracy"])  # the first of equals: later ones do not replace it
    assert results["best_step"] == best["step"]
    assert results["final"]["accuracy"] == best["eval/accuracy"]
    report = (trained["out"] / reporting.REPORT_FILE).read_text()
    assert f"taken at step {best['step']} of 40 (epoch {best['step'] / 20:.2f} of 2.00)" in report


@pytest.mark.parametrize("eval_every, steps_per_epoch, expected", [
    (None, 236, 79), (None, 20, 7), (None, 3, 1), (None, 1, 1), (None, 237, 79), (0, 236, 0), (7, 236, 7)])
def test_evaluation_interval(eval_every, steps_per_epoch, expected):
    assert settings.evaluation_interval(eval_every, steps_per_epoch) == expected


# --- the card of the embedded default, and its command line ------------------------------------


def default_results() -> dict:
    results = fake_results(["negative", "positive"], [0, 0, 1, 1], [0, 0, 0, 0], [0, 1, 1, 1])
    results["config"].update(model="embedded:minilm", dataset="embedded:rotten_tomatoes", target_modules=None)
    return {**results, "best_step": 10, "steps_per_epoch": 5}


def test_card_of_the_embedded_default_names_hub_model_dataset_and_citation(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    path, = model_card.write_cards(run, default_results(), best_dir=run / "best_adapter")  # no best_adapter/ card
    meta, body = read_card(path)
    assert meta["base_model"] == "sentence-transformers/all-MiniLM-L6-v2" and meta["license"] == "apache-2.0"
    assert meta["datasets"] == ["cornell-movie-review-data/rotten_tomatoes"] and meta["language"] == ["en"]
    assert {"sentiment-analysis", "lora", "peft"} <= set(meta["tags"])
    assert meta["model-index"][0]["results"][0]["metrics"] == [
        {"type": "accuracy", "name": "Accuracy", "value": 0.75}, {"type": "f1", "name": "F1 (positive)", "value": 0.8}]
    assert "Pang, Bo and Lee, Lillian" in body and "English movie reviews" in body
    assert "epoch 2.00 of 2.00" in body  # best_step 10 of 5-step epochs


def test_card_command_adds_measured_cross_domain_scores(tmp_path, capsys):
    (tmp_path / "metrics.json").write_text(json.dumps(default_results()))
    scores = {"accuracy": 0.8123, "f1": 0.8, "num_samples": 2500}
    (tmp_path / "imdb.json").write_text("note: something eval.py says\n" + json.dumps(scores, indent=2))
    assert model_card.main(["--adapter_dir", str(tmp_path), "--cross_domain", f"embedded:imdb={tmp_path / 'imdb.json'}"]) == 0
    _, body = read_card(tmp_path / "README.md")
    assert "| embedded:imdb | 0.8123 | 0.8000 | 2500 |" in body
    assert model_card.main(["--adapter_dir", str(tmp_path), "--cross_domain", "imdb.json"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --cross_domain takes NAME=FILE, like embedded:imdb=imdb.json (got 'imdb.json')"]
    assert model_card.main(["--adapter_dir", str(tmp_path / "nowhere")]) == 2
    assert "metrics.json' does not exist" in capsys.readouterr().err
