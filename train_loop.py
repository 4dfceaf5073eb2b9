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
CPU dropout masks drawn cheaper (``performance.FastDropout``: a third of a CPU step was spent there).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import typing
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator, PartialState
from accelerate.utils import DataLoaderConfiguration, DistributedType, DynamoBackend, ProjectConfiguration, set_seed
from tqdm.auto import tqdm

import checkpointing
import data
import eval as evaluation
import lora_setup
import metering
import performance
import reporting
import run_dir
from checkpointing import CheckpointError, TrainState


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
    label_column: str = _opt("label", "column holding the label (ints 0..K-1 or class-name strings; lists of tags "
                             "for several labels per text)")
    label_separator: typing.Optional[str] = _opt(None, "several labels per text: the separator joining a row's tags "
                                                 "in a text column, e.g. '|' for pos|funny (a column of lists needs none)")
    num_labels: typing.Optional[int] = _opt(None, "number of classes (default: read from the data)")
    eval_size: typing.Optional[float] = _opt(None, "held-out rows carved from train when the source has no eval "
                                             "split (a count, or a fraction if < 1; default: 1,000 rows or 20 %, "
                                             "whichever is smaller); stratified and seeded")
    max_train_samples: typing.Optional[int] = _opt(None, "subsample the train split to this many rows")
    max_eval_samples: typing.Optional[int] = _opt(None, "subsample the eval split to this many rows")
    drop_empty_texts: bool = _opt(False, "drop rows whose text is empty instead of stopping with an error")
    max_length: int = _opt(128, "truncate texts to this many tokens")
    output_dir: str = _opt("outputs/run", "where the adapter, metrics.json and checkpoints go")
    overwrite: bool = _opt(False, "replace an output dir that already holds a run")
    seed: int = _opt(42, "seed for the split, data order, head init and dropout")
    truncation: str = _opt("head", "which tokens of a text longer than --max_length are kept: head | tail | "
                           "head+tail (the first quarter and last three quarters of the budget, after Sun et al. 2019)")
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
    fast_dropout: bool = _opt(True, "on CPU, draw dropout masks from 16 random bits (cheaper, same p; "
                                    "performance.FastDropout)")
    class_weights: str = _opt("none", "weight each class in the training loss: none | auto (inverse class "
                              "frequency of the train split, averaging 1 over its rows) | w1,w2,... one per class "
                              "(eval loss stays unweighted)")
    # Evaluation, logging, checkpoints
    eval_batch_size: int = _opt(128, "batch size for evaluation")
    eval_every: int = _opt(0, "evaluate every N optimizer steps (0 = at each epoch end)")
    log_every: int = _opt(20, "log loss, LR and throughput every N optimizer steps")
    checkpoint_every: int = _opt(0, "checkpoint every N optimizer steps, besides each epoch end (0 = epoch ends)")
    keep_checkpoints: int = _opt(2, "keep the newest K checkpoints")
    resume_from_checkpoint: typing.Optional[str] = _opt(None, "latest, or a checkpoint folder")
    metric_for_best: str = _opt("accuracy", "eval metric that picks the best adapter (loss and hamming_loss: lower "
                                "is better, every other metric: higher); multi-label runs read accuracy as f1_micro")
    greater_is_better: typing.Optional[bool] = _opt(None, "override the direction of --metric_for_best")
    early_stopping_patience: int = _opt(0, "stop after N evaluations without improvement (0 = off)")
    report_to: typing.Optional[str] = _opt(None, "experiment tracker: tensorboard, wandb, ... or all")
    merge: bool = _opt(False, "also export a merged model (plain transformers) to OUTPUT_DIR/merged")
    tune_thresholds: bool = _opt(False, "multi-label: pick each label's F1-best threshold on the eval split after "
                                 "training (default 0.5 each); saved to OUTPUT_DIR/thresholds.json")


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
        (cfg.eval_size is None or cfg.eval_size > 0, f"--eval_size must be > 0 (got {cfg.eval_size})"),
        (cfg.eval_size is None or cfg.eval_size < 1 or float(cfg.eval_size).is_integer(),
         f"--eval_size must be a whole number of rows, or a fraction below 1 (got {cfg.eval_size})"),
        (cfg.eval_every >= 0 and cfg.checkpoint_every >= 0 and cfg.early_stopping_patience >= 0,
         "--eval_every, --checkpoint_every and --early_stopping_patience must be >= 0"),
        (cfg.lr_scheduler in ("linear", "cosine", "constant"),
         f"--lr_scheduler must be linear, cosine or constant (got {cfg.lr_scheduler!r})"),
        (cfg.mixed_precision in ("auto", "no", "bf16", "fp16"),
         f"--mixed_precision must be auto, no, bf16 or fp16 (got {cfg.mixed_precision!r})"),
        (cfg.lora_bias in ("none", "all", "lora_only"), "--lora_bias must be none, all or lora_only"),
        (cfg.metric_for_best in evaluation.REPORT_METRICS + evaluation.MULTI_LABEL_METRICS,  # checked now, not after
         f"--metric_for_best must be one of {', '.join(evaluation.REPORT_METRICS)} (single-label) or "  # an epoch
         f"{', '.join(evaluation.MULTI_LABEL_METRICS)} (multi-label) (got {cfg.metric_for_best!r})"),
        (cfg.truncation in data.TRUNCATION_SIDES,
         f"--truncation must be one of {', '.join(data.TRUNCATION_SIDES)} (got {cfg.truncation!r})"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    from accelerate.utils import LoggerType

    trackers = [t.value for t in LoggerType]  # "all" is one of them
    if cfg.report_to is not None and cfg.report_to not in trackers:
        raise ConfigError(f"--report_to must be one of {', '.join(trackers)} (got {cfg.report_to!r})")

    if cfg.class_weights not in ("auto", "none"):
        try:
            data.parse_class_weights(cfg.class_weights)  # the count is checked once the data is loaded
        except data.DataError as err:
            raise ConfigError(str(err)) from None


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




# Settings a user may change when resuming: where and how often things are written or logged, and the
# two a user lowers after a NaN (the NaN message advises it). Every other setting changes which rows a
# run sees, their order or what is trained, so it must match the checkpoint. Listing what MAY change
# (not what must match) means a new setting is covered by default.
RESUME_MAY_CHANGE = ("output_dir", "overwrite", "resume_from_checkpoint", "log_every", "eval_every", "checkpoint_every",
                     "keep_checkpoints", "report_to", "eval_batch_size", "num_workers", "merge", "learning_rate",
                     "max_grad_norm")


def fixed_settings(cfg: TrainConfig) -> dict:
    """Every setting but those a resumed run may change (RESUME_MAY_CHANGE)."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RESUME_MAY_CHANGE}


def resume_identity(cfg: TrainConfig, num_processes: int = 1) -> dict:
    """The settings a checkpoint must share with the run resuming it. The per-process batch size is
    replaced by the global batch: the batches depend on it alone (data.LengthGroupedSampler), so a
    run may resume on another number of processes as long as the global batch stays the same."""
    identity = fixed_settings(cfg)
    identity["global_batch_size"] = identity.pop("batch_size") * num_processes
    return identity


def check_resume_identity(cfg: TrainConfig, saved: dict, path: Path, num_processes: int = 1) -> None:
    """Refuse a checkpoint whose run had other settings, naming each difference."""
    now = resume_identity(cfg, num_processes)
    # A setting added after the checkpoint was written had its default value there.
    saved = {**resume_identity(TrainConfig(), num_processes), **saved}
    changed = {k: (saved.get(k), now.get(k)) for k in sorted(set(now) | set(saved)) if saved.get(k) != now.get(k)}
    if not changed:
        return
    detail = ", ".join(f"{k}={old!r} there vs {new!r} now" for k, (old, new) in changed.items())
    hint = "resume with the same settings"
    saved_global = saved.get("global_batch_size")
    if "global_batch_size" in changed and isinstance(saved_global, int):
        hint = (f"resume with --batch_size {saved_global // num_processes} on {num_processes} process(es)"
                if saved_global % num_processes == 0 else
                f"resume on a number of processes that divides the global batch of {saved_global}")
    raise ConfigError(f"checkpoint '{path}' comes from a run with other settings ({detail}); {hint}, or start a "
                      "fresh run in another --output_dir")


def describe_previous_run(cfg: TrainConfig, path: Path) -> str:
    """' (with lora_r=4 there vs 8 now)' for the run already in an output dir, or ' (the same settings)'."""
    try:
        previous = json.loads((path / "run_config.json").read_text())
    except (OSError, ValueError):
        return ""
    now = fixed_settings(cfg)
    changed = [f"{k}={previous.get(k)!r} there vs {v!r} now" for k, v in now.items() if previous.get(k) != v]
    return f" (with {', '.join(changed)})" if changed else " (with the same settings)"


# --metric_for_best picks the best adapter; for these metrics lower is better, for all others higher.
LOWER_IS_BETTER = ("loss", "hamming_loss")


def greater_is_better(cfg: TrainConfig, metric: str) -> bool:
    if cfg.greater_is_better is not None:
        return cfg.greater_is_better
    return metric not in LOWER_IS_BETTER


def metric_for_best(cfg: TrainConfig, multi_label: bool) -> str:
    """The eval metric that picks the best adapter. Multi-label runs have no plain accuracy (subset accuracy
    is all-or-nothing per text and moves little): the default ``accuracy`` means ``f1_micro`` there."""
    names = evaluation.MULTI_LABEL_METRICS if multi_label else evaluation.REPORT_METRICS
    metric = "f1_micro" if multi_label and cfg.metric_for_best == "accuracy" else cfg.metric_for_best
    if metric not in names:
        kind = "multi-label" if multi_label else "single-label"
        raise ConfigError(f"--metric_for_best {cfg.metric_for_best} is not a {kind} metric; this data is {kind}, "
                          f"choose one of {', '.join(names)}")
    return metric


# ----------------------------------------------------------------------------------------------
# 2. Setup: accelerator, data, model, optimizer, schedule -- everything the loop needs
# ----------------------------------------------------------------------------------------------


def build_accelerator(cfg: TrainConfig) -> Accelerator:
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
    accelerator = Accelerator(
        cpu=several_cpu_processes, mixed_precision=precision, log_with=cfg.report_to,
        project_config=ProjectConfiguration(project_dir=cfg.output_dir, logging_dir=str(Path(cfg.output_dir) / "logs")),
        # Batches come from pinned memory on a GPU: copy them without making the CPU wait for the copy.
        dataloader_config=DataLoaderConfiguration(non_blocking=torch.cuda.is_available()),
        dynamo_backend=DynamoBackend.INDUCTOR if cfg.compile else DynamoBackend.NO)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        check_deepspeed_settings(cfg, accelerator)
    return accelerator


def check_deepspeed_settings(cfg: TrainConfig, accelerator: Accelerator) -> None:
    """DeepSpeed clips inside its engine: hand it our clipping, refuse a config that says otherwise. (Its
    stepping is handled in ``train_step``, its checkpoints in ``checkpointing``.)"""
    ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
    clipping = ds_config.get("gradient_clipping", "auto")
    if clipping in ("auto", None):  # left to us: otherwise Accelerate would fill in 1.0, whatever --max_grad_norm says
        ds_config["gradient_clipping"] = cfg.max_grad_norm
    elif float(clipping) != cfg.max_grad_norm:
        raise ConfigError(f"the DeepSpeed config clips gradients at {clipping} but --max_grad_norm is "
                          f"{cfg.max_grad_norm}; make them agree, or set gradient_clipping to 'auto' in the DeepSpeed "
                          "config so that --max_grad_norm is used")


def shard_blocks_not_embeddings(accelerator: Accelerator, model) -> None:
    """FSDP2 shards each transformer block of the model's ``_no_split_modules`` (BERT: ``BertLayer`` and
    ``BertEmbeddings``), then Accelerate 1.15 shards the input embeddings on their own, which fails when
    their parent block is already sharded. Unless the config names the blocks, leave that parent out."""
    plugin = accelerator.state.fsdp_plugin
    if plugin.transformer_cls_names_to_wrap is not None:
        return
    embeddings = model.get_input_embeddings()
    holders = {type(m).__name__ for m in model.modules() if any(sub is embeddings for sub in m.modules())}
    plugin.transformer_cls_names_to_wrap = sorted(set(model._no_split_modules or []) - holders)


def load_data(cfg: TrainConfig) -> data.LabelledSplits:
    """The run's train and eval splits, cleaned and checked (the same function eval.py re-scores with);
    what the data needed fixing is printed once."""
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


def build_model(cfg: TrainConfig, label_names: list[str], pad_token_id: int, multi_label: bool = False):
    """Pretrained model + new classification head + LoRA adapter, as the run's settings ask;
    returns ``(model, head_modules)`` (the new modules, trained in full)."""
    model, head_modules = lora_setup.load_base_model(cfg.model, label_names, pad_token_id,
                                                     load_in_4bit=cfg.load_in_4bit, multi_label=multi_label)
    lora_config = lora_setup.build_lora_config(
        model, head_modules, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
        target_modules=cfg.target_modules, modules_to_save=cfg.modules_to_save, bias=cfg.lora_bias,
        use_dora=cfg.use_dora, use_rslora=cfg.use_rslora)
    return lora_setup.apply_lora(model, lora_config), head_modules


quiet_libraries = data.quiet_libraries  # shared with eval.py: no library noise on any entry point


CHECKPOINTS = "checkpoints"  # the output dir's folder of checkpoints (setup looks there before Run exists)


@dataclass
class Run:
    """Everything the loop works with, built once by ``setup``."""

    cfg: TrainConfig
    accelerator: Accelerator
    output: run_dir.RunDir
    tokenizer: typing.Any
    label_names: list[str]
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    train_loader: torch.utils.data.DataLoader
    eval_loader: torch.utils.data.DataLoader
    steps_per_epoch: int
    total_steps: int
    trainable_parameters: int
    total_parameters: int
    resume_from: Path | None = None  # the checkpoint to continue from, already checked
    class_weights: torch.Tensor | None = None  # per-class loss weights on the device (--class_weights)
    multi_label: bool = False  # several labels per text (decided by the data): sigmoid + BCE, thresholds
    metric_for_best: str = "accuracy"  # --metric_for_best as it applies to this data (see metric_for_best())

    @property
    def checkpoint_dir(self) -> Path:
        return self.output.path / CHECKPOINTS

    @property
    def best_dir(self) -> Path:
        return self.output.path / "best_adapter"


def label_settings(cfg: TrainConfig, splits: data.LabelledSplits, accelerator: Accelerator) -> tuple[str, list | None]:
    """What the kind of labels decides (one per text, or several): the metric that picks the best adapter
    and the class weights; settings that do not fit the data's kind are refused."""
    if splits.multi_label and cfg.class_weights != "none":
        raise ConfigError("--class_weights applies to single-label data; this data has several labels per text: "
                          "drop --class_weights")
    if cfg.tune_thresholds and not splits.multi_label:
        raise ConfigError("--tune_thresholds applies to multi-label data (lists of tags, or --label_separator); "
                          "drop it for single-label data")
    best_metric = metric_for_best(cfg, splits.multi_label)
    if splits.multi_label:
        accelerator.print(f"multi-label: {splits.num_labels} tags, sigmoid + binary cross-entropy; best adapter "
                          f"by {best_metric}")
    weights = data.class_weights(cfg.class_weights, splits.train["label"], splits.num_labels)
    if weights is not None:
        accelerator.print("class weights in the loss: " + ", ".join(
            f"{name} {w:.3f}" for name, w in zip(splits.label_names, weights)))
    return best_metric, weights


