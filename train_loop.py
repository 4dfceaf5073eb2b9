"""LoRA fine-tuning for text classification: a hand-written training loop driven by Hugging Face Accelerate.

    accelerate launch train_loop.py                  # the whole job, offline, on the embedded default
    python train_loop.py --help                      # every setting, with its default
    accelerate launch train_loop.py --config configs/imdb.yaml --num_epochs 1

The job, in the order ``train()`` runs it:
  1. Config       one dataclass (``TrainConfig``); CLI flags, optionally on top of a YAML/JSON file.
  2. Data         load, dedupe, split, tokenize once; length-grouped batches with dynamic padding (data.py).
  3. Model        pretrained transformer + new classification head + LoRA adapter (lora_setup.py).
  4. Baseline     evaluate before any training (LoRA's B matrices start at zero, so the wrapped model
                  computes exactly what the untouched model does).
  5. Loop         per optimizer step: an accumulation window of micro-batches, forward, loss, backward,
                  gradient clipping, AdamW step, LR schedule step. Logging, periodic evaluation,
                  atomic checkpoints, early stopping, resume.
  6. Results      final evaluation, before/after table, adapter + tokenizer + metrics.json saved.

Features, each visible below: gradient accumulation with exact loss normalisation (the last, partial
window included), mixed precision (bf16/fp16 via Accelerate), gradient clipping, linear/cosine
schedules with warmup counted in optimizer steps, weight decay only on weight matrices, DDP / FSDP /
DeepSpeed through ``accelerate launch`` (no distributed code of our own), checkpoints every N steps and
each epoch (written atomically, last K kept), exact resume mid-epoch, NaN/inf guard, early stopping
with the best adapter kept, experiment trackers, optional ``torch.compile`` and merged export, and on
CPU dropout masks drawn 3x cheaper (``lora_setup.FastDropout``: a third of a CPU step was spent there).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import time
import typing
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

import data
import eval as evaluation
import lora_setup


# ----------------------------------------------------------------------------------------------
# 1. Configuration
# ----------------------------------------------------------------------------------------------


def _opt(default, help_text):
    return field(default=default, metadata={"help": help_text})


@dataclass
class TrainConfig:
    # What to train on
    model: str = _opt("embedded:minilm", "Hub id, local folder, or embedded:minilm / embedded:smollm2")
    dataset: str = _opt("embedded:rotten_tomatoes", "embedded:rotten_tomatoes|embedded:imdb, a local "
                        ".csv/.json/.jsonl/.parquet file, or a Hub dataset (imdb, glue/sst2 ...)")
    dataset_config: typing.Optional[str] = _opt(None, "Hub dataset config name (e.g. sst2 for glue)")
    eval_file: typing.Optional[str] = _opt(None, "separate eval file for a local --dataset")
    eval_split: typing.Optional[str] = _opt(None, "Hub split to evaluate on (default: validation, else test)")
    text_column: str = _opt("text", "column holding the text")
    label_column: str = _opt("label", "column holding the label (ints 0..K-1 or class-name strings)")
    num_labels: typing.Optional[int] = _opt(None, "number of classes (default: read from the data)")
    eval_size: float = _opt(1000, "held-out rows carved from train when the source has no eval split "
                            "(a count, or a fraction if < 1); stratified and seeded")
    max_train_samples: typing.Optional[int] = _opt(None, "subsample the train split to this many rows")
    max_eval_samples: typing.Optional[int] = _opt(None, "subsample the eval split to this many rows")
    drop_empty_texts: bool = _opt(False, "drop rows whose text is empty instead of stopping with an error")
    max_length: int = _opt(128, "truncate texts to this many tokens")
    output_dir: str = _opt("outputs/run", "where the adapter, metrics.json and checkpoints go")
    overwrite: bool = _opt(False, "replace an output dir that already holds a run")
    seed: int = _opt(42, "seed for the split, data order, head init and dropout")
    # LoRA
    lora_r: int = _opt(16, "LoRA rank")
    lora_alpha: int = _opt(32, "LoRA scaling numerator (update scaled by alpha/r)")
    lora_dropout: float = _opt(0.1, "dropout on the LoRA input")
    target_modules: typing.Optional[list[str]] = _opt(None, "layer names to adapt, or all-linear "
                                                      "(default: every attention and MLP projection)")
    modules_to_save: typing.Optional[list[str]] = _opt(None, "extra modules trained in full and saved "
                                                       "(the new head is always included)")
    lora_bias: str = _opt("none", "train biases: none | all | lora_only")
    use_dora: bool = _opt(False, "DoRA: weight-decomposed LoRA")
    use_rslora: bool = _opt(False, "rank-stabilised LoRA scaling (alpha/sqrt(r))")
    load_in_4bit: bool = _opt(False, "QLoRA: load the frozen base in 4-bit NF4 through bitsandbytes (CUDA only)")
    # Optimisation
    num_epochs: int = _opt(2, "passes over the train split")
    max_steps: typing.Optional[int] = _opt(None, "stop after this many optimizer steps (overrides epochs)")
    batch_size: int = _opt(32, "micro-batch size per process")
    gradient_accumulation_steps: int = _opt(1, "micro-batches per optimizer step")
    # 5e-4 and 1e-3 score the same on the default job, 2e-3 collapses to chance: we keep a 4x margin.
    learning_rate: float = _opt(5e-4, "peak learning rate (AdamW)")
    weight_decay: float = _opt(0.01, "AdamW weight decay (not applied to biases and norms)")
    lr_scheduler: str = _opt("linear", "linear | cosine | constant, after warmup")
    warmup_ratio: float = _opt(0.06, "share of optimizer steps spent warming up")
    max_grad_norm: float = _opt(1.0, "clip the gradient norm to this (0 = no clipping)")
    mixed_precision: str = _opt("auto", "auto (bf16 on a GPU that has it, else fp32) | no | bf16 | fp16")
    group_by_length: bool = _opt(True, "batch texts of similar length together (less padding)")
    num_workers: typing.Optional[int] = _opt(None, "DataLoader workers (default: 2 on GPU, 0 on CPU)")
    compile: bool = _opt(False, "torch.compile the model")
    fast_dropout: bool = _opt(True, "on CPU, draw dropout masks from 16 random bits (3x cheaper, same p)")
    # Evaluation, logging, checkpoints
    eval_batch_size: int = _opt(128, "batch size for evaluation")
    eval_every: int = _opt(0, "evaluate every N optimizer steps (0 = at each epoch end)")
    log_every: int = _opt(20, "log loss, LR and throughput every N optimizer steps")
    checkpoint_every: int = _opt(0, "checkpoint every N optimizer steps, besides each epoch end (0 = epoch ends)")
    keep_checkpoints: int = _opt(2, "keep the newest K checkpoints")
    resume_from_checkpoint: typing.Optional[str] = _opt(None, "latest, or a checkpoint folder")
    metric_for_best: str = _opt("accuracy", "eval metric that picks the best adapter (higher is better)")
    early_stopping_patience: int = _opt(0, "stop after N evaluations without improvement (0 = off)")
    report_to: typing.Optional[str] = _opt(None, "experiment tracker: tensorboard, wandb, ... or all")
    merge: bool = _opt(False, "also export a merged model (plain transformers) to OUTPUT_DIR/merged")


class ConfigError(ValueError):
    """A setting is invalid; the message names the flag and the fix."""


def validate_config(cfg: TrainConfig) -> None:
    """Ranges and contradictions of the settings, checked before anything is loaded."""
    for f in dataclasses.fields(cfg):  # argparse's float() takes "nan" and "inf"; no setting means them
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"--{f.name} must be a finite number (got {value})")
    positive = ["batch_size", "eval_batch_size", "gradient_accumulation_steps", "num_epochs", "max_length",
                "lora_r", "lora_alpha", "log_every", "keep_checkpoints"]
    for name in positive:
        if getattr(cfg, name) < 1:
            raise ConfigError(f"--{name} must be a positive integer (got {getattr(cfg, name)})")
    for name in ("max_steps", "max_train_samples", "max_eval_samples", "num_labels"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            raise ConfigError(f"--{name} must be a positive integer (got {getattr(cfg, name)})")
    checks = [
        (cfg.num_labels is None or cfg.num_labels >= 2, "--num_labels must be at least 2 (a classifier needs two "
                                                        "classes); leave it out to read it from the data"),
        (0 <= cfg.seed < 2**32, f"--seed must be in 0..2**32-1 (got {cfg.seed})"),  # numpy's seed range
        (cfg.learning_rate > 0, f"--learning_rate must be > 0 (got {cfg.learning_rate})"),
        (cfg.weight_decay >= 0, f"--weight_decay must be >= 0 (got {cfg.weight_decay})"),
        (0 <= cfg.warmup_ratio < 1, f"--warmup_ratio must be in [0, 1) (got {cfg.warmup_ratio})"),
        (0 <= cfg.lora_dropout < 1, f"--lora_dropout must be in [0, 1) (got {cfg.lora_dropout})"),
        (cfg.max_grad_norm >= 0, f"--max_grad_norm must be >= 0 (got {cfg.max_grad_norm})"),
        (cfg.eval_size > 0, f"--eval_size must be > 0 (got {cfg.eval_size})"),
        (cfg.eval_size < 1 or float(cfg.eval_size).is_integer(),
         f"--eval_size must be a whole number of rows, or a fraction below 1 (got {cfg.eval_size})"),
        (cfg.eval_every >= 0 and cfg.checkpoint_every >= 0 and cfg.early_stopping_patience >= 0,
         "--eval_every, --checkpoint_every and --early_stopping_patience must be >= 0"),
        (cfg.lr_scheduler in ("linear", "cosine", "constant"),
         f"--lr_scheduler must be linear, cosine or constant (got {cfg.lr_scheduler!r})"),
        (cfg.mixed_precision in ("auto", "no", "bf16", "fp16"),
         f"--mixed_precision must be auto, no, bf16 or fp16 (got {cfg.mixed_precision!r})"),
        (cfg.lora_bias in ("none", "all", "lora_only"), f"--lora_bias must be none, all or lora_only"),
        (cfg.metric_for_best in evaluation.SCORE_METRICS,
         f"--metric_for_best must be one of {', '.join(evaluation.SCORE_METRICS)} (got {cfg.metric_for_best!r})"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    from accelerate.utils import LoggerType

    trackers = [t.value for t in LoggerType]  # "all" is one of them
    if cfg.report_to is not None and cfg.report_to not in trackers:
        raise ConfigError(f"--report_to must be one of {', '.join(trackers)} (got {cfg.report_to!r})")


def _field_type(name: str) -> tuple[type, bool]:
    """``(type, may_be_None)`` of a TrainConfig field: ``Optional[int]`` -> ``(int, True)``."""
    kind = typing.get_type_hints(TrainConfig)[name]
    args = typing.get_args(kind)
    if type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return kind, False


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises ConfigError (one line, via main) instead of printing its whole usage and exiting."""

    def error(self, message):
        raise ConfigError(f"{message}; see --help for every flag")


