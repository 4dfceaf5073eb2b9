"""eval.py: metrics equal scikit-learn's computed directly; evaluate() scores every sample once."""

import datasets
import numpy as np
import pytest
import torch
from accelerate import Accelerator
from conftest import sentiment_rows
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_score, recall_score

import data
import eval as evaluation
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