def setup(cfg: TrainConfig, claim_output_dir: bool = True, splits: data.LabelledSplits | None = None) -> Run:
    """Accelerator, data, model + LoRA, optimizer and schedule, in that order. Everything that can be
    refused is checked before the output dir is touched. The bench passes ``claim_output_dir=False``
    (write nothing) and the ``splits`` it loaded once for all its runs."""
    quiet_libraries()
    accelerator = build_accelerator(cfg)
    set_seed(cfg.seed)  # the head's initial weights, the dropout masks
    output = run_dir.RunDir(cfg.output_dir)
    if claim_output_dir:  # every process checks, so all of them stop together on a refusal
        output.check(overwrite=cfg.overwrite, resuming=bool(cfg.resume_from_checkpoint),
                     inputs=[cfg.dataset, cfg.eval_file, cfg.model, cfg.resume_from_checkpoint],
                     describe_run=lambda path: describe_previous_run(cfg, path))
    resume_from = None
    if cfg.resume_from_checkpoint:  # read-only: a refused resume leaves the output dir as it was
        resume_from = checkpointing.choose(cfg.resume_from_checkpoint, output.path / CHECKPOINTS,
                                           lambda saved, path: check_resume_identity(cfg, saved, path,
                                                                                     accelerator.num_processes),
                                           accelerator.print)
    on_gpu = accelerator.device.type == "cuda"

    tokenizer = lora_setup.load_tokenizer(cfg.model)
    splits = splits if splits is not None else load_data(cfg)
    accelerator.print(f"data: {len(splits.train)} train / {len(splits.eval)} eval rows, labels {splits.label_names}")
    options = loader_options(cfg, on_gpu)
    train_loader = data.build_dataloader(
        data.tokenize(splits.train, tokenizer, cfg.max_length, cfg.truncation), tokenizer.pad_token_id,
        cfg.batch_size, train=True, group_by_length=cfg.group_by_length, seed=cfg.seed,
        num_processes=accelerator.num_processes, **options)
    eval_loader = data.build_dataloader(
        data.tokenize(splits.eval, tokenizer, cfg.max_length, cfg.truncation), tokenizer.pad_token_id,
        cfg.eval_batch_size, train=False, **options)
    best_metric, weights = label_settings(cfg, splits, accelerator)

    model, head_modules = build_model(cfg, splits.label_names, tokenizer.pad_token_id, splits.multi_label)
    if cfg.fast_dropout:  # on CPU, PyTorch's dropout masks were a third of a training step (performance.py)
        performance.use_fast_dropout(model, accelerator.device)
    trainable, total = lora_setup.count_parameters(model)
    accelerator.print(f"model: {cfg.model}; new modules trained in full: {head_modules}; trainable parameters "
                      f"{trainable:,} of {total:,} ({100 * trainable / total:.2f} %)")

    # Data and model are valid: only now claim the output dir, so a failed start leaves nothing there.
    if claim_output_dir:
        accelerator.wait_for_everyone()  # every process has checked the dir before anyone writes to it
        if accelerator.is_main_process:
            output.claim(overwrite=cfg.overwrite)
            output.write_text("run_config.json", json.dumps(dataclasses.asdict(cfg), indent=2))  # this run's settings
        accelerator.wait_for_everyone()

    optimizer = build_optimizer(model, cfg.learning_rate, cfg.weight_decay, fused=on_gpu)
    if accelerator.distributed_type == DistributedType.FSDP:
        shard_blocks_not_embeddings(accelerator, model)
    model, optimizer, train_loader, eval_loader = accelerator.prepare(model, optimizer, train_loader, eval_loader)
    # After prepare, len(train_loader) is the number of micro-batches *this process* sees per epoch.
    steps_per_epoch = math.ceil(len(train_loader) / cfg.gradient_accumulation_steps)
    total_steps = cfg.max_steps or steps_per_epoch * cfg.num_epochs
    scheduler = build_scheduler(optimizer, cfg.lr_scheduler, math.ceil(cfg.warmup_ratio * total_steps), total_steps)
    if cfg.report_to:
        accelerator.init_trackers("lora-text-classification", config={
            k: v for k, v in dataclasses.asdict(cfg).items() if v is not None and not isinstance(v, list)})
    return Run(cfg, accelerator, output, tokenizer, splits.label_names, model, optimizer, scheduler, train_loader,
               eval_loader, steps_per_epoch, total_steps, trainable, total, resume_from,
               None if weights is None else torch.tensor(weights, device=accelerator.device), splits.multi_label,
               best_metric)