def build_arg_parser() -> argparse.ArgumentParser:
    """Every TrainConfig field becomes a flag of the same name, with its help text and default."""
    parser = ArgumentParser(description=__doc__.split("\n\n")[0],
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", help="YAML or JSON file of settings; flags given here override it")
    for f in dataclasses.fields(TrainConfig):
        kind, _ = _field_type(f.name)
        if kind is bool:
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=f.default,
                                help=f.metadata["help"])
        elif typing.get_origin(kind) is list:
            parser.add_argument(f"--{f.name}", nargs="+", default=f.default, help=f.metadata["help"])
        else:
            parser.add_argument(f"--{f.name}", type=kind, default=f.default, help=f.metadata["help"])
    return parser


TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def check_setting(name: str, value, source: str):
    """A config-file value checked against the TrainConfig field's type, and read as the same value
    typed on the command line would be (YAML reads ``1e-3`` as a string; argparse's float() does not)."""
    kind, optional = _field_type(name)
    if value is None and optional:
        return None
    if typing.get_origin(kind) is list:
        if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            return value
        raise ConfigError(f"config file '{source}': {name} must be a list of names, like [query, value] "
                          f"(got {value!r}); fix it in the file")
    if isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool):
        return value
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind in (int, float) and isinstance(value, str):
        try:
            return kind(value)
        except ValueError:
            pass
    raise ConfigError(f"config file '{source}': {name} must be {TYPE_WORDS[kind]}"
                      f"{' or null' if optional else ''} (got {value!r}); fix it in the file")


