"""Reporting: what a person looks at after a run -- the before/after table on the console, report.md,
and PNG plots of the training curves and confusion matrices -- all built from the dict that
``train_loop.finish`` saves as metrics.json (``python eval.py --adapter_dir DIR --report`` rebuilds them).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from metric_names import (CURVE_METRICS, MULTI_LABEL_METRICS, MULTI_LABEL_SUMMARY, REPORT_METRICS,
                          SUMMARY_METRICS)

# Settings that say how a run was started, not what it trained: left out of the block the report offers for
# re-use, since `--config` with overwrite: true would move the very run it came from aside.
NOT_FOR_REUSE = ("overwrite", "resume_from_checkpoint")


def headline(metrics: dict, label_names: list[str], multi_label: bool = False) -> str:
    """One line of the main scores, for the console."""
    if multi_label:
        return f"f1_micro {metrics['f1_micro']:.4f}, f1_macro {metrics['f1_macro']:.4f}"
    return f"accuracy {metrics['accuracy']:.4f}, {f1_name(label_names)} {metrics['f1']:.4f}"


def results_record(run, state, baseline: dict, final: dict) -> dict:
    """Everything a finished run reports (``train_loop.finish`` saves it as metrics.json; the report,
    the plots and ``eval.py`` read it back): scores before and after, the history, the best adapter's
    step, sizes, throughput and the settings."""
    return {
        "baseline": baseline, "final": final, "label_names": run.label_names, "history": state.history,
        "multi_label": run.multi_label, "metric_for_best": run.metric_for_best,
        "best_step": state.best_step,
        "best_epoch": None if state.best_step is None else round(state.best_step / run.steps_per_epoch, 2),
        "trainable_parameters": run.trainable_parameters, "total_parameters": run.total_parameters,
        "trainable_share": run.trainable_parameters / run.total_parameters,
        "optimizer_steps": state.global_step, "steps_per_epoch": run.steps_per_epoch,
        "train_seconds": state.train_seconds,
        "train_samples_per_s": state.samples_seen / max(state.train_seconds, 1e-9),
        "train_tokens_per_s": state.tokens_seen / max(state.train_seconds, 1e-9),
        "num_processes": run.accelerator.num_processes, "mixed_precision": run.accelerator.mixed_precision,
        "config": dataclasses.asdict(run.cfg), "inputs": run.identity["inputs"],
    }


def format_comparison(before: dict, after: dict, label_names: list[str], multi_label: bool = False) -> str:
    """A plain-text before/after table of the summary metrics and both confusion matrices (multi-label:
    the per-label F1 instead of confusion matrices)."""
    shown = {name: f1_name(label_names) if name == "f1" else name
             for name in (MULTI_LABEL_SUMMARY if multi_label else SUMMARY_METRICS)}
    width = max(18, *map(len, shown.values()))
    lines = [f"{'metric':<{width}} {'before':>9} {'after':>9} {'change':>9}"]
    for name, title in shown.items():
        lines.append(f"{title:<{width}} {before[name]:>9.4f} {after[name]:>9.4f} {after[name] - before[name]:>+9.4f}")
    if multi_label:
        lines.append(f"{'label':<18} {'f1 before':>9} {'f1 after':>9} {'threshold':>9}")
        for name in label_names:
            row = after["per_class"][name]
            lines.append(f"{name:<18} {before['per_class'][name]['f1']:>9.4f} {row['f1']:>9.4f} {row['threshold']:>9.2f}")
        return "\n".join(lines)
    for title, metrics in (("before", before), ("after", after)):
        lines.append(f"confusion matrix {title} (rows: true, columns: predicted)")
        width = max(len(n) for n in label_names) + 2
        lines.append(" " * width + "".join(f"{n:>{width}}" for n in label_names))
        for name, row in zip(label_names, metrics["confusion_matrix"]):
            lines.append(f"{name:>{width}}" + "".join(f"{v:>{width}}" for v in row))
    return "\n".join(lines)


def f1_name(label_names: list[str]) -> str:
    """The headline f1 named for what it is (compute_metrics): the positive class's with two classes, else macro."""
    return f"f1 (class {label_names[1]!r})" if len(label_names) == 2 else "f1 (macro)"


REPORT_FILE = "report.md"
CURVES_FILE = "training_curves.png"
CONFUSION_FILE = "confusion_matrices.png"


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


def duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return (f"{hours} h {minutes} min" if hours else f"{minutes} min {seconds} s" if minutes else f"{seconds} s")


