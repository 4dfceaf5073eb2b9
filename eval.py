"""Evaluation: run a classifier over a DataLoader, score it with scikit-learn, predict new texts.

Run on its own:
    python eval.py --adapter_dir outputs/run                       # evaluate on the run's own dataset
    python eval.py --adapter_dir outputs/run --dataset reviews.csv # ... or on another one
    python eval.py --adapter_dir outputs/run --predict "great film" "dull and long"
    python eval.py --adapter_dir outputs/run --predict_file texts.txt --output predictions.csv
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def compute_metrics(labels, predictions, label_names: list[str]) -> dict:
    """Accuracy, F1, precision, recall (scikit-learn) and the confusion matrix.

    With two classes F1/precision/recall are those of the positive class (label 1), the usual
    convention for binary sentiment; with more they are macro averages. Micro/weighted F1 and
    balanced accuracy (which is not fooled by class imbalance) are reported beside them.
    """
    from sklearn.metrics import (accuracy_score, balanced_accuracy_score, confusion_matrix,
                                 f1_score, precision_recall_fscore_support)

    labels, predictions = np.asarray(labels), np.asarray(predictions)
    classes = list(range(len(label_names)))
    average = "binary" if len(classes) == 2 else "macro"
    precision, recall, f1, _ = precision_recall_fscore_support(
        labels, predictions, labels=classes, average=average, zero_division=0)
    return {
        "accuracy": float(accuracy_score(labels, predictions)),
        "f1": float(f1),
        "precision": float(precision),
        "recall": float(recall),
        "balanced_accuracy": float(balanced_accuracy_score(labels, predictions)),
        "f1_macro": float(f1_score(labels, predictions, labels=classes, average="macro", zero_division=0)),
        "f1_micro": float(f1_score(labels, predictions, labels=classes, average="micro", zero_division=0)),
        "f1_weighted": float(f1_score(labels, predictions, labels=classes, average="weighted", zero_division=0)),
        "confusion_matrix": confusion_matrix(labels, predictions, labels=classes).tolist(),
        "num_samples": int(len(labels)),
    }


def evaluate(model, dataloader, accelerator, label_names: list[str]) -> dict:
    """Score ``model`` on every sample of ``dataloader`` (prepared by ``accelerator``).

    Every process must call this (a collective gather runs per batch; calling it on the main process
    only would hang the others). ``gather_for_metrics`` drops the samples Accelerate duplicated to
    give every process a full last batch, which is why we gather per-sample values (predictions,
    labels, losses) and reduce only afterwards: reducing first would count the duplicates.
    """
    model.eval()
    predictions, labels, losses = [], [], []
    with torch.inference_mode():
        for batch in dataloader:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            per_sample_loss = F.cross_entropy(logits, batch["labels"], reduction="none")
            gathered = accelerator.gather_for_metrics((logits.argmax(-1), batch["labels"], per_sample_loss))
            for store, values in zip((predictions, labels, losses), gathered):
                store.append(values.cpu())
    model.train()
    labels, predictions = torch.cat(labels).numpy(), torch.cat(predictions).numpy()
    metrics = compute_metrics(labels, predictions, label_names)
    metrics["loss"] = float(torch.cat(losses).mean())
    return metrics


SUMMARY_METRICS = ("accuracy", "f1", "precision", "recall", "balanced_accuracy", "loss")


def format_comparison(before: dict, after: dict, label_names: list[str]) -> str:
    """A plain-text before/after table of the summary metrics and both confusion matrices."""
    lines = [f"{'metric':<18} {'before':>9} {'after':>9} {'change':>9}"]
    for name in SUMMARY_METRICS:
        lines.append(f"{name:<18} {before[name]:>9.4f} {after[name]:>9.4f} {after[name] - before[name]:>+9.4f}")
    for title, metrics in (("before", before), ("after", after)):
        lines.append(f"confusion matrix {title} (rows: true, columns: predicted)")
        width = max(len(n) for n in label_names) + 2
        lines.append(" " * width + "".join(f"{n:>{width}}" for n in label_names))
        for name, row in zip(label_names, metrics["confusion_matrix"]):
            lines.append(f"{name:>{width}}" + "".join(f"{v:>{width}}" for v in row))
    return "\n".join(lines)


def predict(model, tokenizer, texts: list[str], *, max_length: int = 256, batch_size: int = 32) -> list[dict]:
    """Labels and class probabilities for raw texts, with the model's own label names."""
    device = next(model.parameters()).device
    id2label = model.config.id2label
    model.eval()
    results = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            chunk = texts[start:start + batch_size]
            encoded = tokenizer(chunk, truncation=True, max_length=max_length, padding=True,
                                return_tensors="pt").to(device)
            encoded.pop("token_type_ids", None)
            probabilities = model(**encoded).logits.float().softmax(-1).cpu()
            for text, probs in zip(chunk, probabilities):
                label_id = int(probs.argmax())
                results.append({"text": text, "label": id2label.get(label_id, str(label_id)),
                                "label_id": label_id,
                                **{f"p_{id2label.get(i, str(i))}": round(float(p), 6) for i, p in enumerate(probs)}})
    return results