def read_config_file(path: Path) -> dict:
    """The settings of a YAML or JSON config file, each checked against TrainConfig."""
    try:
        import yaml
        text = data.read_text_file(path, "config file")
        settings = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except data.DataError as err:
        raise ConfigError(str(err)) from None
    except Exception as err:
        raise ConfigError(f"could not parse config file '{path}': {str(err).splitlines()[0]}") from None
    if settings is None:  # an empty file, or only comments
        return {}
    if not isinstance(settings, dict):
        raise ConfigError(f"config file '{path}' must hold settings as `name: value` lines (a mapping), "
                          f"not a {type(settings).__name__}")
    unknown = sorted(map(str, set(settings) - {f.name for f in dataclasses.fields(TrainConfig)}))
    if unknown:
        raise ConfigError(f"config file '{path}' has unknown settings {unknown}; see --help for the names")
    return {name: check_setting(name, value, str(path)) for name, value in settings.items()}


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """Defaults < config file < command-line flags."""
    parser = build_arg_parser()
    known, _ = parser.parse_known_args(argv)
    if known.config:
        parser.set_defaults(**read_config_file(Path(known.config)))
    args = vars(parser.parse_args(argv))
    args.pop("config")
    cfg = TrainConfig(**args)
    validate_config(cfg)
    return cfg


