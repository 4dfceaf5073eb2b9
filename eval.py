"""Evaluation: run a classifier over a DataLoader, score it with scikit-learn, predict new texts, and
re-score a saved run (report.md and the plots are ``reporting.py``'s).

Run on its own:
    python eval.py --adapter_dir outputs/run                       # evaluate on the run's own dataset
    python eval.py --adapter_dir outputs/run --dataset reviews.csv # ... or on another one
    python eval.py --adapter_dir outputs/run --predict "great film" "dull and long"
    python eval.py --adapter_dir outputs/run --predict_file texts.txt --output predictions.csv
    python eval.py --adapter_dir outputs/run --report               # (re)write report.md and the plots
    python eval.py --adapter_dir outputs/run --export onnx outputs/run/onnx/model.onnx   # to serve (export_onnx.py)
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import data
import export_onnx
import lora_setup
import reporting


def compute_metrics(labels, predictions, label_names: list[str]) -> dict:
    """Accuracy, F1, precision, recall (scikit-learn) and the confusion matrix.

    With two classes F1/precision/recall are those of the positive class (label 1), the usual
    convention for binary sentiment; with more they are macro averages. Micro/weighted F1 and
    balanced accuracy (which is not fooled by class imbalance) are reported beside them, and
    ``per_class`` holds each class's precision, recall, F1 and support.
    """
    from sklearn.metrics import (accuracy_score, classification_report, confusion_matrix, f1_score,
                                 precision_recall_fscore_support)

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
        "balanced_accuracy": balanced_accuracy(labels, predictions),
        "f1_macro": float(f1_score(labels, predictions, labels=classes, average="macro", zero_division=0)),
        "f1_micro": float(f1_score(labels, predictions, labels=classes, average="micro", zero_division=0)),
        "f1_weighted": float(f1_score(labels, predictions, labels=classes, average="weighted", zero_division=0)),
        "confusion_matrix": confusion_matrix(labels, predictions, labels=classes).tolist(),
        "per_class": per_class_report(classification_report(
            labels, predictions, labels=classes, target_names=label_names, output_dict=True, zero_division=0),
            label_names),
        "num_samples": int(len(labels)),
    }


def balanced_accuracy(labels, predictions) -> float:
    """Mean recall over the classes present in ``labels``. scikit-learn warns on the console when a
    prediction names a class the eval split lacks; the report says so instead (absent_classes_note)."""
    from sklearn.metrics import balanced_accuracy_score

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        return float(balanced_accuracy_score(labels, predictions))


def per_class_report(report: dict, label_names: list[str]) -> dict:
    """Keep the per-class rows of scikit-learn's ``classification_report`` (its averages are already
    top-level metrics), named like them: ``{label: {precision, recall, f1, support}}``."""
    return {name: {"precision": float(report[name]["precision"]), "recall": float(report[name]["recall"]),
                   "f1": float(report[name]["f1-score"]), "support": int(report[name]["support"])}
            for name in label_names}


def multi_label_metrics(labels, scores, label_names: list[str], thresholds=None) -> dict:
    """Multi-label scores (scikit-learn): ``labels`` is a multi-hot (n x K) array, ``scores`` the sigmoid
    probabilities; label k is predicted where its score is >= ``thresholds[k]`` (0.5 each by default).

    f1_micro pools every (text, label) decision, f1_macro averages the labels' F1 (each label counts the
    same), f1_samples averages each text's F1; subset_accuracy counts texts whose whole label set is right,
    hamming_loss the share of wrong (text, label) decisions (lower is better). ``per_class`` holds each
    label's precision, recall, F1, support and threshold.
    """
    from sklearn.metrics import accuracy_score, f1_score, hamming_loss, precision_recall_fscore_support

    labels, scores = np.asarray(labels).astype(int), np.asarray(scores, dtype=float)
    thresholds = np.full(len(label_names), 0.5) if thresholds is None else np.asarray(thresholds, dtype=float)
    predictions = (scores >= thresholds).astype(int)
    precision, recall, f1, support = precision_recall_fscore_support(labels, predictions, average=None,
                                                                     labels=range(len(label_names)), zero_division=0)
    micro = precision_recall_fscore_support(labels, predictions, average="micro", zero_division=0)
    return {
        "f1_micro": float(micro[2]),
        "f1_macro": float(f1_score(labels, predictions, average="macro", zero_division=0)),
        "f1_samples": float(f1_score(labels, predictions, average="samples", zero_division=0)),
        "precision_micro": float(micro[0]),
        "recall_micro": float(micro[1]),
        "subset_accuracy": float(accuracy_score(labels, predictions)),
        "hamming_loss": float(hamming_loss(labels, predictions)),
        "per_class": {name: {"precision": float(precision[k]), "recall": float(recall[k]), "f1": float(f1[k]),
                             "support": int(support[k]), "threshold": float(thresholds[k])}
                      for k, name in enumerate(label_names)},
        "thresholds": [float(t) for t in thresholds],
        "num_samples": int(len(labels)),
    }


THRESHOLD_GRID = np.round(np.arange(0.05, 0.951, 0.05), 2)  # candidate thresholds for --tune_thresholds


def tune_thresholds(labels, scores) -> list[float]:
    """Each label's F1-best threshold on (``labels``, ``scores``), from THRESHOLD_GRID; ties go to the
    threshold closest to 0.5, and a label whose F1 is 0 everywhere keeps 0.5."""
    from sklearn.metrics import f1_score

    labels, scores = np.asarray(labels).astype(int), np.asarray(scores, dtype=float)
    order = sorted(THRESHOLD_GRID, key=lambda t: (abs(t - 0.5), t))
    best = []
    for k in range(labels.shape[1]):
        f1s = [f1_score(labels[:, k], (scores[:, k] >= t).astype(int), zero_division=0) for t in order]
        top = int(np.argmax(f1s))  # the first maximum: the one closest to 0.5
        best.append(float(order[top]) if f1s[top] > 0 else 0.5)
    return best


THRESHOLDS_FILE = "thresholds.json"


def save_thresholds(output_dir: str | Path, label_names: list[str], thresholds, tuned: bool) -> Path:
    """OUTPUT_DIR/thresholds.json: ``{"thresholds": {label: t}, "tuned": bool}`` beside the adapter."""
    path = Path(output_dir) / THRESHOLDS_FILE
    path.write_text(json.dumps({"thresholds": {n: float(t) for n, t in zip(label_names, thresholds)},
                                "tuned": bool(tuned)}, indent=2))
    return path


def load_thresholds(adapter_dir: str | Path, label_names: list[str]) -> list[float]:
    """The thresholds saved with a multi-label adapter, in label order; 0.5 each when there is no file."""

    path = Path(adapter_dir) / THRESHOLDS_FILE
    if not path.is_file():
        return [0.5] * len(label_names)
    try:
        saved = json.loads(path.read_text())["thresholds"]
        return [float(saved[name]) for name in label_names]
    except (ValueError, KeyError, TypeError) as err:
        raise data.DataError(f"'{path}' is damaged or names other labels ({err}); delete it to use 0.5 for every "
                             "label, or retrain with --tune_thresholds") from None


def evaluate(model, dataloader, accelerator, label_names: list[str], multi_label: bool = False, *,
             thresholds=None, tune: bool = False) -> dict:
    """Score ``model`` on every sample of ``dataloader`` (prepared by ``accelerator``).

    Multi-label (``multi_label=True``): sigmoid scores against ``thresholds`` (0.5 each by default), or,
    with ``tune=True``, against each label's F1-best threshold on these very rows (``tune_thresholds``).

    Every process must call this (a collective gather runs per batch; calling it on the main process
    only would hang the others). ``gather_for_metrics`` drops the samples Accelerate duplicated to
    give every process a full last batch, which is why we gather per-sample values (predictions,
    labels, losses) and reduce only afterwards: reducing first would count the duplicates.
    """
    model.eval()
    outputs, labels, losses = [], [], []  # per sample: the prediction (multi-label: the scores), label, loss
    # no_grad, not the slightly cheaper inference_mode: FSDP2 gathers the weights into buffers it makes on
    # the first forward and reuses in training, and a buffer made under inference_mode cannot be reused
    # ("Inference tensors do not track version counter", seen on an H100 when the baseline ran first).
    with torch.no_grad():
        for batch in dataloader:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            if multi_label:  # the training loss per text: binary cross-entropy averaged over the labels
                output = logits.sigmoid()
                per_sample_loss = F.binary_cross_entropy_with_logits(logits, batch["labels"], reduction="none").mean(-1)
            else:
                output = logits.argmax(-1)
                per_sample_loss = F.cross_entropy(logits, batch["labels"], reduction="none")
            gathered = accelerator.gather_for_metrics((output, batch["labels"], per_sample_loss))
            for store, values in zip((outputs, labels, losses), gathered):
                store.append(values.cpu())
    back_to_training(model)
    labels, outputs = torch.cat(labels).numpy(), torch.cat(outputs).numpy()
    if multi_label:
        metrics = multi_label_metrics(labels, outputs, label_names,
                                      tune_thresholds(labels, outputs) if tune else thresholds)
    else:
        metrics = compute_metrics(labels, outputs, label_names)
    metrics["loss"] = float(torch.cat(losses).mean())
    return metrics


def back_to_training(model) -> None:
    """Train mode again, and under FSDP2 the weights back in their shards: after a forward with no backward
    FSDP2 keeps the top-level module's weights gathered (it expects a backward to need them next), and the
    optimizer and the checkpoint code hold the sharded parameters, not those gathered copies."""
    model.train()
    if hasattr(torch.distributed, "fsdp") and isinstance(model, getattr(torch.distributed.fsdp, "FSDPModule", ())):
        model.reshard()


def is_multi_label(model) -> bool:
    return getattr(model.config, "problem_type", None) == "multi_label_classification"


def predict(model, tokenizer, texts: list[str], *, max_length: int = 256, batch_size: int = 32,
            truncation: str = "head", long_text: str = "truncate", thresholds=None) -> list[dict]:
    """Labels and class probabilities for raw texts, with the model's own label names.

    A text longer than ``max_length`` tokens is cut as training cut it (``truncation``, data.truncate_ids),
    or with ``long_text="windows"`` read whole: as overlapping windows (data.window_ids) whose logits
    are averaged, so a verdict in the middle of a long review counts too. A multi-label model
    (``problem_type="multi_label_classification"``) gives ``labels``: every label whose sigmoid score
    reaches its threshold (``thresholds``, 0.5 each by default), and a ``p_<label>`` per label.
    """

    device = next(model.parameters()).device
    id2label = model.config.id2label
    front, back = data.special_token_counts(tokenizer)
    pieces = []  # (index of the text, token ids of one window or of the truncated text)
    for i, ids in enumerate(tokenizer(texts, truncation=False)["input_ids"]):
        cut = (data.window_ids(ids, max_length, front, back) if long_text == "windows"
               else [data.truncate_ids(ids, max_length, truncation, front, back)])
        pieces += [(i, window) for window in cut]
    logits = torch.zeros(len(texts), model.config.num_labels)
    counts = torch.zeros(len(texts), 1)
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(pieces), batch_size):
            chunk = pieces[start:start + batch_size]
            batch = data.collate([{"input_ids": ids, "labels": 0} for _, ids in chunk], tokenizer.pad_token_id)
            out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
            owners = torch.tensor([i for i, _ in chunk])
            logits.index_add_(0, owners, out.logits.float().cpu())
            counts.index_add_(0, owners, torch.ones(len(chunk), 1))
    logits = logits / counts
    names = [id2label.get(i, str(i)) for i in range(logits.shape[-1])]
    results = []
    if is_multi_label(model):
        cut = [0.5] * len(names) if thresholds is None else thresholds
        for text, probs in zip(texts, logits.sigmoid()):
            results.append({"text": text, "labels": [n for n, p, t in zip(names, probs, cut) if p >= t],
                            **{f"p_{n}": round(float(p), 6) for n, p in zip(names, probs)}})
        return results
    for text, probs in zip(texts, logits.softmax(-1)):
        label_id = int(probs.argmax())
        results.append({"text": text, "label": names[label_id], "label_id": label_id,
                        **{f"p_{n}": round(float(p), 6) for n, p in zip(names, probs)}})
    return results


def write_predictions(rows: list[dict], path: str | Path) -> None:
    """CSV or JSON-lines, chosen by the file suffix (``check_output`` has vetted it)."""
    path = Path(path)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(dict.fromkeys(k for row in rows for k in row)))
        writer.writeheader()
        # A multi-label row's labels go in one cell, joined by '|' (read back with --label_separator '|').
        writer.writerows({k: "|".join(v) if isinstance(v, list) else v for k, v in row.items()} for row in rows)


def read_texts(path: str | Path) -> list[tuple[int, str]]:
    """The texts of a --predict_file, one per non-blank line of a UTF-8 text file, each with its line
    number (1-based): blank lines are skipped, and the number keeps every prediction tied to its line."""
    lines = data.read_text_file(path, "--predict_file").splitlines()
    texts = [(number, line) for number, line in enumerate(lines, start=1) if line.strip()]
    if not texts:
        raise data.DataError(f"--predict_file '{path}' holds no text; write one text per line")
    return texts


def check_output(output: str, predict_file: str | None) -> None:
    """Refuse a --output that cannot be written, or whose writing would destroy an input."""

    path = Path(output)
    if path.suffix not in (".csv", ".jsonl"):
        raise data.DataError(f"--output '{output}' must end in .csv or .jsonl (the format is read from the suffix)")
    if path.is_dir() or not path.parent.is_dir():
        raise data.DataError(f"--output '{output}' " + ("is a directory" if path.is_dir() else
                             f"is in a folder that does not exist ('{path.parent}')") + "; pass a file path")
    if predict_file is not None and path.resolve() == Path(predict_file).resolve():
        raise data.DataError(f"--output '{output}' is the --predict_file itself: writing would destroy the texts; "
                             "pass another --output file")
    if path.exists():
        raise data.DataError(f"--output '{output}' already exists and is never overwritten; pass a new file name")


def check_args(args) -> None:
    """Flags that contradict each other, each of which would otherwise be silently ignored."""

    predicting = bool(args.predict or args.predict_file)
    for flag, given in (("--dataset", args.dataset), ("--eval_file", args.eval_file),
                        ("--text_column", args.text_column), ("--label_column", args.label_column),
                        ("--label_separator", args.label_separator)):
        if given is not None and (predicting or args.report):
            raise data.DataError(f"{flag} selects data to evaluate on; it does not go with "
                                 f"{'--predict/--predict_file' if predicting else '--report'}: drop one of them")
    if args.output and not predicting:
        raise data.DataError("--output is where predictions go; pass --predict or --predict_file with it")
    if predicting and args.report:
        raise data.DataError("--report does not go with --predict/--predict_file; run them one at a time")
    for flag, value in (("--batch_size", args.batch_size), ("--max_length", args.max_length)):
        if value is not None and value < 1:
            raise data.DataError(f"{flag} must be a positive integer (got {value})")
    if args.output:
        check_output(args.output, args.predict_file)


def read_run(adapter_dir: str | Path) -> dict:
    """A finished run's metrics.json (its settings under ``config``); a run still training has only
    run_config.json, which holds the same settings; ``{}`` when there is neither."""

    for name in ("metrics.json", "run_config.json"):
        path = Path(adapter_dir) / name
        if not path.is_file():
            continue
        try:
            saved = json.loads(path.read_text())
        except (ValueError, OSError) as err:
            saved = err
        if not isinstance(saved, dict):
            raise data.DataError(f"'{path}' is damaged (not a JSON object); retrain, or pass --dataset to "
                                 "evaluate on data of your choice")
        return saved if name == "metrics.json" else {"config": saved}
    return {}


def check_model_unchanged(run_config: dict, recorded: dict) -> None:
    """Refuse to use an adapter on a base model whose files changed since training (compared by content)."""
    if "model" in recorded and "model" in run_config:
        if lora_setup.model_fingerprint(run_config["model"]) != recorded["model"]:
            raise data.DataError(f"the base model '{run_config['model']}' is not the one this adapter was trained on "
                                 "(its files changed since, compared by content); restore that model, or retrain")


def eval_rows(args, run_config: dict, recorded: dict, num_labels: int) -> tuple[data.LabelledSplits, str]:
    """The rows to score and a note that says which they are.

    Without --dataset (or with the run's own): the run's held-out split, rebuilt from its settings
    (``data.load_run_splits``), and refused if its rows are not the ones the run scored (the data file
    changed since). With another --dataset: every row of it (``data.load_all_rows``)."""
    overrides = {key: getattr(args, key) for key in ("eval_file", "text_column", "label_column", "label_separator")
                 if getattr(args, key) is not None}
    if args.dataset is None or (args.dataset == run_config.get("dataset") and not overrides):
        splits = data.load_run_splits({**run_config, "num_labels": num_labels})
        if "eval" in recorded and data.fingerprint(splits.eval) != recorded["eval"]:
            raise data.DataError(f"the run's eval split of '{run_config.get('dataset')}' is not the one it was scored "
                                 "on (the data changed since training, compared by content); pass --dataset FILE to "
                                 "score every row of a file as it is now")
        return splits, (f"scored the run's held-out split: {len(splits.eval)} rows of {run_config.get('dataset')} "
                        f"(seed {run_config.get('seed', 42)})")
    settings = {"dataset": args.dataset, "label_separator": run_config.get("label_separator"), **overrides}
    splits = data.load_all_rows(**settings, num_labels=num_labels, max_eval_samples=args.max_eval_samples)
    return splits, f"scored every row of {args.dataset}: {len(splits.eval)} rows"


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one ``error:`` line and exit code 2 (via main), like every other refusal,
    instead of its usage block."""

    def error(self, message):

        raise data.DataError(f"{message}; see --help")


def _parse_args(argv):
    parser = ArgumentParser(description="Evaluate a saved LoRA adapter, or predict labels for texts.")
    parser.add_argument("--adapter_dir", required=True, help="output dir of a training run (holds adapter_config.json)")
    parser.add_argument("--dataset", help="dataset to evaluate on, every row of it (default: the run's own held-out "
                        "split, from metrics.json)")
    parser.add_argument("--eval_file", help="separate eval file for a local --dataset")
    parser.add_argument("--text_column", default=None)
    parser.add_argument("--label_column", default=None)
    parser.add_argument("--label_separator", default=None, help="multi-label: the separator of a row's tags in a "
                        "text label column (default: the run's own)")
    parser.add_argument("--predict", nargs="+", metavar="TEXT", help="texts to classify")
    parser.add_argument("--predict_file", help="UTF-8 text file with one text per line to classify")
    parser.add_argument("--output", help="write predictions to this .csv or .jsonl file (default: print)")
    parser.add_argument("--max_eval_samples", type=int, default=None,
                        help="with --dataset: score a seeded random sample of this many rows instead of every row")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--max_length", type=int, default=None, help="default: the run's own")
    parser.add_argument("--long_text", choices=("truncate", "windows"), default="truncate",
                        help="--predict on texts longer than --max_length: cut them as training did, or read them "
                             "whole as overlapping windows whose logits are averaged")
    parser.add_argument("--report", action="store_true",
                        help="write report.md and the PNG plots from the run's metrics.json, then stop")
    parser.add_argument("--export", nargs=2, metavar=("FORMAT", "PATH"),
                        help="merge the adapter and write a model to serve, then stop: onnx PATH.onnx (export_onnx.py)")
    return parser.parse_args(argv)


def export(adapter_dir: str, kind: str, path: str) -> int:
    """``--export onnx PATH``: the merged model as one ONNX file (export_onnx.py)."""
    if kind != "onnx":
        print(f"error: --export supports onnx only (got {kind!r})", file=sys.stderr)
        return 2
    print(f"wrote {export_onnx.export_adapter(adapter_dir, path)} (+ config.json and the tokenizer beside it)")
    return 0


def main(argv=None) -> int:

    data.quiet_libraries()
    try:
        args = _parse_args(argv)
        check_args(args)
        if args.report:  # needs no model: everything comes from metrics.json
            results = read_run(args.adapter_dir)
            if "final" not in results:
                raise data.DataError(f"'{Path(args.adapter_dir) / 'metrics.json'}' does not exist; --report needs "
                                     "the output dir of a finished run")
            plots = reporting.save_plots(args.adapter_dir, results)
            print(f"wrote {reporting.write_report(args.adapter_dir, results)}" + "".join(f", {p}" for p in plots))
            return 0
        if args.export:
            return export(args.adapter_dir, *args.export)
        numbered = read_texts(args.predict_file) if args.predict_file else []
        texts = list(args.predict or []) + [text for _, text in numbered]
        run = read_run(args.adapter_dir)
        run_config, recorded = run.get("config", {}), run.get("inputs", {})
        max_length = args.max_length or run_config.get("max_length", 256)
        check_model_unchanged(run_config, recorded)

        from accelerate import Accelerator

        accelerator = Accelerator()
        model, tokenizer = lora_setup.load_adapter(args.adapter_dir, accelerator.device)
        lora_setup.check_max_length(model, args.adapter_dir, max_length)
        label_names = [model.config.id2label[i] for i in range(model.config.num_labels)]
        multi_label = is_multi_label(model)
        thresholds = load_thresholds(args.adapter_dir, label_names) if multi_label else None

        if texts:
            rows = predict(model, tokenizer, texts, max_length=max_length, batch_size=args.batch_size,
                           truncation=run_config.get("truncation", "head"), long_text=args.long_text,
                           thresholds=thresholds)
            lines = [None] * len(args.predict or []) + [number for number, _ in numbered]
            if numbered:  # each prediction names the line of --predict_file it is for (blank lines are skipped)
                rows = [{"line": line, **row} for line, row in zip(lines, rows)]
            if accelerator.is_main_process:  # every process predicted the same rows: one writes them
                if args.output:
                    write_predictions(rows, args.output)
                    print(f"wrote {len(rows)} predictions to {args.output}")
                else:
                    for row in rows:
                        print(json.dumps(row))
            return 0

        splits, scope = eval_rows(args, run_config, recorded, len(label_names))
        if splits.label_names != label_names:
            raise data.DataError(f"dataset labels {splits.label_names} differ from the model's {label_names}; "
                                 "evaluate on data with the classes the model was trained on")
        if splits.multi_label != multi_label:
            raise data.DataError(f"the data has {'several labels' if splits.multi_label else 'one label'} per text but "
                                 f"the model is {'multi' if multi_label else 'single'}-label; evaluate on data of "
                                 "the kind it was trained on")
        tokens = data.tokenize(splits.eval, tokenizer, max_length, run_config.get("truncation", "head"))  # as trained
        loader = data.build_dataloader(tokens, tokenizer.pad_token_id, args.batch_size, train=False)
        metrics = evaluate(model, accelerator.prepare(loader), accelerator, label_names, multi_label,
                           thresholds=thresholds)
        if accelerator.is_main_process:
            for note in [*splits.notes, scope]:  # stderr: stdout stays one JSON document
                print(f"note: {note}", file=sys.stderr)
            print(json.dumps(metrics, indent=2))
        return 0
    except (data.DataError, lora_setup.ModelSetupError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
