"""LoRA fine-tuning for text classification: a hand-written training loop driven by Hugging Face Accelerate.

    accelerate launch train_loop.py                  # the whole job, offline, on the embedded default
    python train_loop.py --help                      # every setting, in groups, with its default
    accelerate launch train_loop.py --config configs/imdb.yaml --num_epochs 1

This file is the training program, in the order it runs: ``setup``, the steps (``train_step``: one
optimizer step over an accumulation window), the loop (``fit``), and ``train``/``finish`` (baseline,
loop, best adapter, results). Each feature lives in a module of its own; here it is one call:

  feature                                                   where
  settings in groups, config files, their checks            settings.py
  data: load, dedupe, split, tokenize, dynamic padding      data.py
  length-grouped global batches split over the processes    data.py (GlobalBatchSampler, filler rows)
  model, new head, LoRA/DoRA/QLoRA, reload with plain PEFT  lora_setup.py
  gradient accumulation with exact loss normalisation       train_step (below)
  mixed precision, clipping, AdamW, warmup schedules        train_step, build_optimizer, build_scheduler
  DDP / FSDP / DeepSpeed through `accelerate launch`        backends.py (and Accelerate)
  evaluation, metrics, prediction; best adapter, early stop  eval.py, metric_names.py; best_adapter.py
  atomic checkpoints without pickle; exact, checked resume  checkpointing.py; resume.py
  the output dir: one run at a time, nothing deleted        run_dir.py
  throughput, MFU; CPU dropout masks                        metering.py; performance.py
  before/after table, report.md, plots; the model card     reporting.py; model_card.py
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import typing
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, set_seed
from tqdm.auto import tqdm

import backends
import checkpointing
import data
import eval as evaluation
import lora_setup
import metering
import model_card
import performance
import reporting
import resume
import run_dir
import settings
from backends import build_accelerator
from best_adapter import BestAdapter, greater_is_better, metric_for_best
from checkpointing import CheckpointError, TrainState
from settings import ConfigError, TrainConfig, parse_config


# ----------------------------------------------------------------------------------------------
# 1. Setup: accelerator, data, model, optimizer, schedule -- everything the loop needs
# ----------------------------------------------------------------------------------------------


def load_data(cfg: TrainConfig) -> data.LabelledSplits:
    """The run's train and eval splits, cleaned and checked (the same function eval.py re-scores with);
    what the data needed fixing is printed once."""
    splits = data.load_run_splits(dataclasses.asdict(cfg))
    for note in splits.notes:
        PartialState().print(f"note: {note}")
    return splits


build_model = lora_setup.build_model  # pretrained model + new head + LoRA, as the settings ask
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
    identity: dict  # what a checkpoint must share with this run: settings and input fingerprints (resume.py)
    resume_from: Path | None = None  # the checkpoint to continue from, already checked
    class_weights: torch.Tensor | None = None  # per-class loss weights on the device (--class_weights)
    multi_label: bool = False  # several labels per text (decided by the data): sigmoid + BCE, thresholds
    metric_for_best: str = "accuracy"  # --metric_for_best as it applies to this data (see metric_for_best())
    checkpoints_written: list = dataclasses.field(default_factory=list)  # (folder, files) this process wrote
    checkpoint_dir = property(lambda self: self.output.path / CHECKPOINTS)
    best_dir = property(lambda self: self.output.path / "best_adapter")


def setup(cfg: TrainConfig, claim_output_dir: bool = True, splits: data.LabelledSplits | None = None) -> Run:
    """Accelerator, data, model + LoRA, optimizer and schedule, in that order. Everything that can be
    refused is checked before the output dir is touched. The bench passes ``claim_output_dir=False``
    (write nothing) and the ``splits`` it loaded once for all its runs."""
    data.quiet_libraries()  # no library noise on any entry point
    accelerator = build_accelerator(cfg)
    set_seed(cfg.seed)  # the head's initial weights, the dropout masks
    output = run_dir.RunDir(cfg.output_dir)
    if claim_output_dir:  # every process checks, so all of them stop together on a refusal
        output.check(overwrite=cfg.overwrite, resuming=bool(cfg.resume_from_checkpoint),
                     inputs=[cfg.dataset, cfg.eval_file], input_folders=[cfg.model],
                     describe_run=lambda path: resume.describe_previous_run(cfg, path))
    on_gpu = accelerator.device.type == "cuda"

    tokenizer = lora_setup.load_tokenizer(cfg.model)
    splits = splits if splits is not None else load_data(cfg)
    accelerator.print(f"data: {len(splits.train)} train / {len(splits.eval)} eval rows, labels {splits.label_names}")
    options = data.loader_options(cfg.num_workers, on_gpu)
    train_loader = data.build_dataloader(
        data.tokenize(splits.train, tokenizer, cfg.max_length, cfg.truncation), tokenizer.pad_token_id,
        cfg.batch_size, train=True, group_by_length=cfg.group_by_length, seed=cfg.seed,
        num_processes=accelerator.num_processes, **options)
    eval_loader = data.build_dataloader(
        data.tokenize(splits.eval, tokenizer, cfg.max_length, cfg.truncation), tokenizer.pad_token_id,
        cfg.eval_batch_size, train=False, **options)
    settings.check_against_data(cfg, splits)  # settings that fit one kind of labels only
    best_metric = metric_for_best(cfg, splits.multi_label)
    weights = data.class_weights(cfg.class_weights, splits.train["label"], splits.num_labels)
    if splits.multi_label:
        accelerator.print(f"multi-label: {splits.num_labels} tags, sigmoid + binary cross-entropy; best adapter by "
                          f"{best_metric}")
    if weights is not None:
        accelerator.print("class weights in the loss: " + ", ".join(
            f"{name} {w:.3f}" for name, w in zip(splits.label_names, weights)))

    model, head_modules = build_model(cfg, splits.label_names, tokenizer.pad_token_id, splits.multi_label)
    lora_setup.check_max_length(model, cfg.model, cfg.max_length)
    if cfg.fast_dropout:  # on CPU, PyTorch's dropout masks were a third of a training step (performance.py)
        performance.use_fast_dropout(model, accelerator.device)
    trainable, total = lora_setup.count_parameters(model)
    accelerator.print(f"model: {cfg.model}; new modules trained in full: {head_modules}; trainable parameters "
                      f"{trainable:,} of {total:,} ({100 * trainable / total:.2f} %)")

    # The checkpoint to resume is chosen now that the inputs' fingerprints are known (read-only).
    inputs = resume.input_fingerprints(cfg, splits) if claim_output_dir else {}
    identity = resume.resume_identity(cfg, accelerator.num_processes, inputs)
    resume_from = None
    if cfg.resume_from_checkpoint:
        resume_from = resume.choose(cfg.resume_from_checkpoint, output.path / CHECKPOINTS, identity,
                                    accelerator.num_processes, accelerator.print)
    # Data, model and checkpoint are valid: only now claim the output dir, so a failed start leaves nothing.
    if claim_output_dir:
        output.claim_on_main(accelerator, {**dataclasses.asdict(cfg), "inputs": inputs})
        backends.start_trackers(accelerator, cfg)

    optimizer = build_optimizer(model, cfg.learning_rate, cfg.weight_decay, fused=on_gpu)
    if accelerator.distributed_type == DistributedType.FSDP:
        backends.shard_blocks_not_embeddings(accelerator, model)
    model, optimizer, train_loader, eval_loader = accelerator.prepare(model, optimizer, train_loader, eval_loader)
    # After prepare, len(train_loader) is the number of micro-batches *this process* sees per epoch.
    steps_per_epoch = math.ceil(len(train_loader) / cfg.gradient_accumulation_steps)
    total_steps = cfg.max_steps or steps_per_epoch * cfg.num_epochs
    scheduler = build_scheduler(optimizer, cfg.lr_scheduler, math.ceil(cfg.warmup_ratio * total_steps), total_steps)
    return Run(cfg, accelerator, output, tokenizer, splits.label_names, model, optimizer, scheduler, train_loader,
               eval_loader, steps_per_epoch, total_steps, trainable, total, identity, resume_from,
               None if weights is None else torch.tensor(weights, device=accelerator.device), splits.multi_label,
               best_metric)


# ----------------------------------------------------------------------------------------------
# 2. The steps: optimizer, schedule, one training step
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

    ADVICE = ("nothing from this step was applied or saved. Resume from the last checkpoint with a lower "
              "--learning_rate (--resume_from_checkpoint latest --learning_rate ...), keep --max_grad_norm on, "
              "or try --mixed_precision no")


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
            accelerator.backward(loss * scale * backends.engine_loss_divisor(accelerator))
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


# ----------------------------------------------------------------------------------------------
# 3. The loop
# ----------------------------------------------------------------------------------------------


def evaluate_and_keep(run: Run, state: TrainState, keeper: BestAdapter) -> dict:
    """Evaluate (every process), log, and keep the adapter if it is the best so far."""
    metrics = evaluation.evaluate(run.model, run.eval_loader, run.accelerator, run.label_names, run.multi_label)
    scalars = {f"eval/{k}": v for k, v in metrics.items() if isinstance(v, float)}
    state.history.append({"step": state.global_step, "epoch": state.epoch, **scalars})
    run.accelerator.log(scalars, step=state.global_step)
    keeper.update(run, metrics)
    return metrics


def save_checkpoint(run: Run, state: TrainState) -> None:
    """Write a checkpoint; then remove the oldest of those this process wrote beyond --keep_checkpoints."""
    written = checkpointing.save_checkpoint(run.accelerator, run.model, run.optimizer, run.scheduler, state,
                                            run.checkpoint_dir, run.best_dir)
    if run.accelerator.is_main_process:
        run.checkpoints_written.append(written)
        checkpointing.prune(run.checkpoints_written, run.cfg.keep_checkpoints)


def fit(run: Run, state: TrainState, keeper: BestAdapter) -> None:
    """The training loop: epochs of accumulation windows, one optimizer step per window."""
    cfg, accelerator = run.cfg, run.accelerator
    eval_every = settings.evaluation_interval(cfg.eval_every, run.steps_per_epoch)
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
                raise NonFiniteLossError(f"{err} at optimizer step {state.global_step + 1} (epoch {state.epoch + 1}); "
                                         f"{NonFiniteLossError.ADVICE}") from None
            state.global_step += 1
            state.batches_in_epoch += len(window)
            epoch_done = state.batches_in_epoch >= len(run.train_loader)  # its checkpoint comes below
            meter.add(stats)
            progress.update(1)
            if state.global_step % cfg.log_every == 0 or state.global_step == run.total_steps:
                metering.log_progress(run, state, meter, progress)
            with meter.paused():  # evaluation and checkpoints are not training time
                if eval_every and state.global_step % eval_every == 0:
                    evaluate_and_keep(run, state, keeper)
                if cfg.checkpoint_every and state.global_step % cfg.checkpoint_every == 0 and not epoch_done:
                    save_checkpoint(run, state)
            if state.global_step >= run.total_steps or keeper.should_stop:
                break
        if state.batches_in_epoch >= len(run.train_loader):  # the epoch ran to its end: next epoch, from 0
            state.epoch, state.batches_in_epoch = state.epoch + 1, 0
            with meter.paused():
                if not eval_every:
                    evaluate_and_keep(run, state, keeper)
                save_checkpoint(run, state)
    if meter.steps:  # steps since the last log line (early stopping)
        metering.log_progress(run, state, meter, progress)
    progress.close()


# ----------------------------------------------------------------------------------------------
# 4. The job: baseline, loop, best adapter, results
# ----------------------------------------------------------------------------------------------


def train(cfg: TrainConfig) -> dict:
    """Run the whole job; returns the metrics also written to OUTPUT_DIR/metrics.json."""
    run = setup(cfg)
    with run.output:  # the output dir stays locked to this run until it ends, however it ends
        accelerator, log = run.accelerator, run.accelerator.print  # prints on the main process only
        baseline = evaluation.evaluate(run.model, run.eval_loader, accelerator, run.label_names, run.multi_label)
        log(f"baseline (before training): {reporting.headline(baseline, run.label_names, run.multi_label)}")
        state = resume.start_or_resume(run)
        keeper = BestAdapter(state, run.best_dir, run.metric_for_best, greater_is_better(cfg, run.metric_for_best),
                             cfg.early_stopping_patience, run.tokenizer)
        log(f"training: {run.total_steps} optimizer steps ({math.ceil(run.total_steps / run.steps_per_epoch)} epoch(s) of "
            f"{run.steps_per_epoch}), {cfg.batch_size} x {cfg.gradient_accumulation_steps} accumulation x "
            f"{accelerator.num_processes} process(es) per step, precision {accelerator.mixed_precision}")

        fit(run, state, keeper)
        if keeper.last_step != state.global_step and not keeper.should_stop:
            evaluate_and_keep(run, state, keeper)  # the last steps must compete for "best" too
        # The best evaluation's weights, not merely the last ones (thresholds tuned on them if asked).
        final = keeper.final_metrics(run, tune=cfg.tune_thresholds)
        if cfg.tune_thresholds:
            log("thresholds tuned on the eval split: " + ", ".join(
                f"{name} {t:.2f}" for name, t in zip(run.label_names, final["thresholds"])))
        return finish(run, state, baseline, final)


def finish(run: Run, state: TrainState, baseline: dict, final: dict) -> dict:
    """Save the adapter, metrics.json, report and plots (and the merged model if asked). An interruption
    here loses nothing: the last checkpoint holds the trained state, and resuming from it ends here again."""
    cfg, accelerator, output = run.cfg, run.accelerator, run.output
    results = reporting.results_record(run, state, baseline, final)  # what metrics.json holds
    checkpointing.save_adapter(accelerator, run.model, run.tokenizer, output.path)
    if accelerator.is_main_process:
        if run.multi_label:  # what eval.py and predict apply to the sigmoid scores
            evaluation.save_thresholds(output.path, run.label_names, final["thresholds"], tuned=cfg.tune_thresholds)
        (output.path / "metrics.json").write_text(json.dumps(results, indent=2))
        reporting.save_plots(output.path, results)  # first: the report links the PNGs it finds; never raises
        reporting.write_report(output.path, results)
        model_card.write_cards(output.path, results, run.best_dir)  # over PEFT's empty README.md template
        if cfg.merge:
            # A 4-bit base would round the merged weights to 4 bits: merge on the full-precision base.
            to_merge = (lora_setup.load_adapter(output.path)[0] if cfg.load_in_4bit
                        else checkpointing.peft_model(accelerator, run.model))
            lora_setup.merge_and_save(to_merge, run.tokenizer, output.path / "merged")
    accelerator.log({}, step=state.global_step)
    accelerator.end_training()
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
    except (ConfigError, data.DataError, lora_setup.ModelSetupError, CheckpointError, run_dir.OutputDirError,
            NonFiniteLossError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1 if isinstance(err, NonFiniteLossError) else 2  # 2: refused before training; 1: stopped in it
    return 0


if __name__ == "__main__":
    sys.exit(main())