# Settings that define what a checkpoint's weights and data order mean: resuming with any of them
# changed would silently train something else.
RESUME_IDENTITY = ("model", "dataset", "dataset_config", "eval_file", "text_column", "label_column", "num_labels",
                   "max_length", "max_train_samples", "seed", "batch_size", "gradient_accumulation_steps",
                   "lora_r", "lora_alpha", "target_modules", "modules_to_save", "lora_bias", "use_dora", "use_rslora",
                   "load_in_4bit")


def check_output_dir(cfg: TrainConfig) -> None:
    """Refuse to write over another run (work would be lost) unless asked to."""
    out = Path(cfg.output_dir)
    if not out.exists() or not any(out.iterdir()) or cfg.overwrite:
        return
    run_file = out / "run_config.json"
    if not run_file.is_file():
        raise ConfigError(f"output dir '{out}' is not empty and holds no run of ours; pick another "
                          "--output_dir, or pass --overwrite to replace its contents")
    previous = json.loads(run_file.read_text())
    changed = [k for k in RESUME_IDENTITY if previous.get(k) != getattr(cfg, k)]
    if cfg.resume_from_checkpoint and not changed:
        return
    if changed:
        detail = ", ".join(f"{k}={previous.get(k)!r} there vs {getattr(cfg, k)!r} now" for k in changed)
        raise ConfigError(f"output dir '{out}' holds a different run ({detail}); pass another --output_dir, "
                          "or --overwrite to replace it")
    raise ConfigError(f"output dir '{out}' already holds this run; pass --resume_from_checkpoint latest to "
                      "continue it, --overwrite to start over, or another --output_dir")


# ----------------------------------------------------------------------------------------------
# Optimizer, schedule, one training step
# ----------------------------------------------------------------------------------------------


def build_optimizer(model, learning_rate: float, weight_decay: float, fused: bool = False):
    """AdamW over the trainable parameters only. Decay shrinks weight matrices towards zero; biases and
    LayerNorm gains (1-D tensors) are not decayed, since pulling them to zero only hurts."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=learning_rate, fused=fused or None)


def build_scheduler(optimizer, kind: str, warmup_steps: int, total_steps: int):
    """Linear warmup from 0 to the peak LR, then linear or cosine decay to 0 (or constant).

    The schedule counts optimizer steps. We step it ourselves, once per optimizer step, and do not
    hand it to ``accelerator.prepare``: a prepared scheduler steps once per process per call, which
    with N processes runs the schedule N times too fast unless it was built for that.
    """

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if kind == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return max(0.0, 1.0 - progress)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def accumulation_windows(batches, size: int):
    """Group micro-batches into windows of ``size``; the optimizer steps once per window.

    The last window of an epoch may be shorter: it is still yielded (and stepped), so no gradient is
    left behind to leak into the next epoch.
    """
    window = []
    for batch in batches:
        window.append(batch)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stopped before the optimizer applied it."""


def train_step(model, optimizer, scheduler, window: list[dict], accelerator, max_grad_norm: float) -> dict:
    """One optimizer step over an accumulation window of micro-batches.

    Loss normalisation, the part most loops get subtly wrong: the optimizer should see the gradient of
    the *mean loss over every sample in the window, across all processes*, exactly as if the window
    were one big batch. So each micro-batch contributes ``sum of its per-sample losses / N`` where N is
    the window's total sample count over all processes (a short last window gets its real N, not
    ``accumulation_steps * batch_size``). DDP then *averages* gradients over processes, so we multiply
    by the process count to turn that average back into the sum we want.

    Returns the window's true mean loss (all processes), its sample and real-token counts.
    """
    counts = torch.tensor([sum(len(b["labels"]) for b in window),
                           sum(int(b["attention_mask"].sum()) for b in window)], device=accelerator.device)
    window_samples, window_tokens = accelerator.reduce(counts, reduction="sum").tolist()
    scale = accelerator.num_processes / window_samples
    loss_sum = torch.zeros((), device=accelerator.device)
    for i, batch in enumerate(window):
        # Gradients are all-reduced between processes only on the window's last micro-batch.
        is_last = i == len(window) - 1
        with nullcontext() if is_last else accelerator.no_sync(model):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = F.cross_entropy(logits.float(), batch["labels"], reduction="sum")
            accelerator.backward(loss * scale)
        loss_sum += loss.detach()
    mean_loss = accelerator.reduce(loss_sum, reduction="sum").item() / window_samples
    if not math.isfinite(mean_loss):
        raise NonFiniteLossError(f"loss is {mean_loss}")  # before optimizer.step: the weights stay good
    if max_grad_norm > 0:
        accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": mean_loss, "samples": int(window_samples), "tokens": int(window_tokens)}


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------


class CheckpointError(RuntimeError):
    """A checkpoint cannot be resumed from; the message says why."""