def _summary_section(results: dict) -> list[str]:
    before, after, cfg = results["baseline"], results["final"], results["config"]
    if results.get("multi_label"):
        return _multi_label_summary(results)
    return [
        f"`{cfg['model']}` with a LoRA adapter (r={cfg['lora_r']}, alpha={cfg['lora_alpha']}) on "
        f"`{cfg['dataset']}`: accuracy {before['accuracy']:.4f} before training, {after['accuracy']:.4f} after, "
        f"on {after['num_samples']} held-out samples. \"After\" is the adapter kept as best by "
        f"`{cfg['metric_for_best']}`.",
        "## Before and after training",
        before_after_table(before, after, REPORT_METRICS),
        metrics_note(results["label_names"]) + " Balanced accuracy is the mean recall over classes: unlike "
        "accuracy, it drops when a rare class is ignored.",
    ]


def before_after_table(before: dict, after: dict, metrics) -> str:
    return markdown_table(["metric", "before", "after", "change"],
                          [[m, before[m], after[m], f"{after[m] - before[m]:+.4f}"] for m in metrics])


def _multi_label_summary(results: dict) -> list[str]:
    before, after, cfg = results["baseline"], results["final"], results["config"]
    metric = results.get("metric_for_best", cfg["metric_for_best"])
    tuned = cfg.get("tune_thresholds")
    return [
        f"`{cfg['model']}` with a LoRA adapter (r={cfg['lora_r']}, alpha={cfg['lora_alpha']}) on "
        f"`{cfg['dataset']}`, several labels per text ({len(results['label_names'])} labels): micro F1 "
        f"{before['f1_micro']:.4f} before training, {after['f1_micro']:.4f} after, on {after['num_samples']} "
        f"held-out samples. \"After\" is the adapter kept as best by `{metric}`.",
        "## Before and after training",
        before_after_table(before, after, MULTI_LABEL_METRICS),
        "A label is predicted when its sigmoid score reaches its threshold ("
        + ("tuned per label for F1 on this same eval split, so the \"after\" scores are optimistic; "
           if tuned else "0.5 for every label; ")
        + "the thresholds are saved in thresholds.json). f1_micro pools every (text, label) decision, f1_macro "
        "averages the labels (each counts the same), f1_samples averages each text's F1; subset accuracy counts "
        "texts whose whole label set is right; Hamming loss is the share of wrong (text, label) decisions "
        "(lower is better).",
    ]


def per_class_section(results: dict) -> list[str]:
    after, before = results["final"].get("per_class"), results["baseline"].get("per_class", {})
    if after is None:  # a metrics.json written before per-class reports existed
        return []
    if results.get("multi_label"):
        rows = [[name, row["precision"], row["recall"], row["f1"], before.get(name, {}).get("f1", "-"),
                 row["support"], f"{row['threshold']:.2f}"] for name, row in after.items()]
        return ["## Per-label report (after training)",
                markdown_table(["label", "precision", "recall", "f1", "f1 before", "support", "threshold"], rows),
                *absent_classes_note(after)]
    rows = [[name, row["precision"], row["recall"], row["f1"], before.get(name, {}).get("f1", "-"), row["support"]]
            for name, row in after.items()]
    return ["## Per-class report (after training)",
            markdown_table(["class", "precision", "recall", "f1", "f1 before", "support"], rows),
            *absent_classes_note(after)]


def absent_classes_note(per_class: dict) -> list[str]:
    """A class with no eval sample scores recall and F1 0 (scikit-learn's zero_division=0), and macro
    averages still count it: say so, or f1_macro reads as if the model failed on that class."""
    absent = [name for name, row in per_class.items() if row["support"] == 0]
    if not absent:
        return []
    names = ", ".join(f"`{_cell(name)}`" for name in absent)
    return [f"**Note:** the eval split holds no sample of {names}. Its recall and F1 count as 0, and macro "
            f"averages (f1_macro{', and f1' if len(per_class) > 2 else ''}) average over all "
            f"{len(per_class)} classes including it, so they understate the classes present; read the "
            "per-class rows and accuracy instead."]


def _confusion_section(results: dict) -> list[str]:
    if results.get("multi_label"):  # one yes/no decision per label: the per-label table says it
        return []
    names = results["label_names"]
    return ["## Confusion matrices",
            "Before training:", confusion_table(results["baseline"]["confusion_matrix"], names),
            "After training:", confusion_table(results["final"]["confusion_matrix"], names)]


