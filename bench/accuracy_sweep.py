"""Accuracy sweep: variants of the default job, one full ``train_loop`` run per variant and seed.

    python bench/accuracy_sweep.py --variant full_ft --seed 43 --output_dir outputs/sweep/full_ft-43
    python bench/accuracy_sweep.py --list                       # the variants and what each changes
    python bench/accuracy_sweep.py --table outputs/sweep/sweep.jsonl   # one markdown row per variant

Each run is the real job (``train_loop.train``: same data loading, split, loop, evaluation and
metrics.json); a variant changes settings (any ``TrainConfig`` field) and, for what no flag offers,
swaps one of train_loop's building blocks for the run:

  full             full fine-tuning: every base weight trained (the LoRA layers stay frozen at B = 0, so
                   they compute nothing); the ceiling an adapter can be held against. Its output dir holds
                   no usable model (the adapter files carry the head only), and when an earlier evaluation
                   was the best, the run's "final" puts that head on the last weights: read the accuracies
                   from the history, as this script does
  head_lr          the new modules (head) at ``head_lr`` x the learning rate, the adapter at the learning rate
  loraplus         LoRA+: the B matrices at ``loraplus`` x the learning rate
  dropout          every dropout of the model (attention's included) at this p
  label_smoothing  the training loss with label smoothing (the eval loss without)

``--seed`` also carves the split (``data.load_splits``), so seeds differ in data as well as in init.
One JSON line per run is appended to ``--results`` (default: OUTPUT_DIR/../sweep.jsonl): accuracy of
the adapter kept as best, accuracy at the last evaluation (the one that no selection on the eval split
flatters), the step the best was taken at, and training seconds (evaluation excluded).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root: train_loop, lora_setup ...

import train_loop  # noqa: E402

# name: (TrainConfig overrides, hooks). Only settings that differ from TrainConfig's defaults are listed.
VARIANTS = {
    "default": ({}, {}),
    "full_ft": ({"learning_rate": 1e-4}, {"full": True}),
    "full_ft_lr5e-5": ({"learning_rate": 5e-5}, {"full": True}),
    "epochs3": ({"num_epochs": 3}, {}),
    "lr1e-3": ({"learning_rate": 1e-3}, {}),
    "bias_all": ({"lora_bias": "all"}, {}),
    "smooth0.1": ({}, {"label_smoothing": 0.1}),
    "lora_dropout0": ({"lora_dropout": 0.0}, {}),
    "no_dropout": ({"lora_dropout": 0.0}, {"dropout": 0.0}),
    "loraplus16": ({}, {"loraplus": 16.0}),
    "loraplus16_lr2e-4": ({"learning_rate": 2e-4}, {"loraplus": 16.0}),
    "batch16": ({"batch_size": 16}, {}),
    "head_lr10": ({}, {"head_lr": 10.0}),
    "lr1e-3_epochs3": ({"learning_rate": 1e-3, "num_epochs": 3}, {}),
    "r32_epochs3": ({"lora_r": 32, "lora_alpha": 64, "num_epochs": 3}, {}),
}


def full_finetuning(build_model):
    """``train_loop.build_model`` that trains every base weight and freezes the (zero) LoRA update."""
    def build(*args, **kwargs):
        model, heads = build_model(*args, **kwargs)
        for name, param in model.named_parameters():
            param.requires_grad = "lora_" not in name
        return model, heads
    return build


def faster_group(is_faster, factor: float):
    """``train_loop.build_optimizer`` with the parameters whose name ``is_faster`` at ``factor`` x lr."""
    import torch

    def build(model, learning_rate, weight_decay, fused=False):
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        groups = []
        for faster in (False, True):
            for decay in (True, False):
                params = [p for n, p in named if is_faster(n) == faster and (p.ndim >= 2) == decay]
                if params:
                    groups.append({"params": params, "weight_decay": weight_decay if decay else 0.0,
                                   "lr": learning_rate * (factor if faster else 1.0)})
        return torch.optim.AdamW(groups, lr=learning_rate, fused=fused or None)
    return build


def head_learning_rate(factor: float):
    """The head (PEFT's ``modules_to_save`` copies) at ``factor`` x lr."""
    return faster_group(lambda name: "modules_to_save" in name, factor)


def loraplus(ratio: float):
    """LoRA+ (Hayou et al. 2024): the LoRA B matrices at ``ratio`` x lr."""
    return faster_group(lambda name: "lora_B" in name, ratio)


def with_dropout(build_model, p: float):
    """``train_loop.build_model`` with every dropout of the model (attention reads its module's p) set to ``p``."""
    import torch

    def build(*args, **kwargs):
        model, heads = build_model(*args, **kwargs)
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = p
        return model, heads
    return build


class SmoothedFunctional:
    """``torch.nn.functional`` for train_loop with label smoothing in its training loss (cross_entropy)."""

    def __init__(self, epsilon: float):
        import torch.nn.functional
        self.functional, self.epsilon = torch.nn.functional, epsilon

    def __getattr__(self, name):
        return getattr(self.functional, name)

    def cross_entropy(self, *args, **kwargs):
        return self.functional.cross_entropy(*args, label_smoothing=self.epsilon, **kwargs)


def run(variant: str, seed: int, output_dir: Path, extra: list[str]) -> dict:
    overrides, hooks = VARIANTS[variant]
    argv = ["--seed", str(seed), "--output_dir", str(output_dir), "--overwrite"]
    for name, value in overrides.items():
        argv += [f"--{name}", str(value)]
    cfg = train_loop.parse_config(argv + extra)
    if hooks.get("full"):
        train_loop.build_model = full_finetuning(train_loop.build_model)
    if hooks.get("head_lr"):
        train_loop.build_optimizer = head_learning_rate(hooks["head_lr"])
    if hooks.get("loraplus"):
        train_loop.build_optimizer = loraplus(hooks["loraplus"])
    if "dropout" in hooks:
        train_loop.build_model = with_dropout(train_loop.build_model, hooks["dropout"])
    if hooks.get("label_smoothing"):
        train_loop.F = SmoothedFunctional(hooks["label_smoothing"])
    results = train_loop.train(cfg)
    evals = [h for h in results["history"] if "eval/accuracy" in h]
    return {"variant": variant, "seed": seed, "accuracy_best": max(h["eval/accuracy"] for h in evals),
            "accuracy_last": evals[-1]["eval/accuracy"], "best_step": max(evals, key=lambda h: h["eval/accuracy"])["step"],
            "evals": [(h["step"], h["eval/accuracy"]) for h in evals], "train_seconds": results["train_seconds"],
            "optimizer_steps": results["optimizer_steps"], "trainable_parameters": results["trainable_parameters"],
            "argv": argv + extra, "output_dir": str(output_dir)}


def table(records: list[dict], seeds: list[int] | None = None) -> str:
    """Markdown: one row per variant (in VARIANTS' order), each seed's accuracy of the adapter kept as best
    with the accuracy at the last evaluation in brackets, their means and standard deviation over seeds,
    and the mean training seconds. The newest record of a (variant, seed) pair counts."""
    import statistics

    def seconds(runs):  # a record read back from a run's log may lack its training time
        timed = [r["train_seconds"] for r in runs if r.get("train_seconds") is not None]
        return f"{statistics.mean(timed):.0f}" if timed else ""

    latest = {(r["variant"], r["seed"]): r for r in records}
    seeds = seeds or sorted({seed for _, seed in latest})
    lines = ["| variant | " + " | ".join(f"seed {s}" for s in seeds) + " | mean (sd) | mean at last eval | train s |",
             "|---|" + "---:|" * (len(seeds) + 3)]
    for variant in [v for v in VARIANTS if any(k[0] == v for k in latest)]:
        runs = [latest.get((variant, s)) for s in seeds]
        done = [r for r in runs if r]
        best = [100 * r["accuracy_best"] for r in done]
        spread = f" ({statistics.stdev(best):.1f})" if len(best) > 1 else ""
        cells = [f"{100 * r['accuracy_best']:.1f} ({100 * r['accuracy_last']:.1f})" if r else "" for r in runs]
        lines.append(f"| {variant} | " + " | ".join(cells) + f" | {statistics.mean(best):.1f}{spread} | "
                     f"{statistics.mean(100 * r['accuracy_last'] for r in done):.1f} | "
                     f"{seconds(done)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", choices=sorted(VARIANTS))
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--output_dir", type=Path)
    parser.add_argument("--results", type=Path, help="JSON lines file to append to")
    parser.add_argument("--list", action="store_true", help="print the variants and exit")
    parser.add_argument("--table", type=Path, metavar="RESULTS", help="print the markdown table of a --results file "
                        "and exit")
    args, extra = parser.parse_known_args(argv)  # the rest are train_loop flags
    if args.list:
        for name, (overrides, hooks) in VARIANTS.items():
            print(f"{name:<16} {overrides} {hooks}")
        return 0
    if args.table:
        print(table([json.loads(line) for line in args.table.read_text().splitlines() if line.strip()]))
        return 0
    if args.variant is None or args.output_dir is None:
        parser.error("--variant and --output_dir are required")
    record = run(args.variant, args.seed, args.output_dir, extra)
    results = args.results or args.output_dir.parent / "sweep.jsonl"
    with open(results, "a") as handle:
        handle.write(json.dumps(record) + "\n")
    print(json.dumps({k: record[k] for k in ("variant", "seed", "accuracy_best", "accuracy_last", "train_seconds")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