@dataclass
class TrainState:
    """Everything besides tensors that a resumed run needs to carry on exactly where it stopped."""

    global_step: int = 0  # optimizer steps done (not micro-batches)
    epoch: int = 0  # epoch in progress
    batches_in_epoch: int = 0  # micro-batches of that epoch already consumed, per process
    best_metric: float | None = None
    evals_without_improvement: int = 0
    train_seconds: float = 0.0
    samples_seen: int = 0
    tokens_seen: int = 0
    history: list = field(default_factory=list)
    identity: dict = field(default_factory=dict)  # RESUME_IDENTITY settings of the run


def register_adapter_only_checkpointing(accelerator) -> None:
    """Make ``accelerator.save_state`` store the adapter, not the whole model.

    By default Accelerate writes the full state dict, frozen base weights included: hundreds of MB
    per checkpoint for nothing, since the base never changes. These hooks swap that for the
    adapter + head weights; optimizer, scheduler, scaler and per-process RNG states stay Accelerate's.
    """
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            adapter = get_peft_model_state_dict(accelerator.unwrap_model(models[0]))
            save_file({k: v.contiguous() for k, v in adapter.items()}, os.path.join(output_dir, "adapter.safetensors"))
        weights.clear()  # nothing left for Accelerate to save as model weights

    def load_hook(models, input_dir):
        model = models.pop()  # tells Accelerate we loaded this model ourselves
        result = set_peft_model_state_dict(accelerator.unwrap_model(model),
                                           load_file(os.path.join(input_dir, "adapter.safetensors")))
        if result.unexpected_keys:
            raise CheckpointError(f"adapter weights do not fit this model: {result.unexpected_keys[:3]}")

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def list_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first. Half-written ones live under a '.incomplete_' name."""
    if not checkpoint_dir.is_dir():
        return []
    return sorted(p for p in checkpoint_dir.glob("step_*") if p.is_dir())


def save_checkpoint(accelerator, checkpoint_dir: Path, state: TrainState, keep: int) -> Path:
    """Write a checkpoint atomically: into a temporary folder, then one rename.

    A crash mid-write leaves only a '.incomplete_*' folder, which ``list_checkpoints`` ignores, so a
    checkpoint that looks complete always is. Every process calls this (each saves its RNG state).
    """
    final = checkpoint_dir / f"step_{state.global_step:08d}"
    temporary = checkpoint_dir / f".incomplete_{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (temporary / "trainer_state.json").write_text(json.dumps(dataclasses.asdict(state)))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(temporary, final)
        for old in list_checkpoints(checkpoint_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: Path, identity: dict) -> TrainState:
    """Restore model adapter, optimizer, scheduler and RNG states; return the loop position."""
    state_file = path / "trainer_state.json"
    try:
        state = TrainState(**json.loads(state_file.read_text()))
    except (OSError, ValueError, TypeError) as err:
        raise CheckpointError(f"checkpoint '{path}' is damaged ({type(err).__name__}: {err})") from None
    changed = {k: (state.identity.get(k), v) for k, v in identity.items() if state.identity.get(k) != v}
    if changed:
        detail = ", ".join(f"{k}={old!r} there vs {new!r} now" for k, (old, new) in changed.items())
        raise ConfigError(f"checkpoint '{path}' comes from a different run ({detail}); resume with the same "
                          "settings, or start a fresh run in another --output_dir")
    try:
        accelerator.load_state(str(path))
    except Exception as err:
        raise CheckpointError(f"checkpoint '{path}' is damaged ({type(err).__name__}: {err})") from None
    return state


def resume(accelerator, cfg: TrainConfig, identity: dict) -> TrainState:
    """``--resume_from_checkpoint latest|PATH``; a damaged 'latest' falls back to the one before."""
    checkpoint_dir = Path(cfg.output_dir) / "checkpoints"
    if cfg.resume_from_checkpoint != "latest":
        path = Path(cfg.resume_from_checkpoint)
        if not (path / "trainer_state.json").is_file():
            raise ConfigError(f"'{path}' is not a checkpoint folder (no trainer_state.json); pass one of "
                              f"{[str(p) for p in list_checkpoints(checkpoint_dir)]} or 'latest'")
        return load_checkpoint(accelerator, path, identity)
    candidates = list_checkpoints(checkpoint_dir)
    if not candidates:
        accelerator.print(f"no checkpoint in {checkpoint_dir}: starting from scratch")
        return TrainState(identity=identity)
    for path in reversed(candidates):
        try:
            state = load_checkpoint(accelerator, path, identity)
            accelerator.print(f"resumed from {path} (optimizer step {state.global_step}, epoch {state.epoch})")
            return state
        except CheckpointError as err:
            accelerator.print(f"warning: {err}; trying the previous checkpoint")
    raise CheckpointError(f"every checkpoint in {checkpoint_dir} is damaged; start over with --overwrite")


# ----------------------------------------------------------------------------------------------
# Throughput helpers
# ----------------------------------------------------------------------------------------------

PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 125e12}


def peak_bf16_flops(device_name: str) -> float | None:
    """Dense bf16 peak of known GPUs, for model FLOPs utilisation (MFU); None when unknown."""
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in device_name), None)


def training_flops_per_token(total_params: int) -> float:
    """2N for the forward pass + 2N for the backward pass through activations. The usual 6N also
    counts 2N for weight gradients, which frozen base weights do not need."""
    return 4.0 * total_params


# ----------------------------------------------------------------------------------------------
# The job
# ----------------------------------------------------------------------------------------------


def build_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator
    from accelerate.utils import DynamoBackend

    precision = cfg.mixed_precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    if cfg.report_to == "tensorboard":
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise ConfigError("--report_to tensorboard needs the tensorboard package: pip install tensorboard") from None
    # Started by torchrun / `accelerate launch --multi_gpu` on a machine without CUDA, Accelerate only
    # forms a process group (gloo, MULTI_CPU) when told to run on the CPU; otherwise every process
    # would silently train alone.
    several_cpu_processes = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    return Accelerator(cpu=several_cpu_processes, mixed_precision=precision, log_with=cfg.report_to,
                       project_dir=cfg.output_dir,
                       dynamo_backend=DynamoBackend.INDUCTOR if cfg.compile else DynamoBackend.NO)


def load_data(cfg: TrainConfig) -> data.LabelledSplits:
    """The run's train and eval splits, cleaned and checked; what the data needed fixing is printed once."""
    from accelerate import PartialState

    splits = data.load_run_splits(dataclasses.asdict(cfg))
    for note in splits.notes:
        PartialState().print(f"note: {note}")
    return splits


