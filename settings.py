"""Every setting of a training run, in the groups ``--help`` shows, and how they are read and checked.

Settings come from three places, later ones winning: the defaults below, a YAML/JSON file given with
``--config``, and command-line flags. Each group is a dataclass, like the ``ModelArguments`` and
``DataTrainingArguments`` of the transformers examples; ``TrainConfig`` holds them all, flat, so the
training program reads ``cfg.learning_rate``. The parser is argparse with one argument group per
dataclass rather than ``transformers.HfArgumentParser``: HfArgumentParser spells a switched-off boolean
``--no_fast_dropout`` where this tool has always taken ``--no-fast_dropout``, and every flag keeps its name.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

import data
import metric_names


def _opt(default, help_text):
    return field(default=default, metadata={"help": help_text})


@dataclass
class DataSettings:
    """data: what the run trains and evaluates on"""

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
    truncation: str = _opt("head", "which tokens of a text longer than --max_length are kept: head | tail | "
                           "head+tail (the first quarter and last three quarters of the budget, after Sun et al. 2019)")
    seed: int = _opt(42, "seed for the split, data order, head init and dropout")


@dataclass
class ModelSettings:
    """model and LoRA: the pretrained model, its new head and the adapter"""

    model: str = _opt("embedded:minilm", "Hub id, local folder, or embedded:minilm / embedded:smollm2")
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


@dataclass
class OptimizationSettings:
    """optimisation: steps, batches, AdamW and its schedule"""

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
    class_weights: str = _opt("none", "weight each class in the training loss: none | auto (inverse class "
                              "frequency of the train split, averaging 1 over its rows) | w1,w2,... one per class "
                              "(eval loss stays unweighted)")


@dataclass
class EvalCheckpointSettings:
    """evaluation and checkpoints: when to evaluate, which adapter is best, what to save and resume"""

    eval_batch_size: int = _opt(128, "batch size for evaluation")
    eval_every: typing.Optional[int] = _opt(None, "evaluate every N optimizer steps (default: 3 times per epoch, "
                                            "so the eval curve is a curve; 0 = at each epoch end only)")
    metric_for_best: str = _opt("accuracy", "eval metric that picks the best adapter (loss and hamming_loss: lower "
                                "is better, every other metric: higher); multi-label runs read accuracy as f1_micro")
    greater_is_better: typing.Optional[bool] = _opt(None, "override the direction of --metric_for_best")
    early_stopping_patience: int = _opt(0, "stop after N evaluations without improvement (0 = off)")
    tune_thresholds: bool = _opt(False, "multi-label: pick each label's F1-best threshold on the eval split after "
                                 "training (default 0.5 each); saved to OUTPUT_DIR/thresholds.json")
    checkpoint_every: int = _opt(0, "checkpoint every N optimizer steps, besides each epoch end (0 = epoch ends)")
    keep_checkpoints: int = _opt(2, "keep the newest K checkpoints that this run wrote (older ones it wrote are "
                                 "removed; a checkpoint it resumed from is never removed)")
    resume_from_checkpoint: typing.Optional[str] = _opt(None, "latest, or a checkpoint folder")


@dataclass
class OutputSettings:
    """output and logging: where results go and what is reported"""

    output_dir: str = _opt("outputs/run", "where the adapter, metrics.json and checkpoints go")
    overwrite: bool = _opt(False, "start over in an output dir that already holds a run: the previous run is "
                           "renamed to OUTPUT_DIR.previous-TIME beside it (nothing is deleted)")
    log_every: int = _opt(20, "log loss, LR and throughput every N optimizer steps")
    report_to: typing.Optional[str] = _opt(None, "experiment tracker: tensorboard, wandb, ... or all")
    merge: bool = _opt(False, "also export a merged model (plain transformers) to OUTPUT_DIR/merged")


@dataclass
class PerformanceSettings:
    """performance: precision, batching and compilation (none of them changes what is learned in expectation)"""

    mixed_precision: str = _opt("auto", "auto (bf16 on a GPU that has it, else fp32) | no | bf16 | fp16")
    group_by_length: bool = _opt(True, "batch texts of similar length together (less padding)")
    num_workers: typing.Optional[int] = _opt(None, "DataLoader workers (default: 2 on GPU, 0 on CPU)")
    compile: bool = _opt(False, "torch.compile the model")
    fast_dropout: bool = _opt(True, "on CPU, draw dropout masks from 16 random bits (cheaper, same p; "
                                    "performance.FastDropout)")


GROUPS = (DataSettings, ModelSettings, OptimizationSettings, EvalCheckpointSettings, OutputSettings,
          PerformanceSettings)


@dataclass
class TrainConfig(PerformanceSettings, OutputSettings, EvalCheckpointSettings, OptimizationSettings, ModelSettings,
                  DataSettings):
    """Every setting of a run, flat (the groups above, in that order)."""


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
        ((cfg.eval_every or 0) >= 0 and cfg.checkpoint_every >= 0 and cfg.early_stopping_patience >= 0,
         "--eval_every, --checkpoint_every and --early_stopping_patience must be >= 0"),
        (cfg.lr_scheduler in ("linear", "cosine", "constant"),
         f"--lr_scheduler must be linear, cosine or constant (got {cfg.lr_scheduler!r})"),
        (cfg.mixed_precision in ("auto", "no", "bf16", "fp16"),
         f"--mixed_precision must be auto, no, bf16 or fp16 (got {cfg.mixed_precision!r})"),
        (cfg.lora_bias in ("none", "all", "lora_only"), "--lora_bias must be none, all or lora_only"),
        (cfg.metric_for_best in metric_names.REPORT_METRICS + metric_names.MULTI_LABEL_METRICS,  # checked now, not after
         f"--metric_for_best must be one of {', '.join(metric_names.REPORT_METRICS)} (single-label) or "  # an epoch
         f"{', '.join(metric_names.MULTI_LABEL_METRICS)} (multi-label) (got {cfg.metric_for_best!r})"),
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


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default unless it is None or its help already says what the default means."""

    def _get_help_string(self, action):
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises ConfigError (one line, via main) instead of printing its whole usage and exiting."""

    def error(self, message):
        raise ConfigError(f"{message}; see --help for every flag")


def build_arg_parser() -> argparse.ArgumentParser:
    """Every TrainConfig field becomes a flag of the same name, with its help text and default, listed
    under its group."""
    parser = ArgumentParser(description="LoRA fine-tuning for text classification: a hand-written training "
                            "loop driven by Hugging Face Accelerate.",
                            formatter_class=HelpFormatter)
    parser.add_argument("--config", help="YAML or JSON file of settings; flags given here override it")
    for group in GROUPS:
        section = parser.add_argument_group(group.__doc__.split(":")[0], group.__doc__.split(":", 1)[1].strip())
        for f in dataclasses.fields(group):
            kind, _ = _field_type(f.name)
            # argparse %-formats help texts (for %(default)s): a literal % must be doubled.
            options = {"default": f.default, "help": f.metadata["help"].replace("%", "%%")}
            if kind is bool:
                options["action"] = argparse.BooleanOptionalAction
            elif typing.get_origin(kind) is list:
                options["nargs"] = "+"
            else:
                options["type"] = kind
            section.add_argument(f"--{f.name}", **options)
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


def check_against_data(cfg: TrainConfig, splits: data.LabelledSplits) -> None:
    """Settings that fit one kind of labels only (one per text, or several), or that the data contradicts."""
    if splits.multi_label and cfg.class_weights != "none":
        raise ConfigError("--class_weights applies to single-label data; this data has several labels per text: "
                          "drop --class_weights")
    if cfg.tune_thresholds and not splits.multi_label:
        raise ConfigError("--tune_thresholds applies to multi-label data (lists of tags, or --label_separator); "
                          "drop it for single-label data")
    if cfg.num_labels is not None and cfg.num_labels != splits.num_labels:  # class names set their own number
        raise ConfigError(f"--num_labels is {cfg.num_labels} but the data names {splits.num_labels} classes "
                          f"{splits.label_names}; drop --num_labels")


# --eval_every's default: evaluations per epoch, enough for a curve. On the default job one evaluation of the
# 1,000 held-out reviews costs as much as 10 to 17 training steps (median 13), so 3 per epoch (6 in all, 4
# more than at the 2 epoch ends) add about 50 steps' worth to its 472: `time make train` took 5 min 29 s,
# against 4 min 52 s with --eval_every 0 (epoch ends only) on the same idle 2-core machine (+13 %).
EVALS_PER_EPOCH = 3


def evaluation_interval(eval_every: int | None, steps_per_epoch: int) -> int:
    """Optimizer steps between evaluations: --eval_every, or by default steps_per_epoch / EVALS_PER_EPOCH
    rounded up (the loop's last step is evaluated in any case); 0 = at epoch ends only."""
    if eval_every is None:
        return max(1, math.ceil(steps_per_epoch / EVALS_PER_EPOCH))
    return eval_every
