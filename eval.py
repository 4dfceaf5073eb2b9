"""Evaluation: run a classifier over a DataLoader, score it with scikit-learn, predict new texts, and
turn a run's metrics.json into report.md and PNG plots.

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
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def compute_metrics(labels, predictions, label_names: list[str]) -> dict:
    """Accuracy, F1, precision, recall (scikit-learn) and the confusion matrix.

    With two classes F1/precision/recall are those of the positive class (label 1), the usual
    convention for binary sentiment; with more they are macro averages. Micro/weighted F1 and
    balanced accuracy (which is not fooled by class imbalance) are reported beside them, and
    ``per_class`` holds each class's precision, recall, F1 and support.
    """
    from sklearn.metrics import (accuracy_score, balanced_accuracy_score, classification_report,
                                 confusion_matrix, f1_score, precision_recall_fscore_support)

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
        "per_class": per_class_report(classification_report(
            labels, predictions, labels=classes, target_names=label_names, output_dict=True, zero_division=0),
            label_names),
        "num_samples": int(len(labels)),
    }


def per_class_report(report: dict, label_names: list[str]) -> dict:
    """Keep the per-class rows of scikit-learn's ``classification_report`` (its averages are already
    top-level metrics), named like them: ``{label: {precision, recall, f1, support}}``."""
    return {name: {"precision": float(report[name]["precision"]), "recall": float(report[name]["recall"]),
                   "f1": float(report[name]["f1-score"]), "support": int(report[name]["support"])}
            for name in label_names}


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


# ----------------------------------------------------------------------------------------------
# Results people can look at: report.md and PNG plots, both built from metrics.json's dict
# ----------------------------------------------------------------------------------------------

REPORT_FILE = "report.md"
CURVES_FILE = "training_curves.png"
CONFUSION_FILE = "confusion_matrices.png"
REPORT_METRICS = ("accuracy", "balanced_accuracy", "f1", "precision", "recall", "f1_macro", "f1_micro",
                  "f1_weighted", "loss")


def _cell(value) -> str:
    """A markdown table cell: floats to 4 decimals; a '|' inside a label name would split the cell."""
    return f"{value:.4f}" if isinstance(value, float) else str(value).replace("|", "\\|")


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A GitHub-flavoured markdown table, first column left-aligned, the others (numbers) right-aligned."""
    lines = ["| " + " | ".join(map(_cell, header)) + " |", "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(map(_cell, row)) + " |" for row in rows]
    return "\n".join(lines)


def confusion_table(matrix: list[list[int]], label_names: list[str]) -> str:
    """Rows are the true classes, columns the predicted ones: the diagonal holds the correct answers."""
    return markdown_table(["true \\ predicted", *label_names],
                          [[f"**{name}**", *row] for name, row in zip(label_names, matrix)])


def metrics_note(label_names: list[str]) -> str:
    """What the headline f1/precision/recall mean for this number of classes (see compute_metrics)."""
    if len(label_names) == 2:
        return f"f1, precision and recall are those of the positive class `{label_names[1]}`."
    return "f1, precision and recall are macro averages (each class counts the same)."


def eval_history(results: dict) -> list[dict]:
    """The evaluations over training as ``{step, epoch, <metric>: value}``, the baseline first at step 0."""
    baseline = {"step": 0, "epoch": 0, **{k: v for k, v in results["baseline"].items() if isinstance(v, float)}}
    during = [{"step": h["step"], "epoch": h["epoch"],
               **{k[len("eval/"):]: v for k, v in h.items() if k.startswith("eval/")}}
              for h in results["history"] if "eval/loss" in h]
    return [baseline, *during]


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return (f"{hours} h {minutes} min" if hours else f"{minutes} min {seconds} s" if minutes else f"{seconds} s")


def _summary_section(results: dict) -> list[str]:
    before, after, cfg = results["baseline"], results["final"], results["config"]
    return [
        f"`{cfg['model']}` with a LoRA adapter (r={cfg['lora_r']}, alpha={cfg['lora_alpha']}) on "
        f"`{cfg['dataset']}`: accuracy {before['accuracy']:.4f} before training, {after['accuracy']:.4f} after, "
        f"on {after['num_samples']} held-out samples. \"After\" is the adapter kept as best by "
        f"`{cfg['metric_for_best']}`.",
        "## Before and after training",
        markdown_table(["metric", "before", "after", "change"],
                       [[m, before[m], after[m], f"{after[m] - before[m]:+.4f}"] for m in REPORT_METRICS]),
        metrics_note(results["label_names"]) + " Balanced accuracy is the mean recall over classes: unlike "
        "accuracy, it drops when a rare class is ignored.",
    ]


def _per_class_section(results: dict) -> list[str]:
    after, before = results["final"].get("per_class"), results["baseline"].get("per_class", {})
    if after is None:  # a metrics.json written before per-class reports existed
        return []
    rows = [[name, row["precision"], row["recall"], row["f1"], before.get(name, {}).get("f1", "-"), row["support"]]
            for name, row in after.items()]
    return ["## Per-class report (after training)",
            markdown_table(["class", "precision", "recall", "f1", "f1 before", "support"], rows)]


def _confusion_section(results: dict) -> list[str]:
    names = results["label_names"]
    return ["## Confusion matrices",
            "Before training:", confusion_table(results["baseline"]["confusion_matrix"], names),
            "After training:", confusion_table(results["final"]["confusion_matrix"], names)]


def _training_section(results: dict) -> list[str]:
    cfg = results["config"]
    evals = [[e["step"], e["epoch"], e["loss"], e["accuracy"], e["balanced_accuracy"], e["f1"]]
             for e in eval_history(results)]
    facts = [
        f"- optimizer steps: {results['optimizer_steps']} (batch {cfg['batch_size']} x accumulation "
        f"{cfg['gradient_accumulation_steps']} x {results['num_processes']} process(es))",
        f"- training time: {_duration(results['train_seconds'])} (evaluation not included)",
        f"- throughput: {results['train_samples_per_s']:.1f} samples/s, {results['train_tokens_per_s']:.0f} "
        "tokens/s (real tokens, padding excluded)",
        f"- trainable parameters: {results['trainable_parameters']:,} of {results['total_parameters']:,} "
        f"({100 * results['trainable_share']:.2f} %)",
        f"- mixed precision: {results['mixed_precision']}",
    ]
    return ["## Evaluations during training",
            markdown_table(["step", "epoch", "loss", "accuracy", "balanced_accuracy", "f1"], evals),
            "## Training", "\n".join(facts)]


def _config_section(results: dict) -> list[str]:
    import yaml

    # yaml.safe_dump, not json.dumps: PyYAML reads JSON's 1e-05 back as a string, its own 1.0e-05 as a float.
    block = yaml.safe_dump(results["config"], sort_keys=False, default_flow_style=False)
    return ["## Config used", "Every setting of the run; the block is YAML, which `train_loop.py --config` reads.",
            f"```yaml\n{block}```"]


def format_report(results: dict, plot_files: list[str] = ()) -> str:
    """The text of report.md for one run (``results`` is the dict saved as metrics.json)."""
    plots = ["## Plots", "\n\n".join(f"![{Path(f).stem.replace('_', ' ')}]({Path(f).name})" for f in plot_files)]
    sections = ["# Fine-tuning report", *_summary_section(results), *_per_class_section(results),
                *_confusion_section(results), *_training_section(results), *(plots if plot_files else []),
                *_config_section(results)]
    return "\n\n".join(sections) + "\n"


def write_report(output_dir: str | Path, results: dict) -> Path:
    """Write OUTPUT_DIR/report.md, linking the plots already saved there (call ``save_plots`` first)."""
    output_dir = Path(output_dir)
    plots = [name for name in (CURVES_FILE, CONFUSION_FILE) if (output_dir / name).is_file()]
    path = output_dir / REPORT_FILE
    path.write_text(format_report(results, plots))
    return path


def plot_curves(results: dict):
    """Three panels over optimizer steps: train and eval loss, eval metrics, learning rate."""
    from matplotlib.figure import Figure

    train = [h for h in results["history"] if "train/loss" in h]
    evals = eval_history(results)
    steps = [h["step"] for h in train]
    eval_steps = [e["step"] for e in evals]
    figure = Figure(figsize=(15, 4.3), layout="constrained")
    loss_ax, metric_ax, lr_ax = figure.subplots(1, 3)

    loss_ax.plot(steps, [h["train/loss"] for h in train], marker=".", label="train (mean since last log)")
    loss_ax.plot(eval_steps, [e["loss"] for e in evals], marker="o", label="eval")
    loss_ax.set(title="Cross-entropy loss", ylabel="loss")
    if len(train) < 3:  # a run shorter than --log_every logs once, at its end: no curve to draw
        loss_ax.text(0.5, 0.03, f"{len(train)} training log(s): lower --log_every for a curve",
                     transform=loss_ax.transAxes, ha="center", va="bottom", color="tab:gray")

    f1_label = "f1 (positive class)" if len(results["label_names"]) == 2 else "f1 (macro)"
    # Distinct markers and dashes: on balanced data accuracy and balanced accuracy coincide exactly.
    for key, label, style in (("accuracy", "accuracy", "o-"), ("balanced_accuracy", "balanced accuracy", "s--"),
                              ("f1", f1_label, "^:")):
        metric_ax.plot(eval_steps, [e[key] for e in evals], style, label=label, markersize=5)
    metric_ax.set(title="Eval metrics (step 0 = before training)", ylabel="score")

    lr_ax.plot(steps, [h["train/lr"] for h in train], marker=".", color="tab:gray")
    # From 0 to the peak LR whatever was logged, so one or two logged points still read correctly.
    peak = results["config"]["learning_rate"]
    lr_ax.set(title="Learning rate", ylabel="learning rate", ylim=(-0.04 * peak, 1.08 * peak))
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))

    for ax in (loss_ax, metric_ax, lr_ax):
        ax.set_xlabel("optimizer step")
        ax.set_xlim(left=0)
        ax.grid(alpha=0.3)
    for ax in (loss_ax, metric_ax):
        ax.legend()
    return figure