# ----------------------------------------------------------------------------------------------
# 3. The steps: optimizer, schedule, one training step
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


def train_step(model, optimizer, scheduler, window: list[dict], accelerator, max_grad_norm: float,
               class_weights: torch.Tensor | None = None) -> dict:
    """One optimizer step over an accumulation window of micro-batches.

    Loss normalisation, the part most loops get subtly wrong: the optimizer should see the gradient of
    the *mean loss over every sample in the window, across all processes*, exactly as if the window
    were one big batch. So each micro-batch contributes ``sum of its per-sample losses / N`` where N is
    the window's total sample count over all processes (a short last window gets its real N, not
    ``accumulation_steps * batch_size``). DDP then *averages* gradients over processes, so we multiply
    by the process count to turn that average back into the sum we want.

    With ``class_weights`` (one per class) sample i counts ``w[y_i]`` times: the loss is the weighted mean
    ``sum(w_i * loss_i) / sum(w_i)`` over the whole window and all processes, so N above becomes the
    window's total weight. (Dividing by the sample count instead would rescale the step by the window's
    mix of classes, which differs from window to window.) Without weights every w_i is 1: the plain mean.

    Multi-label (float multi-hot labels, batch x K): the per-row loss is the binary cross-entropy with
    logits *averaged over the K labels* (so the logged loss is the one transformers computes for
    ``problem_type="multi_label_classification"``, and its scale does not grow with K), and rows are then
    summed and divided by N exactly as above. Class weights do not apply (refused in ``setup``).

    The NaN guard runs before the last micro-batch's backward: under DeepSpeed that backward is where
    the engine clips and steps, so checking later would be too late for the weights.

    Returns the window's true mean loss, sample count and real-token count, all processes together (the
    counts stay device tensors, read only when logging): nothing here waits for the GPU except the one
    NaN check.
    """
    # Rows labelled IGNORED_LABEL are padding that keeps a process busy when a global batch has fewer rows
    # than processes (data.GlobalBatchSampler): cross-entropy ignores them, and so must the counts.
    real_rows = [data.real_rows(b["labels"]) for b in window]
    row_weights = [r.float() if class_weights is None else class_weights[b["labels"].clamp(min=0)] * r
                   for b, r in zip(window, real_rows)]
    local = torch.stack([sum(w.sum() for w in row_weights), sum(r.sum() for r in real_rows).float(),
                         sum((b["attention_mask"].sum(1) * r).sum() for b, r in zip(window, real_rows)).float()])
    window_weight, window_samples, window_tokens = accelerator.reduce(local, reduction="sum")  # on the device
    # The sample count when unweighted. A window made only of zero-weight classes (--class_weights 0,1) has
    # nothing to learn: the clamp makes its loss and step 0 instead of 0/0 = NaN.
    window_weight = window_weight.clamp(min=1e-12)
    scale = accelerator.num_processes / window_weight
    loss_sum = torch.zeros((), device=accelerator.device)
    for i, batch in enumerate(window):
        is_last = i == len(window) - 1
        # Gradients are all-reduced between processes only on the window's last micro-batch; DeepSpeed's
        # engine, which steps inside backward, is told the same through Accelerate's sync flag.
        accelerator.gradient_state._set_sync_gradients(is_last)
        with nullcontext() if is_last else accelerator.no_sync(model):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            # reduction="sum" with weight= gives sum(w_i * loss_i), NOT normalised: we divide by the window's weight.
            loss = (multi_label_loss(logits, batch["labels"], real_rows[i]) if batch["labels"].ndim == 2 else
                    F.cross_entropy(logits.float(), batch["labels"], weight=class_weights, reduction="sum"))
            loss_sum += loss.detach()
            if is_last:
                mean_loss = (accelerator.reduce(loss_sum, reduction="sum") / window_weight).item()  # the one sync
                if not math.isfinite(mean_loss):
                    raise NonFiniteLossError(f"loss is {mean_loss}")  # nothing applied: the weights stay good
            accelerator.backward(loss * scale * engine_loss_divisor(accelerator))
    if max_grad_norm > 0:
        accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)  # under DeepSpeed the engine clipped
    optimizer.step()
    if not accelerator.optimizer_step_was_skipped:  # fp16: the grad scaler skips a step with inf gradients,
        scheduler.step()  # and the schedule counts optimizer steps taken
    optimizer.zero_grad(set_to_none=True)
    return {"loss": mean_loss, "samples": window_samples, "tokens": window_tokens}