def loader_options(cfg: TrainConfig, on_gpu: bool) -> dict:
    """DataLoader settings that only pay off on a GPU: widths rounded to multiples of 8 (tensor-core
    friendly shapes), worker processes that collate ahead, and pinned memory for faster copies."""
    return dict(pad_to_multiple_of=8 if on_gpu else None,
                num_workers=cfg.num_workers if cfg.num_workers is not None else (2 if on_gpu else 0),
                pin_memory=on_gpu)


def build_model(cfg: TrainConfig, label_names: list[str], pad_token_id: int):
    """Pretrained model + new classification head + LoRA adapter, as the run's settings ask;
    returns ``(model, head_modules)`` (the new modules, trained in full)."""
    model, head_modules = lora_setup.load_base_model(cfg.model, label_names, pad_token_id,
                                                     load_in_4bit=cfg.load_in_4bit)
    lora_config = lora_setup.build_lora_config(
        model, head_modules, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
        target_modules=cfg.target_modules, modules_to_save=cfg.modules_to_save, bias=cfg.lora_bias,
        use_dora=cfg.use_dora, use_rslora=cfg.use_rslora)
    return lora_setup.apply_lora(model, lora_config), head_modules


quiet_libraries = data.quiet_libraries  # shared with eval.py: no library noise on any entry point