def _training_section(results: dict) -> list[str]:
    cfg = results["config"]
    columns = CURVE_METRICS[bool(results.get("multi_label"))]
    evals = [[e["step"], e["epoch"], e["loss"], *(e[c] for c in columns)] for e in eval_history(results)]
    facts = [
        f"- optimizer steps: {results['optimizer_steps']} (batch {cfg['batch_size']} x accumulation "
        f"{cfg['gradient_accumulation_steps']} x {results['num_processes']} process(es))",
        f"- training time: {duration(results['train_seconds'])} (evaluation not included)",
        f"- throughput: {results['train_samples_per_s']:.1f} samples/s, {results['train_tokens_per_s']:.0f} "
        "tokens/s (real tokens, padding excluded)",
        f"- trainable parameters: {results['trainable_parameters']:,} of {results['total_parameters']:,} "
        f"({100 * results['trainable_share']:.2f} %)",
        f"- mixed precision: {results['mixed_precision']}",
    ]
    return ["## Evaluations during training",
            markdown_table(["step", "epoch", "loss", *columns], evals), *best_adapter_note(results),
            "## Training", "\n".join(facts)]


def best_adapter_note(results: dict) -> list[str]:
    """When the adapter kept as best was taken: its step, and its epoch counted from the start (step 354
    of 236-step epochs is epoch 1.50); [] for a metrics.json written before runs recorded it."""
    step, per_epoch = results.get("best_step"), results.get("steps_per_epoch")
    if step is None:
        return []
    when = f"step {step} of {results['optimizer_steps']}"
    if per_epoch:
        when += f" (epoch {step / per_epoch:.2f} of {results['optimizer_steps'] / per_epoch:.2f})"
    metric = results.get("metric_for_best", results["config"]["metric_for_best"])
    evals = eval_history(results)[1:]
    last = f" ({metric} {evals[-1][metric]:.4f} at step {evals[-1]['step']})" if evals and metric in evals[-1] else ""
    return [f"The adapter saved (\"after\") was taken at {when}: the best `{metric}` of {len(evals)} evaluation(s) "
            f"during training. It is picked on this same eval split, so its score is slightly optimistic; the last "
            f"evaluation{last} is the one no choice flatters."]


def _config_section(results: dict) -> list[str]:
    import yaml

    # yaml.safe_dump, not json.dumps: PyYAML reads JSON's 1e-05 back as a string, its own 1.0e-05 as a float.
    settings = {k: v for k, v in results["config"].items() if k not in NOT_FOR_REUSE}
    block = yaml.safe_dump(settings, sort_keys=False, default_flow_style=False)
    return ["## Config used", "The settings of the run (how it was started, --overwrite or --resume_from_checkpoint, "
            "left out); the block is YAML, which `train_loop.py --config` reads.",
            f"```yaml\n{block}```"]


def format_report(results: dict, plot_files: list[str] = ()) -> str:
    """The text of report.md for one run (``results`` is the dict saved as metrics.json)."""
    plots = ["## Plots", "\n\n".join(f"![{Path(f).stem.replace('_', ' ')}]({Path(f).name})" for f in plot_files)]
    sections = ["# Fine-tuning report", *_summary_section(results), *per_class_section(results),
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


# The eval metrics drawn over training and listed in the report, single-label (False) and multi-label (True).


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
    loss_ax.set(title="Binary cross-entropy loss" if results.get("multi_label") else "Cross-entropy loss",
                ylabel="loss")
    if len(train) < 3:  # a run shorter than --log_every logs once, at its end: no curve to draw
        loss_ax.text(0.5, 0.03, f"{len(train)} training log(s): lower --log_every for a curve",
                     transform=loss_ax.transAxes, ha="center", va="bottom", color="tab:gray")

    lines = [(key, f1_name(results["label_names"]) if key == "f1" else key.replace("_", " "))
             for key in CURVE_METRICS[bool(results.get("multi_label"))]]
    # Distinct markers and dashes: on balanced data accuracy and balanced accuracy coincide exactly.
    for (key, label), style in zip(lines, ("o-", "s--", "^:")):
        metric_ax.plot(eval_steps, [e[key] for e in evals], style, label=label, markersize=5)
    if results.get("best_step") is not None:
        metric_ax.axvline(results["best_step"], color="tab:gray", linestyle=":", label="adapter kept as best")
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

    names = [name.replace("$", r"\$") for name in results["label_names"]]  # '$' would start mathtext
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
    plots = ((CURVES_FILE, plot_curves),) if results.get("multi_label") else (
        (CURVES_FILE, plot_curves), (CONFUSION_FILE, plot_confusion_matrices))
    for name, draw in plots:
        path = Path(output_dir) / name
        try:  # a plot is a convenience: it must never fail a finished run
            draw(results).savefig(path, dpi=110)
        except Exception as err:  # matplotlib raises many types (a class name with '$' is read as math)
            print(f"warning: {name} not drawn ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})")
            continue
        paths.append(path)
    return paths