def multi_label_loss(logits: torch.Tensor, labels: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Sum over the real rows of each row's binary cross-entropy with logits, averaged over its labels."""
    per_row = F.binary_cross_entropy_with_logits(logits.float(), labels.clamp(min=0), reduction="none").mean(-1)
    return torch.where(real, per_row, 0.0).sum()


def engine_loss_divisor(accelerator) -> int:
    """DeepSpeed divides every loss by the accumulation steps of its config; our loss is already
    normalised exactly, so we multiply that division away (1 everywhere else)."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return 1
    return int(accelerator.deepspeed_config.get("gradient_accumulation_steps", 1))


# ----------------------------------------------------------------------------------------------
# 4. The loop
# ----------------------------------------------------------------------------------------------


def evaluate_and_keep(run: Run, state: TrainState, keeper: checkpointing.BestAdapter) -> dict:
    """Evaluate (every process), log, and keep the adapter if it is the best so far."""
    metrics = evaluation.evaluate(run.model, run.eval_loader, run.accelerator, run.label_names, run.multi_label)
    scalars = {f"eval/{k}": v for k, v in metrics.items() if isinstance(v, float)}
    state.history.append({"step": state.global_step, "epoch": state.epoch, **scalars})
    run.accelerator.log(scalars, step=state.global_step)
    keeper.update(run, state, metrics)
    return metrics


def save_checkpoint(run: Run, state: TrainState) -> None:
    checkpointing.save_checkpoint(run.accelerator, run.model, run.optimizer, run.scheduler, state, run.checkpoint_dir,
                                  run.cfg.keep_checkpoints, run.best_dir, on_written=run.output.checkpoints_written)


def log_progress(run: Run, state: TrainState, meter: metering.ThroughputMeter, progress) -> None:
    record, interval = meter.record(run.scheduler.get_last_lr()[0])
    state.train_seconds += interval["seconds"]
    state.samples_seen += interval["samples"]
    state.tokens_seen += interval["tokens"]
    run.accelerator.log(record, step=state.global_step)
    progress.set_postfix(loss=f"{record['train/loss']:.4f}", lr=f"{record['train/lr']:.2e}",
                         samples_s=f"{record['train/samples_per_s']:.1f}")
    state.history.append({"step": state.global_step, "epoch": state.epoch, **record})


def fit(run: Run, state: TrainState, keeper: checkpointing.BestAdapter) -> None:
    """The training loop: epochs of accumulation windows, one optimizer step per window."""
    cfg, accelerator = run.cfg, run.accelerator
    meter = metering.ThroughputMeter(accelerator, run.model)
    progress = tqdm(total=run.total_steps, initial=state.global_step, disable=not accelerator.is_local_main_process)
    run.model.train()
    while state.global_step < run.total_steps and not keeper.should_stop:
        run.train_loader.set_epoch(state.epoch)  # the sampler's shuffle depends on seed + epoch only
        batches = run.train_loader
        if state.batches_in_epoch:  # resuming mid-epoch: skip what this epoch already trained on, once
            batches = accelerator.skip_first_batches(run.train_loader, state.batches_in_epoch)
        for window in accumulation_windows(batches, cfg.gradient_accumulation_steps):
            try:
                stats = train_step(run.model, run.optimizer, run.scheduler, window, accelerator, cfg.max_grad_norm,
                                   run.class_weights)
            except NonFiniteLossError as err:
                raise NonFiniteLossError(
                    f"{err} at optimizer step {state.global_step + 1} (epoch {state.epoch + 1}); nothing from this step "
                    "was applied or saved. Resume from the last checkpoint with a lower --learning_rate "
                    "(--resume_from_checkpoint latest --learning_rate ...), keep --max_grad_norm on, or try "
                    "--mixed_precision no") from None
            state.global_step += 1
            state.batches_in_epoch += len(window)
            epoch_done = state.batches_in_epoch >= len(run.train_loader)  # its checkpoint comes below
            meter.add(stats)
            progress.update(1)
            if state.global_step % cfg.log_every == 0 or state.global_step == run.total_steps:
                log_progress(run, state, meter, progress)
            with meter.paused():  # evaluation and checkpoints are not training time
                if cfg.eval_every and state.global_step % cfg.eval_every == 0:
                    evaluate_and_keep(run, state, keeper)
                if cfg.checkpoint_every and state.global_step % cfg.checkpoint_every == 0 and not epoch_done:
                    save_checkpoint(run, state)
            if state.global_step >= run.total_steps or keeper.should_stop:
                break
        if state.batches_in_epoch >= len(run.train_loader):  # the epoch ran to its end: next epoch, from 0
            state.epoch, state.batches_in_epoch = state.epoch + 1, 0
            with meter.paused():
                if not cfg.eval_every:
                    evaluate_and_keep(run, state, keeper)
                save_checkpoint(run, state)
    if meter.steps:  # steps since the last log line (early stopping)
        log_progress(run, state, meter, progress)
    progress.close()


def start_or_resume(run: Run) -> TrainState:
    """A fresh state, or the one of the checkpoint ``--resume_from_checkpoint`` names."""
    cfg = run.cfg
    if run.resume_from is None:
        return TrainState(identity=resume_identity(cfg, run.accelerator.num_processes))
    state = checkpointing.resume(run.accelerator, run.model, run.optimizer, run.scheduler, run.resume_from,
                                 run.checkpoint_dir, on_moved=run.output.moved)
    if run.accelerator.is_main_process:
        run.output.restore_best(run.resume_from / checkpointing.BEST_SUBDIR, run.best_dir)
    changes = apply_resume_changes(run, state)
    if changes:
        run.accelerator.print(f"resumed with changed settings: {changes}")
        state.history.append({"step": state.global_step, "epoch": state.epoch, "resumed_with_changes": changes})
    return state


def adjustable_settings(cfg: TrainConfig) -> dict:
    """The settings that may change on resume and change what is trained: recorded in each checkpoint."""
    return {"learning_rate": cfg.learning_rate, "max_grad_norm": cfg.max_grad_norm}


def apply_resume_changes(run: Run, state: TrainState) -> dict:
    """Settings changed since the checkpoint (only RESUME_MAY_CHANGE ones get this far): a new peak
    learning rate rescales the schedule from the current step on."""
    now = adjustable_settings(run.cfg)
    changes = {k: (old, now[k]) for k, old in state.adjustable.items() if now.get(k) != old}
    if "learning_rate" in changes:
        factor = run.scheduler.lr_lambdas[0](run.scheduler.last_epoch)
        run.scheduler.base_lrs = [run.cfg.learning_rate] * len(run.optimizer.param_groups)
        for group in run.optimizer.param_groups:
            group["initial_lr"], group["lr"] = run.cfg.learning_rate, run.cfg.learning_rate * factor
        run.scheduler._last_lr = [group["lr"] for group in run.optimizer.param_groups]
    return changes


def train(cfg: TrainConfig) -> dict:
    """Run the whole job; returns the metrics also written to OUTPUT_DIR/metrics.json."""
    run = setup(cfg)
    accelerator, log = run.accelerator, run.accelerator.print  # prints on the main process only
    baseline = evaluation.evaluate(run.model, run.eval_loader, accelerator, run.label_names, run.multi_label)
    if run.multi_label:
        log(f"baseline (before training): f1_micro {baseline['f1_micro']:.4f}, f1_macro {baseline['f1_macro']:.4f}")
    else:
        log(f"baseline (before training): accuracy {baseline['accuracy']:.4f}, f1 {baseline['f1']:.4f}")
    state = start_or_resume(run)
    state.adjustable = adjustable_settings(cfg)
    keeper = checkpointing.BestAdapter(run.best_dir, run.metric_for_best, greater_is_better(cfg, run.metric_for_best),
                                       cfg.early_stopping_patience, run.output, run.tokenizer)
    log(f"training: {run.total_steps} optimizer steps ({math.ceil(run.total_steps / run.steps_per_epoch)} epoch(s) of "
        f"{run.steps_per_epoch}), {cfg.batch_size} x {cfg.gradient_accumulation_steps} accumulation x "
        f"{accelerator.num_processes} process(es) per step, precision {accelerator.mixed_precision}")

    fit(run, state, keeper)
    if keeper.last_step != state.global_step and not keeper.should_stop:
        evaluate_and_keep(run, state, keeper)  # the last steps must compete for "best" too
    # The best evaluation's weights, not merely the last ones (thresholds tuned on them if asked).
    final = keeper.final_metrics(run, state, tune=cfg.tune_thresholds)
    if cfg.tune_thresholds:
        log("thresholds tuned on the eval split: " + ", ".join(
            f"{name} {t:.2f}" for name, t in zip(run.label_names, final["thresholds"])))
    return finish(run, state, baseline, final)


def finish(run: Run, state: TrainState, baseline: dict, final: dict) -> dict:
    """Save the adapter, metrics.json, report and plots (and the merged model if asked)."""
    cfg, accelerator, output = run.cfg, run.accelerator, run.output
    results = {
        "baseline": baseline, "final": final, "label_names": run.label_names, "history": state.history,
        "multi_label": run.multi_label, "metric_for_best": run.metric_for_best,
        "trainable_parameters": run.trainable_parameters, "total_parameters": run.total_parameters,
        "trainable_share": run.trainable_parameters / run.total_parameters,
        "optimizer_steps": state.global_step, "train_seconds": state.train_seconds,
        "train_samples_per_s": state.samples_seen / max(state.train_seconds, 1e-9),
        "train_tokens_per_s": state.tokens_seen / max(state.train_seconds, 1e-9),
        "num_processes": accelerator.num_processes, "mixed_precision": accelerator.mixed_precision,
        "config": dataclasses.asdict(cfg),
    }
    with output.recording(main=accelerator.is_main_process):
        checkpointing.save_adapter(accelerator, run.model, run.tokenizer, output.path)
        if accelerator.is_main_process:
            if run.multi_label:  # what eval.py and predict apply to the sigmoid scores
                evaluation.save_thresholds(output.path, run.label_names, final["thresholds"],
                                           tuned=cfg.tune_thresholds)
            (output.path / "metrics.json").write_text(json.dumps(results, indent=2))
            reporting.save_plots(output.path, results)  # first: the report links the PNGs it finds
            reporting.write_report(output.path, results)
            if cfg.merge:
                # A 4-bit base would round the merged weights to 4 bits: merge on the full-precision base.
                to_merge = (lora_setup.load_adapter(output.path)[0] if cfg.load_in_4bit
                            else checkpointing.peft_model(accelerator, run.model))
                lora_setup.merge_and_save(to_merge, run.tokenizer, output.path / "merged")
    accelerator.log({}, step=state.global_step)
    accelerator.end_training()
    if accelerator.is_main_process and (output.path / "logs").is_dir():
        output.record(output.path / "logs")
    accelerator.print("\n" + reporting.format_comparison(baseline, final, run.label_names, run.multi_label))
    accelerator.print(f"trainable parameters: {run.trainable_parameters:,} of {run.total_parameters:,} "
                      f"({100 * results['trainable_share']:.2f} %); training {state.train_seconds:.0f} s, "
                      f"{results['train_samples_per_s']:.1f} samples/s; adapter and report.md saved to {output.path}")
    return results


# ----------------------------------------------------------------------------------------------
# 5. Entry point
# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    try:
        train(parse_config(argv))
    except (ConfigError, data.DataError, lora_setup.ModelSetupError, CheckpointError, run_dir.OutputDirError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