def train(cfg: TrainConfig) -> dict:
    """Run the whole job; returns the metrics also written to OUTPUT_DIR/metrics.json."""
    from accelerate.utils import set_seed
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    from tqdm.auto import tqdm

    quiet_libraries()
    accelerator = build_accelerator(cfg)
    log = accelerator.print  # prints on the main process only
    set_seed(cfg.seed)
    output_dir = Path(cfg.output_dir)
    identity = {k: getattr(cfg, k) for k in RESUME_IDENTITY}
    check_output_dir(cfg)  # on every process, so all of them stop together on a refusal
    on_gpu = accelerator.device.type == "cuda"

    # 2. Data -----------------------------------------------------------------------------------
    tokenizer = lora_setup.load_tokenizer(cfg.model)
    splits = load_data(cfg)
    label_names = splits.label_names
    log(f"data: {len(splits.train)} train / {len(splits.eval)} eval rows, labels {label_names}")
    options = loader_options(cfg, on_gpu)
    train_loader = data.build_dataloader(
        data.tokenize(splits.train, tokenizer, cfg.max_length), tokenizer.pad_token_id, cfg.batch_size,
        train=True, group_by_length=cfg.group_by_length, seed=cfg.seed, **options)
    eval_loader = data.build_dataloader(
        data.tokenize(splits.eval, tokenizer, cfg.max_length), tokenizer.pad_token_id, cfg.eval_batch_size,
        train=False, **options)

    # 3. Model + LoRA ---------------------------------------------------------------------------
    model, head_modules = build_model(cfg, label_names, tokenizer.pad_token_id)
    if cfg.fast_dropout:  # a third of a CPU training step went to drawing dropout masks (lora_setup.py)
        lora_setup.use_fast_dropout(model, accelerator.device)
    trainable, total = lora_setup.count_parameters(model)
    log(f"model: {cfg.model}; new modules trained in full: {head_modules}; trainable parameters "
        f"{trainable:,} of {total:,} ({100 * trainable / total:.2f} %)")

    # Data and model are valid: only now claim the output dir, so a failed start leaves nothing there.
    accelerator.wait_for_everyone()  # every process has checked the dir before anyone writes to it
    if accelerator.is_main_process:
        if cfg.overwrite and output_dir.exists():
            shutil.rmtree(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "run_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    accelerator.wait_for_everyone()

    optimizer = build_optimizer(model, cfg.learning_rate, cfg.weight_decay, fused=on_gpu)
    model, optimizer, train_loader, eval_loader = accelerator.prepare(model, optimizer, train_loader, eval_loader)
    # After prepare, len(train_loader) is the number of micro-batches *this process* sees per epoch.
    steps_per_epoch = math.ceil(len(train_loader) / cfg.gradient_accumulation_steps)
    total_steps = cfg.max_steps or steps_per_epoch * cfg.num_epochs
    num_epochs = math.ceil(total_steps / steps_per_epoch)
    warmup_steps = math.ceil(cfg.warmup_ratio * total_steps)
    scheduler = build_scheduler(optimizer, cfg.lr_scheduler, warmup_steps, total_steps)
    accelerator.register_for_checkpointing(scheduler)
    register_adapter_only_checkpointing(accelerator)
    if cfg.report_to:
        accelerator.init_trackers("lora-text-classification",
                                  config={k: v for k, v in dataclasses.asdict(cfg).items() if v is not None and not isinstance(v, list)})

    # 4. Baseline -------------------------------------------------------------------------------
    baseline = evaluation.evaluate(model, eval_loader, accelerator, label_names)
    log(f"baseline (before training): accuracy {baseline['accuracy']:.4f}, f1 {baseline['f1']:.4f}")

    # 5. The loop -------------------------------------------------------------------------------
    state = resume(accelerator, cfg, identity) if cfg.resume_from_checkpoint else TrainState(identity=identity)
    checkpoint_dir, best_dir = output_dir / "checkpoints", output_dir / "best_adapter"
    log(f"training: {total_steps} optimizer steps ({num_epochs} epoch(s) of {steps_per_epoch}), "
        f"{cfg.batch_size} x {cfg.gradient_accumulation_steps} accumulation x {accelerator.num_processes} "
        f"process(es) per step, warmup {warmup_steps}, precision {accelerator.mixed_precision}")
    peak_flops = peak_bf16_flops(torch.cuda.get_device_name()) if on_gpu else None
    progress = tqdm(total=total_steps, initial=state.global_step, disable=not accelerator.is_local_main_process)
    logged = {"loss": 0.0, "steps": 0, "samples": 0, "tokens": 0, "seconds": 0.0}
    model.train()
    stop = False

    last_eval = {"step": -1, "metrics": None}

    def run_evaluation() -> None:
        """Evaluate, keep the best adapter, count patience (every process runs this)."""
        nonlocal stop
        metrics = evaluation.evaluate(model, eval_loader, accelerator, label_names)
        last_eval.update(step=state.global_step, metrics=metrics)
        scalars = {f"eval/{k}": v for k, v in metrics.items() if isinstance(v, float)}
        state.history.append({"step": state.global_step, "epoch": state.epoch, **scalars})
        accelerator.log(scalars, step=state.global_step)
        score = metrics[cfg.metric_for_best]
        if state.best_metric is None or score > state.best_metric:
            state.best_metric, state.evals_without_improvement = score, 0
            if accelerator.is_main_process:
                lora_setup.save_adapter(accelerator.unwrap_model(model), tokenizer, best_dir)
        else:
            state.evals_without_improvement += 1
        log(f"eval at step {state.global_step}: {cfg.metric_for_best} {score:.4f} "
            f"(best {state.best_metric:.4f}), loss {metrics['loss']:.4f}")
        if cfg.early_stopping_patience and state.evals_without_improvement >= cfg.early_stopping_patience:
            log(f"early stopping: no improvement in {cfg.early_stopping_patience} evaluation(s)")
            stop = True

    while state.global_step < total_steps and not stop:
        train_loader.set_epoch(state.epoch)  # the sampler's shuffle depends on seed + epoch only
        batches = train_loader
        if state.batches_in_epoch:  # resuming mid-epoch: skip what this epoch already trained on, once
            batches = accelerator.skip_first_batches(train_loader, state.batches_in_epoch)
        for window in accumulation_windows(batches, cfg.gradient_accumulation_steps):
            started = time.perf_counter()
            try:
                stats = train_step(model, optimizer, scheduler, window, accelerator, cfg.max_grad_norm)
            except NonFiniteLossError as err:
                raise NonFiniteLossError(
                    f"{err} at optimizer step {state.global_step + 1} (epoch {state.epoch + 1}); nothing from "
                    "this step was applied or saved. Lower --learning_rate, keep --max_grad_norm on, or try "
                    "--mixed_precision no; the last checkpoint is intact") from None
            elapsed = time.perf_counter() - started
            state.global_step += 1
            state.batches_in_epoch += len(window)
            state.train_seconds += elapsed
            state.samples_seen += stats["samples"]
            state.tokens_seen += stats["tokens"]
            for key in ("loss", "samples", "tokens"):
                logged[key] += stats[key]
            logged["steps"] += 1
            logged["seconds"] += elapsed
            progress.update(1)

            if state.global_step % cfg.log_every == 0 or state.global_step == total_steps:
                record = {"train/loss": logged["loss"] / logged["steps"], "train/lr": scheduler.get_last_lr()[0],
                          "train/samples_per_s": logged["samples"] / logged["seconds"],
                          "train/tokens_per_s": logged["tokens"] / logged["seconds"]}
                if on_gpu:
                    record["train/peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
                    if peak_flops:
                        record["train/mfu"] = (record["train/tokens_per_s"] * training_flops_per_token(total)
                                               / (peak_flops * accelerator.num_processes))
                accelerator.log(record, step=state.global_step)
                progress.set_postfix(loss=f"{record['train/loss']:.4f}", lr=f"{record['train/lr']:.2e}",
                                     samples_s=f"{record['train/samples_per_s']:.1f}")
                state.history.append({"step": state.global_step, "epoch": state.epoch, **record})
                logged = dict.fromkeys(logged, 0)
            if cfg.eval_every and state.global_step % cfg.eval_every == 0:
                run_evaluation()
            if cfg.checkpoint_every and state.global_step % cfg.checkpoint_every == 0:
                save_checkpoint(accelerator, checkpoint_dir, state, cfg.keep_checkpoints)
            if state.global_step >= total_steps or stop:
                break
        if state.batches_in_epoch >= len(train_loader):  # the epoch ran to its end
            state.epoch, state.batches_in_epoch = state.epoch + 1, 0
            if not cfg.eval_every:
                run_evaluation()
            save_checkpoint(accelerator, checkpoint_dir, state, cfg.keep_checkpoints)
    progress.close()
    if last_eval["step"] != state.global_step and not stop:
        run_evaluation()  # the last steps must compete for "best" too

    # 6. Results --------------------------------------------------------------------------------
    # Keep the best evaluation's weights, not merely the last ones.
    if last_eval["step"] == state.global_step and state.evals_without_improvement == 0:
        final = last_eval["metrics"]  # the last evaluation was the best: no need to run it again
    else:
        accelerator.wait_for_everyone()
        set_peft_model_state_dict(accelerator.unwrap_model(model), load_file(best_dir / "adapter_model.safetensors"))
        final = evaluation.evaluate(model, eval_loader, accelerator, label_names)
    results = {
        "baseline": baseline, "final": final, "label_names": label_names, "history": state.history,
        "trainable_parameters": trainable, "total_parameters": total, "trainable_share": trainable / total,
        "optimizer_steps": state.global_step, "train_seconds": state.train_seconds,
        "train_samples_per_s": state.samples_seen / max(state.train_seconds, 1e-9),
        "train_tokens_per_s": state.tokens_seen / max(state.train_seconds, 1e-9),
        "num_processes": accelerator.num_processes, "mixed_precision": accelerator.mixed_precision,
        "config": dataclasses.asdict(cfg),
    }
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        lora_setup.save_adapter(unwrapped, tokenizer, output_dir)
        (output_dir / "metrics.json").write_text(json.dumps(results, indent=2))
        evaluation.save_plots(output_dir, results)  # first: the report links the PNGs it finds
        evaluation.write_report(output_dir, results)
        if cfg.merge:
            # A 4-bit base would round the merged weights to 4 bits: merge on the full-precision base.
            to_merge = lora_setup.load_adapter(output_dir)[0] if cfg.load_in_4bit else unwrapped
            lora_setup.merge_and_save(to_merge, tokenizer, output_dir / "merged")
    log("\n" + evaluation.format_comparison(baseline, final, label_names))
    log(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f} %); "
        f"training {state.train_seconds:.0f} s, {results['train_samples_per_s']:.1f} samples/s; "
        f"adapter and report.md saved to {output_dir}")
    accelerator.end_training()
    return results


def main(argv: list[str] | None = None) -> int:
    try:
        train(parse_config(argv))
    except (ConfigError, data.DataError, lora_setup.ModelSetupError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