def write_predictions(rows: list[dict], path: str | Path) -> None:
    """CSV or JSON-lines, chosen by the file suffix."""
    path = Path(path)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _parse_args(argv):
    parser = argparse.ArgumentParser(description="Evaluate a saved LoRA adapter, or predict labels for texts.")
    parser.add_argument("--adapter_dir", required=True, help="output dir of a training run (holds adapter_config.json)")
    parser.add_argument("--dataset", help="dataset to evaluate on (default: the run's own, from metrics.json)")
    parser.add_argument("--eval_file", help="separate eval file for a local --dataset")
    parser.add_argument("--text_column", default=None)
    parser.add_argument("--label_column", default=None)
    parser.add_argument("--predict", nargs="+", metavar="TEXT", help="texts to classify")
    parser.add_argument("--predict_file", help="file with one text per line to classify")
    parser.add_argument("--output", help="write predictions to this .csv or .jsonl file (default: print)")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--max_length", type=int, default=None, help="default: the run's own")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    from accelerate import Accelerator

    import data
    import lora_setup

    args = _parse_args(argv)
    try:
        run_file = Path(args.adapter_dir) / "metrics.json"
        run_config = json.loads(run_file.read_text())["config"] if run_file.is_file() else {}
        max_length = args.max_length or run_config.get("max_length", 256)
        accelerator = Accelerator()
        model, tokenizer = lora_setup.load_adapter(args.adapter_dir, accelerator.device)
        label_names = [model.config.id2label[i] for i in range(model.config.num_labels)]

        if args.predict or args.predict_file:
            texts = list(args.predict or [])
            if args.predict_file:
                texts += [line.rstrip("\n") for line in Path(args.predict_file).read_text().splitlines() if line.strip()]
            rows = predict(model, tokenizer, texts, max_length=max_length, batch_size=args.batch_size)
            if args.output:
                write_predictions(rows, args.output)
                print(f"wrote {len(rows)} predictions to {args.output}")
            else:
                for row in rows:
                    print(json.dumps(row))
            return 0

        dataset = args.dataset or run_config.get("dataset", "embedded:rotten_tomatoes")
        same_data = args.dataset is None
        splits = data.load_splits(
            dataset,
            text_column=args.text_column or (run_config.get("text_column", "text") if same_data else "text"),
            label_column=args.label_column or (run_config.get("label_column", "label") if same_data else "label"),
            eval_file=args.eval_file or (run_config.get("eval_file") if same_data else None),
            eval_size=run_config.get("eval_size", 1000), seed=run_config.get("seed", 42),
            max_eval_samples=run_config.get("max_eval_samples") if same_data else None,
            num_labels=len(label_names),
        )
        if splits.label_names != label_names:
            raise data.DataError(f"dataset labels {splits.label_names} differ from the model's {label_names}")
        loader = data.build_dataloader(data.tokenize(splits.eval, tokenizer, max_length), tokenizer.pad_token_id,
                                       args.batch_size, train=False)
        metrics = evaluate(model, accelerator.prepare(loader), accelerator, label_names)
        if accelerator.is_main_process:
            print(json.dumps({k: v for k, v in metrics.items()}, indent=2))
        return 0
    except (data.DataError, lora_setup.ModelSetupError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
