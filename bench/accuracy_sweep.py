"""Accuracy sweep: variants of the default job, one full ``train_loop`` run per variant and seed.

    python bench/accuracy_sweep.py --variant full_ft --seed 43 --output_dir /tmp/sweep/full_ft-43
    python bench/accuracy_sweep.py --list                       # the variants and what each changes

Each run is the real job (``train_loop.train``: same data loading, split, loop, evaluation and
metrics.json); a variant changes settings (any ``TrainConfig`` field) and, for what no flag offers,
swaps one of train_loop's building blocks for the run:

  full       full fine-tuning: every base weight trained (the LoRA layers stay frozen at B = 0, so they
             compute nothing); the ceiling an adapter can be held against. Its output dir holds no usable
             model (the adapter files carry the head only), and when an earlier evaluation was the best,
             the run's "final" puts that head on the last weights: read the accuracies from the history,
             as this script does
  head_lr    the new modules (head) at ``head_lr`` x the learning rate, the adapter at the learning rate

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


def head_learning_rate(factor: float):
    """``train_loop.build_optimizer`` with the head (PEFT's ``modules_to_save`` copies) at ``factor`` x lr."""
    import torch

    def build(model, learning_rate, weight_decay, fused=False):
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        groups = []
        for is_head in (False, True):
            for decay in (True, False):
                params = [p for n, p in named if ("modules_to_save" in n) == is_head and (p.ndim >= 2) == decay]
                if params:
                    groups.append({"params": params, "weight_decay": weight_decay if decay else 0.0,
                                   "lr": learning_rate * (factor if is_head else 1.0)})
        return torch.optim.AdamW(groups, lr=learning_rate, fused=fused or None)
    return build


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
    results = train_loop.train(cfg)
    evals = [h for h in results["history"] if "eval/accuracy" in h]
    return {"variant": variant, "seed": seed, "accuracy_best": max(h["eval/accuracy"] for h in evals),
            "accuracy_last": evals[-1]["eval/accuracy"], "best_step": max(evals, key=lambda h: h["eval/accuracy"])["step"],
            "evals": [(h["step"], h["eval/accuracy"]) for h in evals], "train_seconds": results["train_seconds"],
            "optimizer_steps": results["optimizer_steps"], "trainable_parameters": results["trainable_parameters"],
            "argv": argv + extra, "output_dir": str(output_dir)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", choices=sorted(VARIANTS))
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--output_dir", type=Path)
    parser.add_argument("--results", type=Path, help="JSON lines file to append to")
    parser.add_argument("--list", action="store_true", help="print the variants and exit")
    args, extra = parser.parse_known_args(argv)  # the rest are train_loop flags
    if args.list:
        for name, (overrides, hooks) in VARIANTS.items():
            print(f"{name:<16} {overrides} {hooks}")
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
