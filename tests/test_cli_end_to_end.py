"""The real thing, offline: the CLI on the embedded MiniLM and Rotten Tomatoes, a handful of steps,
then the saved adapter reloaded with plain PEFT must reproduce the reported predictions."""

import json
import re
import os
import subprocess
import sys
from pathlib import Path

import torch

import data
import eval as evaluation

REPO = Path(__file__).resolve().parent.parent


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600, cwd=REPO,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})


def test_cli_trains_saves_and_plain_peft_reproduces_it(tmp_path):
    out = tmp_path / "run"
    result = run("train_loop.py", "--output_dir", str(out), "--max_train_samples", "96", "--max_eval_samples", "64",
                 "--max_steps", "4", "--batch_size", "16", "--max_length", "64")
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"^metric +before +after +change$", result.stdout, re.M)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["optimizer_steps"] == 4 and metrics["final"]["num_samples"] == 64

    # The base model is recorded by its Hub id, not by this installation's path; `make setup` links the
    # embedded files into the Hugging Face cache under that id, so plain PEFT finds it offline.
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"
    import lora_setup

    lora_setup.register_in_hub_cache()  # what `make setup` runs; a no-op once done

    # Reload with nothing but PEFT + transformers, rebuild the same eval split, predict.
    from peft import AutoPeftModelForSequenceClassification
    from transformers import AutoTokenizer

    model = AutoPeftModelForSequenceClassification.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    splits = data.load_splits("embedded:rotten_tomatoes", max_train_samples=96, max_eval_samples=64)
    texts, labels = list(splits.eval["text"]), list(splits.eval["label"])
    with torch.inference_mode():
        encoded = tokenizer(texts, truncation=True, max_length=64, padding=True, return_tensors="pt")
        predictions = model(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"]).logits.argmax(-1)
    reloaded = evaluation.compute_metrics(labels, predictions.numpy(), splits.label_names)
    assert reloaded["confusion_matrix"] == metrics["final"]["confusion_matrix"]
    assert reloaded["accuracy"] == metrics["final"]["accuracy"]

    # eval.py on its own: evaluation of the saved run, and prediction to a file.
    scored = run("eval.py", "--adapter_dir", str(out))
    assert scored.returncode == 0, scored.stderr[-3000:]
    assert json.loads(scored.stdout[scored.stdout.index("{"):])["accuracy"] == metrics["final"]["accuracy"]
    predictions_file = tmp_path / "predictions.jsonl"
    predicted = run("eval.py", "--adapter_dir", str(out), "--predict", "a moving, beautiful film", "dull",
                    "--output", str(predictions_file))
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    rows = [json.loads(line) for line in predictions_file.read_text().splitlines()]
    assert [r["label"] in ("negative", "positive") for r in rows] == [True, True]
    assert abs(rows[0]["p_negative"] + rows[0]["p_positive"] - 1) < 1e-5


def test_cli_reports_an_unknown_model_in_one_line(tmp_path):
    result = run("train_loop.py", "--model", "no-such-org/no-such-model", "--output_dir", str(tmp_path / "run"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: could not load model 'no-such-org/no-such-model'")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()  # a failed start claims no output dir