def plot_confusion_matrices(results: dict):
    """Before and after side by side. Colour is the share of each true class (row), so a rare class
    that is always missed stands out as much as a common one; the cells print the counts."""
    import numpy as np
    from matplotlib.figure import Figure

    names = results["label_names"]
    n = len(names)
    side = max(3.5, 0.6 * n + 2.0)  # inches per matrix: room for the labels and counts of many classes
    figure = Figure(figsize=(2 * side + 1.2, side), layout="constrained")
    axes = figure.subplots(1, 2)
    rotate = n * max(len(name) for name in names) > 30  # x labels that would overlap
    for ax, (title, metrics) in zip(axes, (("Before training", results["baseline"]),
                                           ("After training", results["final"]))):
        counts = np.asarray(metrics["confusion_matrix"])
        share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        ax.set_xticks(range(n), labels=names, rotation=45 if rotate else 0, ha="right" if rotate else "center",
                      rotation_mode="anchor")
        ax.set_yticks(range(n), labels=names)
        ax.set(xlabel="predicted", ylabel="true", title=f"{title}\naccuracy {metrics['accuracy']:.3f}")
        for (row, col), count in np.ndenumerate(counts):
            ax.text(col, row, f"{count}\n{share[row, col]:.0%}", ha="center", va="center",
                    fontsize=max(7, 12 - n // 2), color="white" if share[row, col] > 0.55 else "black")
    figure.colorbar(image, ax=list(axes), shrink=0.8, label="share of the true class (row)")
    return figure


def save_plots(output_dir: str | Path, results: dict) -> list[Path]:
    """Save the training curves and the confusion matrices as PNGs; [] (and a note) without matplotlib."""
    try:
        import matplotlib  # noqa: F401 - an optional extra
    except ImportError:
        print("note: plots skipped, matplotlib is not installed: pip install -r requirements-extras.txt")
        return []
    paths = []
    for name, draw in ((CURVES_FILE, plot_curves), (CONFUSION_FILE, plot_confusion_matrices)):
        path = Path(output_dir) / name
        draw(results).savefig(path, dpi=110)
        paths.append(path)
    return paths


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
    import export_onnx

    print(f"wrote {export_onnx.export_adapter(adapter_dir, path)} (+ config.json and the tokenizer beside it)")
    return 0


def main(argv=None) -> int:
    from accelerate import Accelerator

    import data
    import lora_setup

    args = _parse_args(argv)
    try:
        run_file = Path(args.adapter_dir) / "metrics.json"
        if args.report:  # needs no model: everything comes from metrics.json
            if not run_file.is_file():
                raise FileNotFoundError(f"'{run_file}' does not exist; --report needs the output dir of a finished run")
            results = json.loads(run_file.read_text())
            plots = save_plots(args.adapter_dir, results)
            print(f"wrote {write_report(args.adapter_dir, results)}" + "".join(f", {p}" for p in plots))
            return 0
        if args.export:
            return export(args.adapter_dir, *args.export)
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
