"""Speed benchmark: our training loop against ``transformers.Trainer`` on the same job, side by side.

    python bench/bench_speed.py                      # Rotten Tomatoes, MiniLM, batch 32, max_length 128, one epoch (236 steps)
    python bench/bench_speed.py --dataset embedded:imdb --max_length 512 --batch_size 16 --max_steps 25 \\
        --max_eval_samples 500
    python bench/bench_speed.py --arms a d           # only some of the runs

Runs, one after the other in this one process, on identical data (one load, one split, one
tokenization), the identical model + LoRA config, batch size, max_length, optimizer hyperparameters
and number of optimizer steps:

  (a) our loop, best settings (``train_loop``'s defaults): length-grouped batches and, on CPU, dropout
      masks drawn from 16 random bits (``performance.FastDropout``)
  (b) our loop, plain random batches (``--no-group_by_length``)
  (c) ``transformers.Trainer`` with its defaults (random batches, ``DataCollatorWithPadding``)
  (d) ``Trainer`` with ``train_sampling_strategy="group_by_length"`` (the old ``group_by_length=True``)
  (e) our loop, length-grouped, with PyTorch's own dropout (``--no-fast_dropout``): against (a), what
      the cheaper dropout masks buy; against (d), the loop alone on the same kind of batches
  (f) our loop, length-grouped, compiled (``--compile``)
  (g) ``Trainer`` with our settings: length grouping, widths padded to a multiple of 8, fused AdamW on a
      GPU, our loader workers and pinned memory, compiled when the job's ``--compile`` is on
  (h) (g) compiled: against (f), the loops compared with both compiled
  plus TF-IDF (1-2 grams, sublinear tf) + logistic regression on the same split, for accuracy context.
  By default (a)-(e) and TF-IDF run; (f)-(h) are for GPU-sized jobs (``--arms``, docs/gpu_at_scale.md).

Every flag of ``train_loop.py`` is accepted and means the same (``--dataset``, ``--max_length``,
``--batch_size``, ``--max_steps``, ``--max_eval_samples``, ``--learning_rate``, ``--lora_r`` ...); the
bench adds ``--arms``, ``--repeats``, ``--output``, ``--threads``, ``--random_init``, ``--timed_warmup_steps``
and ``--dry_run`` (see ``bench_parser``). Without ``--max_steps`` every run
trains exactly one epoch, so all of them see every training text once and samples/s compares the same
work (a part of an epoch holds different texts, and lengths, for each sampler).

What is timed, identically for every run (see ``Meter``): from the start of the training loop (before
the first batch is fetched) to the end of the last optimizer step, so data loading, collation,
forward, backward, clipping, optimizer and scheduler steps and each loop's own bookkeeping all count.
Model loading, tokenization and evaluation do not (the "wall" column adds the setup: model load,
LoRA, loaders, optimizer, Trainer construction). One warm-up run of two steps, not timed, goes first
so no run pays for the process's first-call costs. All runs share ``torch.get_num_threads()``, the
precision, the evaluation code (``eval.evaluate`` on the same length-sorted eval loader) and the seed
of the model's new weights. Runs (b) and (c) even train on the very same batches: Accelerate seeds the
Trainer's random sampler exactly as our sampler seeds its shuffle (``randperm`` from seed + epoch), so
(b) against (c) compares the loops (ours with ``FastDropout``) on identical batches, (a) against (b)
shows what length grouping buys and (a) against (e) what ``FastDropout`` buys.
Trainer is used only here, as the comparison.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import json
import math
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root: data, train_loop ...

import data  # noqa: E402
import eval as evaluation  # noqa: E402
import lora_setup  # noqa: E402
import metering  # noqa: E402
import reporting  # noqa: E402
import train_loop  # noqa: E402

ARMS = {
    "a": "our loop, length-grouped",
    "b": "our loop, random batches",
    "c": "Trainer, defaults",
    "d": "Trainer, group_by_length",
    "e": "our loop, length-grouped, PyTorch dropout",
    "f": "our loop, length-grouped, compiled",
    "g": "Trainer, our settings",
    "h": "Trainer, our settings, compiled",
    "tfidf": "TF-IDF + logistic regression",
}
TRAINED_ARMS = ("a", "b", "c", "d", "e", "f", "g", "h")
OUR_ARMS = ("a", "b", "e", "f")
REFERENCE_ARMS = ("c", "d", "g", "h")  # the ratio columns divide by these runs' samples/s
DEFAULT_ARMS = ("a", "b", "c", "d", "e", "tfidf")  # the CPU comparison; f, g, h are for GPUs (--arms)


# ----------------------------------------------------------------------------------------------
# Measuring a training window
# ----------------------------------------------------------------------------------------------


class Meter:
    """Times one run's training loop and counts what it computed, the same way for every run.

    ``start()`` is called just before the loop fetches its first batch, ``step()`` after each optimizer
    step (for the Trainer, from its ``on_train_begin`` / ``on_step_end`` callbacks). Everything else is
    observed through hooks that any loop triggers, so no loop is instrumented differently:

    * a forward pre-hook and hook on the model count, for every training forward pass, the samples and
      the real (attention-mask) and padded token slots, and time the forward pass;
    * global optimizer step pre/post hooks time ``optimizer.step()``; the time from the end of the last
      forward to the optimizer step is backward (+ loss bookkeeping and gradient clipping);
    * what is left, data fetching and collation, scheduler, ``zero_grad`` and the loop's own bookkeeping,
      is "data + other".

    Peak memory is sampled inside the window only: process RSS by a background thread on CPU,
    ``torch.cuda.max_memory_allocated`` on GPU. (On GPU the split between phases is approximate, as
    kernels run asynchronously. The total is exact: the window ends with a synchronization after the
    last of ``total_steps`` steps. Steps in between are not synchronized, so each loop keeps whatever
    overlap of host and GPU work it achieves: a sync per step would hide the cost of a loop's own syncs.)
    """

    PHASES = ("forward", "backward", "optimizer")

    def __init__(self, model, total_steps: int, sample_every_s: float = 0.02, warmup_steps: int = 0,
                 precision: str = "no"):
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        self.total_steps, self.warmup_steps, self.precision = total_steps, warmup_steps, precision
        self.sample_every_s = sample_every_s
        self.samples = self.padded_tokens = self.steps = 0
        self.real_tokens = []  # per-batch 0-d tensors, summed at the end: no device sync per step
        self.squared_lengths = []  # per batch, the sum of each text's real length squared: attention's FLOPs
        self.seconds = dict.fromkeys(self.PHASES, 0.0)
        self.started = self.last_step = self.cpu_started = self.last_step_cpu = None
        self.steady = None  # the counts when the warm-up steps ended (see start and step)
        self._forward_started = self._forward_ended = self._optimizer_started = None
        self.peak_rss = 0
        # Hooks go on the model itself, inside any torch.compile wrapper, and never get compiled: every
        # run, compiled or not, pays the same for them.
        inner = getattr(model, "_orig_mod", model)
        self.counts = metering.matmul_counts(inner)  # for MFU, as train_loop counts it
        self.extra = {}  # run-specific figures to report alongside
        self._running = threading.Event()
        self._sampler = None
        eager = torch.compiler.disable
        self._hooks = [inner.register_forward_pre_hook(eager(self._forward_start), with_kwargs=True),
                       inner.register_forward_hook(eager(self._forward_end)),
                       register_optimizer_step_pre_hook(self._optimizer_start),
                       register_optimizer_step_post_hook(self._optimizer_end)]

    def _active(self, module=None) -> bool:
        return self.started is not None and (module is None or module.training)

    def _forward_start(self, module, args, kwargs):
        if not self._active(module):
            return
        now = time.perf_counter()
        if self._forward_ended is not None:  # an earlier micro-batch of this window: its backward ran since
            self.seconds["backward"] += now - self._forward_ended
            self._forward_ended = None
        self._forward_started = now
        mask = kwargs["attention_mask"]
        lengths = mask.sum(1)
        self.samples += mask.shape[0]
        self.padded_tokens += mask.numel()
        self.real_tokens.append(lengths.sum())
        self.squared_lengths.append((lengths * lengths).sum())

    def _forward_end(self, module, args, output):
        if self._active(module) and self._forward_started is not None:
            self._forward_ended = time.perf_counter()
            self.seconds["forward"] += self._forward_ended - self._forward_started
            self._forward_started = None

    def _optimizer_start(self, optimizer, args, kwargs):
        if self._active() and self._forward_ended is not None:
            self._optimizer_started = time.perf_counter()
            self.seconds["backward"] += self._optimizer_started - self._forward_ended
            self._forward_ended = None

    def _optimizer_end(self, optimizer, args, kwargs):
        if self._active() and self._optimizer_started is not None:
            self.seconds["optimizer"] += time.perf_counter() - self._optimizer_started
            self._optimizer_started = None

    def _sample_rss(self):
        import psutil

        process = psutil.Process()
        while self._running.is_set():
            self.peak_rss = max(self.peak_rss, process.memory_info().rss)
            time.sleep(self.sample_every_s)

    def start(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # setup's queued GPU work is not the window's
            torch.cuda.reset_peak_memory_stats()
        self._running.set()
        self._sampler = threading.Thread(target=self._sample_rss, daemon=True)
        self._sampler.start()
        self.cpu_started = time.process_time()
        self.started = time.perf_counter()
        self.steady = self._counts_now(self.started, self.cpu_started)

    def _counts_now(self, clock: float, cpu_clock: float) -> dict:
        return {"clock": clock, "cpu": cpu_clock, "steps": self.steps, "samples": self.samples,
                "padded": self.padded_tokens, "batches": len(self.real_tokens), "seconds": dict(self.seconds)}

    def step(self) -> None:
        self.steps += 1
        ends_warmup = self.warmup_steps and self.steps == self.warmup_steps
        if torch.cuda.is_available() and (self.steps == self.total_steps or ends_warmup):
            torch.cuda.synchronize()  # GPU kernels run ahead of Python: the window ends when they are done
        self.last_step = time.perf_counter()
        self.last_step_cpu = time.process_time()
        if ends_warmup:  # the steady-state window starts here: compilation happened before it
            self.steady = self._counts_now(self.last_step, self.last_step_cpu)

    def stop(self) -> dict:
        """Close the window; returns the run's throughput, token, time-split and memory figures. With
        ``warmup_steps`` they count the steps after the warm-up (steady state); the warm-up's own time,
        compilation included, is reported apart."""
        self._running.clear()
        self._sampler.join()
        for hook in self._hooks:
            hook.remove()
        start = self.steady
        steps, samples = self.steps - start["steps"], self.samples - start["samples"]
        seconds = self.last_step - start["clock"]
        self.real_tokens = [t.item() for t in self.real_tokens]
        real = sum(self.real_tokens[start["batches"]:])
        squared = sum(t.item() for t in self.squared_lengths[start["batches"]:])
        phases = {k: v - start["seconds"][k] for k, v in self.seconds.items()}
        per_step_ms = {f"{k}_ms_per_step": 1000 * v / steps for k, v in phases.items()}
        per_step_ms["data_and_other_ms_per_step"] = 1000 * (seconds - sum(phases.values())) / steps
        result = {
            "optimizer_steps": steps, "samples": samples, "train_seconds": seconds,
            "samples_per_s": samples / seconds, "real_tokens_per_s": real / seconds,
            "real_token_share": real / max(self.padded_tokens - start["padded"], 1), **per_step_ms,
            "warmup_steps": start["steps"], "warmup_seconds": start["clock"] - self.started,
            "peak_rss_mb": self.peak_rss / 2**20,
            # CPU seconds of all this process's threads over the window: near threads x train_seconds on an
            # idle machine, far below it when other jobs share the cores (then compare runs with care)
            "cpu_seconds": self.last_step_cpu - start["cpu"],
            # a fingerprint of the data order: two runs with equal lists trained on the same batches
            "real_tokens_per_batch": [int(t) for t in self.real_tokens],
        }
        if torch.cuda.is_available():
            result["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
            precision = metering.matmul_precision(self.precision, torch.backends.cuda.matmul.allow_tf32)
            peak = metering.peak_flops(torch.cuda.get_device_name(), precision)
            # Model FLOPs of the real tokens (train_loop's definition); attention's term is exact per text
            # here: FLOPs are linear in the length, so real x per_token(sum of squares / real) sums them.
            flops = real * metering.training_flops_per_token(self.counts, squared / max(real, 1))
            result["mfu"] = metering.model_flops_utilisation(flops, seconds, peak)
        return {**result, **self.extra}


def release_memory() -> None:
    """Free the previous run's tensors and hand the freed heap back to the OS, so that every run's
    peak RSS starts from the same floor instead of inheriting the earlier runs' leftovers."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc keeps freed memory otherwise
    except (OSError, AttributeError):
        pass  # not glibc: RSS then includes some of the earlier runs' freed memory


# ----------------------------------------------------------------------------------------------
# Shared inputs: data tokenized once, the model built the same way for every run
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Job:
    """What every run shares: the config, tokenizer, splits tokenized once, and the eval loader."""

    cfg: train_loop.TrainConfig
    accelerator: object
    tokenizer: object
    splits: data.LabelledSplits
    train_tokens: object  # datasets.Dataset with input_ids, labels
    eval_loader: object
    model_label: str = ""  # what the table calls the model (a --random_init shape names itself)
    scratch: object = None  # the temporary folder holding a --random_init model, removed with the job

    @property
    def on_gpu(self) -> bool:
        return self.accelerator.device.type == "cuda"

    def loader_options(self) -> dict:
        return data.loader_options(self.cfg.num_workers, self.on_gpu)  # the same choices as train_loop.train()


# BERT encoders built from their config, with random weights: a step's time does not depend on the
# weights' values, so this measures a BERT-base-sized job without downloading one.
MODEL_SHAPES = {
    "bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),  # dry runs
}


def save_random_model(shape: str, folder: Path, seed: int) -> Path:
    """A BERT encoder of ``shape`` with random weights and the embedded MiniLM's tokenizer (BERT's uncased
    WordPiece vocabulary), saved as a model folder that ``--model`` loads like any pretrained one."""
    from transformers import BertConfig, BertModel

    tokenizer = lora_setup.load_tokenizer("embedded:minilm")
    config = BertConfig(vocab_size=len(tokenizer), max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
                        **MODEL_SHAPES[shape])
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def prepare_job(cfg: train_loop.TrainConfig, random_init: str | None = None) -> Job:
    scratch, label = None, cfg.model
    if random_init:
        scratch = tempfile.TemporaryDirectory(prefix="bench_model_")
        cfg = dataclasses.replace(cfg, model=str(save_random_model(random_init, Path(scratch.name), cfg.seed)))
        label = f"{random_init}-shaped BERT, random weights ({MODEL_SHAPES[random_init]['num_hidden_layers']} layers x " \
                f"{MODEL_SHAPES[random_init]['hidden_size']}), MiniLM tokenizer"
    accelerator = train_loop.build_accelerator(cfg)
    tokenizer = lora_setup.load_tokenizer(cfg.model)
    splits = train_loop.load_data(cfg)
    if cfg.max_steps is None:  # one epoch (see the module docstring)
        per_step = cfg.batch_size * cfg.gradient_accumulation_steps
        cfg = dataclasses.replace(cfg, max_steps=math.ceil(len(splits.train) / per_step))
    # Cut as train_loop.setup cuts them (--truncation), so that every arm trains on the same tokens.
    job = Job(cfg, accelerator, tokenizer, splits, data.tokenize(splits.train, tokenizer, cfg.max_length, cfg.truncation),
              None, label, scratch)
    eval_loader = data.build_dataloader(data.tokenize(splits.eval, tokenizer, cfg.max_length, cfg.truncation),
                                        tokenizer.pad_token_id, cfg.eval_batch_size, train=False, **job.loader_options())
    job.eval_loader = accelerator.prepare_data_loader(eval_loader)
    return job


def build_model(job: Job):
    """Pretrained model + new head + LoRA, exactly as train_loop.train() builds it. Seeding right before
    makes the head's and the LoRA A matrices' initial values identical in every run."""
    from accelerate.utils import set_seed

    set_seed(job.cfg.seed)
    model, _ = train_loop.build_model(job.cfg, job.splits.label_names, job.tokenizer.pad_token_id)
    return model


def warmup_steps(cfg: train_loop.TrainConfig, max_steps: int) -> int:
    """Warmup in optimizer steps, rounded up, as train_loop.train() computes it."""
    return math.ceil(cfg.warmup_ratio * max_steps)


# ----------------------------------------------------------------------------------------------
# The runs
# ----------------------------------------------------------------------------------------------


def setup_our_loop(job: Job, group_by_length: bool, fast_dropout: bool, max_steps: int,
                   compile: bool | None = None) -> train_loop.Run:
    """Runs (a)/(b)/(e)/(f) start exactly as ``train_loop.train()`` does: through ``train_loop.setup``, with
    the arm's sampler, dropout and compile setting and the job's splits, writing nothing. Train with the
    returned run's accelerator: it prepared the model and optimizer (under fp16, its gradient scaler is theirs)."""
    from accelerate.state import AcceleratorState

    cfg = dataclasses.replace(job.cfg, group_by_length=group_by_length, fast_dropout=fast_dropout, max_steps=max_steps,
                              compile=job.cfg.compile if compile is None else compile)
    # Accelerate keeps one state per process, and the compile setting of the first Accelerator built would
    # stick: start afresh, as the Trainer runs do (TrainingArguments resets it too).
    AcceleratorState._reset_state(reset_partial_state=True)
    return train_loop.setup(cfg, claim_output_dir=False, splits=job.splits)


def run_our_loop(job: Job, group_by_length: bool, fast_dropout: bool = True, max_steps: int | None = None,
                 compile: bool | None = None, warmup_steps: int = 0):
    """Runs (a)/(b)/(e)/(f): train_loop's own data loader, model setup, optimizer, schedule and ``train_step``.

    This is train_loop.train()'s loop without what the Trainer runs here do not do either: no
    evaluation, checkpoints or progress bar inside the timed window. Returns ``(model, meter)``.
    """
    cfg = job.cfg
    max_steps = max_steps or cfg.max_steps
    run = setup_our_loop(job, group_by_length, fast_dropout, max_steps, compile)
    run.model.train()
    meter = Meter(run.model, max_steps, warmup_steps=warmup_steps, precision=run.accelerator.mixed_precision)
    meter.start()
    epoch = 0
    while meter.steps < max_steps:
        run.train_loader.set_epoch(epoch)
        for window in train_loop.accumulation_windows(run.train_loader, cfg.gradient_accumulation_steps):
            train_loop.train_step(run.model, run.optimizer, run.scheduler, window, run.accelerator, cfg.max_grad_norm)
            meter.step()
            if meter.steps == max_steps:
                break
        epoch += 1
    return run.model, meter


def trainer_arguments(job: Job, group_by_length: bool, output_dir: str, ours: dict | None = None):
    """TrainingArguments with the Trainer's defaults except what must match our runs: batch size,
    steps, LR, schedule, warmup, weight decay, clipping, precision, seed and the sampler under test.
    Checkpoint saving, reporting and the progress bar are off (our runs do none of them while timed).
    ``ours`` (runs (g)/(h), from ``our_settings``): also our loader workers, pinned memory, fused AdamW
    and compile setting."""
    from transformers import TrainingArguments

    cfg = job.cfg
    schedules = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}
    extra = {} if ours is None else dict(
        dataloader_num_workers=ours["num_workers"], dataloader_pin_memory=ours["pin_memory"],
        optim="adamw_torch_fused" if ours["fused"] else "adamw_torch", torch_compile=ours["compile"])
    return TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        max_steps=cfg.max_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=schedules[cfg.lr_scheduler],
        warmup_steps=warmup_steps(cfg, cfg.max_steps),
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        bf16=job.accelerator.mixed_precision == "bf16",
        fp16=job.accelerator.mixed_precision == "fp16",
        seed=cfg.seed,
        train_sampling_strategy="group_by_length" if group_by_length else "random",
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        **extra,
    )


def our_settings(job: Job, compile: bool) -> dict:
    """What our loop does on this device beyond the Trainer's defaults (data.loader_options and
    build_optimizer): widths padded to a multiple of 8, loader workers, pinned memory, fused AdamW, compile."""
    return {**job.loader_options(), "fused": job.on_gpu, "compile": compile}


def run_trainer(job: Job, group_by_length: bool, ours: dict | None = None, warmup_steps: int = 0):
    """Runs (c)/(d)/(g)/(h): the same model, data and hyperparameters through ``transformers.Trainer``;
    with ``ours`` (``our_settings``) also our loader, optimizer and compile settings."""
    from transformers import DataCollatorWithPadding, Trainer, TrainerCallback

    model = build_model(job)
    meter = Meter(model, job.cfg.max_steps, warmup_steps=warmup_steps, precision=job.accelerator.mixed_precision)
    collator = DataCollatorWithPadding(job.tokenizer, pad_to_multiple_of=(ours or {}).get("pad_to_multiple_of"))

    class MeterCallback(TrainerCallback):
        """The Trainer's own events bound the timed window: loop start, end of each optimizer step."""

        def on_train_begin(self, args, state, control, **kwargs):
            meter.start()

        def on_step_end(self, args, state, control, **kwargs):
            meter.step()

    with tempfile.TemporaryDirectory() as output_dir:
        trainer = Trainer(model=model, args=trainer_arguments(job, group_by_length, output_dir, ours),
                          train_dataset=job.train_tokens, processing_class=job.tokenizer,
                          data_collator=collator, callbacks=[MeterCallback()])
        output = trainer.train()
    meter.extra["trainer_reported_runtime_s"] = output.metrics.get("train_runtime")  # its own clock, to cross-check
    model = trainer.model
    del trainer
    return model, meter


def run_tfidf(job: Job) -> dict:
    """TF-IDF (1-2 grams, sublinear tf) + logistic regression on the same train/eval split."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    started = time.perf_counter()
    pipeline = make_pipeline(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True), LogisticRegression(max_iter=1000))
    pipeline.fit(job.splits.train["text"], job.splits.train["label"])
    predictions = pipeline.predict(job.splits.eval["text"])
    seconds = time.perf_counter() - started
    metrics = evaluation.compute_metrics(job.splits.eval["label"], predictions, job.splits.label_names)
    return {"arm": "tfidf", "name": ARMS["tfidf"], "wall_seconds": seconds,
            "accuracy": metrics["accuracy"], "f1": metrics["f1"]}


def collate_ms_per_batch(job: Job, num_batches: int = 50) -> dict:
    """Milliseconds to pad one batch: our ``data.collate`` against the Trainer's default
    ``DataCollatorWithPadding``, on the same length-grouped batches of examples."""
    from transformers import DataCollatorWithPadding

    lengths = [len(ids) for ids in job.train_tokens["input_ids"]]
    order = list(data.LengthGroupedSampler(lengths, job.cfg.batch_size, seed=job.cfg.seed))
    size = job.cfg.batch_size
    batches = [job.train_tokens.__getitems__(order[i:i + size]) for i in range(0, min(len(order), num_batches * size), size)]
    collators = {"ours": data.Collator(job.tokenizer.pad_token_id),
                 "DataCollatorWithPadding": DataCollatorWithPadding(job.tokenizer)}
    costs = {}
    for name, collator in collators.items():
        started = time.perf_counter()
        for examples in batches:
            collator(examples)
        costs[name] = 1000 * (time.perf_counter() - started) / len(batches)
    return costs


def run_arm(job: Job, arm: str, warmup_steps: int = 0) -> dict:
    """One run: train (timed window inside), then evaluate outside it with the shared eval code. The first
    ``warmup_steps`` optimizer steps are timed apart (compilation happens there)."""
    if arm == "tfidf":
        return run_tfidf(job)
    release_memory()
    started = time.perf_counter()
    if arm in OUR_ARMS:
        model, meter = run_our_loop(job, group_by_length=arm != "b", fast_dropout=arm != "e",
                                    compile=True if arm == "f" else None, warmup_steps=warmup_steps)
    elif arm in ("g", "h"):  # compiled when ours is: (g) next to (a) with the job's setting, (h) next to (f)
        ours = our_settings(job, compile=arm == "h" or job.cfg.compile)
        model, meter = run_trainer(job, group_by_length=True, ours=ours, warmup_steps=warmup_steps)
    else:
        model, meter = run_trainer(job, group_by_length=arm == "d", warmup_steps=warmup_steps)
    wall = time.perf_counter() - started
    figures = meter.stop()  # before evaluating: its memory and forwards are not the training run's
    metrics = evaluation.evaluate(model, job.eval_loader, job.accelerator, job.splits.label_names)
    row = {"arm": arm, "name": ARMS[arm], **figures, "wall_seconds": wall,
           "accuracy": metrics["accuracy"], "f1": metrics["f1"], "eval_loss": metrics["loss"]}
    job.accelerator.free_memory()  # drops the accelerator's references to this run's model and optimizer
    return row


def add_ratios(rows: list[dict]) -> list[dict]:
    """Each trained run's samples/s divided by that of (c) and of (d), when those ran."""
    speed = {r["arm"]: r["samples_per_s"] for r in rows if "samples_per_s" in r}
    for row in rows:
        for reference in REFERENCE_ARMS:
            if "samples_per_s" in row and reference in speed:
                row[f"vs_{reference}"] = row["samples_per_s"] / speed[reference]
    return rows


def median_run(runs: list[dict]) -> dict:
    """The run with the median samples/s stands for its arm; every run's speed and accuracy stay listed."""
    if len(runs) == 1:
        return runs[0]
    row = dict(sorted(runs, key=lambda r: r["samples_per_s"])[len(runs) // 2])
    row["repeats"] = [{k: r[k] for k in ("samples_per_s", "train_seconds", "accuracy", "f1")} for r in runs]
    return row


def describe(job: Job, repeats: int) -> dict:
    """The settings every run shares, and the machine they ran on, for the table's header."""
    import transformers

    cfg = job.cfg
    return {
        "model": job.model_label or cfg.model, "dataset": cfg.dataset, "train_rows": len(job.splits.train),
        "eval_rows": len(job.splits.eval), "batch_size": cfg.batch_size, "max_length": cfg.max_length,
        "max_steps": cfg.max_steps, "learning_rate": cfg.learning_rate, "warmup_steps": warmup_steps(cfg, cfg.max_steps),
        "weight_decay": cfg.weight_decay, "lora": f"r={cfg.lora_r}, alpha={cfg.lora_alpha}, dropout={cfg.lora_dropout}",
        "device": torch.cuda.get_device_name() if job.on_gpu else f"cpu ({os.cpu_count()} cores)",
        "threads": torch.get_num_threads(), "precision": job.accelerator.mixed_precision, "repeats": repeats,
        "torch": torch.__version__, "transformers": transformers.__version__,
        "load_average_before_after": [round(os.getloadavg()[0], 2), None],
        "collate_ms_per_batch": {k: round(v, 2) for k, v in collate_ms_per_batch(job).items()},
    }


def run_benchmark(cfg: train_loop.TrainConfig, arms=DEFAULT_ARMS, warmup: int = 2, repeats: int = 1,
                  on_progress=None, random_init: str | None = None, timed_warmup_steps: int = 0) -> tuple[list[dict], dict]:
    """Run the chosen arms on one shared job; returns ``(rows, meta)`` for ``format_table``.

    With ``repeats`` > 1 the arms run round-robin (a b c d a b c d ...), so a change in the machine's
    background load hits every arm alike, and each arm reports its median-speed run. After every run,
    ``on_progress(rows, meta)`` gets the results so far (the bench writes them, so an interrupted
    session keeps what it measured). ``timed_warmup_steps``: the first steps of every run are timed
    apart from its steady state (see ``Meter``).
    """
    job = prepare_job(cfg, random_init)
    meta = describe(job, repeats)
    meta["timed_warmup_steps"] = timed_warmup_steps
    if warmup and any(a in TRAINED_ARMS for a in arms):
        model, meter = run_our_loop(job, group_by_length=True, max_steps=warmup)  # first-call costs, untimed
        meter.stop()
        del model
        job.accelerator.free_memory()
    runs = {arm: [] for arm in arms}
    rows = []
    for repeat in range(repeats):
        for arm in arms:
            if arm not in TRAINED_ARMS and repeat > 0:
                continue  # the TF-IDF baseline is deterministic and not timed: once is enough
            run = run_arm(job, arm, timed_warmup_steps)
            runs[arm].append(run)
            print(f"[{arm}] run {repeat + 1}/{repeats}: " + ", ".join(
                f"{k} {run[k]:.4g}" for k in ("samples_per_s", "train_seconds", "accuracy", "cpu_seconds") if k in run),
                flush=True)
            rows = add_ratios([median_run(done) for done in runs.values() if done])
            meta["load_average_before_after"][1] = round(os.getloadavg()[0], 2)
            if on_progress:
                on_progress(rows, meta)
    return rows, meta


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------

COLUMNS = [  # (header, row key, format)
    ("run", "label", "{}"),
    ("samples/s", "samples_per_s", "{:.1f}"),
    ("real tokens/s", "real_tokens_per_s", "{:.0f}"),
    ("real-token share", "real_token_share", "{:.1%}"),
    ("peak memory (MB)", "peak_memory_mb", "{:.0f}"),
    ("MFU", "mfu", "{:.2%}"),  # GPU only: model FLOPs / (time x the card's peak at the run's precision)
    ("train s", "train_seconds", "{:.1f}"),
    ("warm-up s", "warmup_seconds", "{:.1f}"),
    ("wall s", "wall_seconds", "{:.1f}"),
    ("accuracy", "accuracy", "{:.2%}"),
    ("F1", "f1", "{:.4f}"),
    ("x (c)", "vs_c", "{:.2f}"),
    ("x (d)", "vs_d", "{:.2f}"),
    ("x (g)", "vs_g", "{:.2f}"),
    ("x (h)", "vs_h", "{:.2f}"),
]


SPLIT_COLUMNS = [  # where the time of one optimizer step goes (see Meter)
    ("run", "label", "{}"),
    ("forward ms", "forward_ms_per_step", "{:.0f}"),
    ("backward + clip ms", "backward_ms_per_step", "{:.0f}"),
    ("optimizer ms", "optimizer_ms_per_step", "{:.1f}"),
    ("data + other ms", "data_and_other_ms_per_step", "{:.1f}"),
    ("step ms", "step_ms", "{:.0f}"),
    ("cores busy", "cores_busy", "{:.2f}"),
]


def markdown_table(rows: list[dict], columns) -> list[str]:
    """``columns`` are (header, key, format) triples; a missing value shows as '-'."""
    cells = [[fmt.format(row[key]) if row.get(key) is not None else "-" for _, key, fmt in columns] for row in rows]
    return reporting.markdown_table([header for header, _, _ in columns], cells).splitlines()


def format_table(rows: list[dict], meta: dict) -> str:
    """Markdown: the settings the runs shared, the main table, and where each run's step time went."""
    rows = [{**row, "label": f"({row['arm']}) {row['name']}" if row["arm"] != "tfidf" else row["name"],
             "peak_memory_mb": row.get("peak_gpu_memory_mb", row.get("peak_rss_mb")),
             "step_ms": 1000 * row["train_seconds"] / row["optimizer_steps"] if "optimizer_steps" in row else None,
             "cores_busy": row["cpu_seconds"] / row["train_seconds"] if "cpu_seconds" in row else None}
            for row in rows]
    trained = [row for row in rows if "optimizer_steps" in row]
    memory = "torch.cuda.max_memory_allocated" if any("peak_gpu_memory_mb" in r for r in rows) else "process RSS"
    lines = ["Settings: " + ", ".join(f"{k} {v}" for k, v in meta.items()), ""]
    lines += markdown_table(rows, COLUMNS)
    steady = (f"from the end of optimizer step {meta['timed_warmup_steps']} (the warm-up before it, compilation "
              "included, is warm-up s) to the last optimizer step" if meta.get("timed_warmup_steps") else
              "first batch fetch to last optimizer step")
    lines += ["", f"samples/s, real tokens/s, MFU and train s: the training loop only ({steady}); "
              f"wall s adds model load and setup. Peak memory: {memory} in that window. "
              "x (c), x (d), x (g), x (h): samples/s relative to those runs."]
    if trained:
        lines += ["", "Where the time of one optimizer step goes (mean ms per step):", ""]
        lines += markdown_table(trained, SPLIT_COLUMNS)
        lines += ["", f"cores busy: this process's CPU seconds per second of the window; close to {meta['threads']} "
                  "when the machine was otherwise idle, lower when other jobs took CPU time from the run."]
    return "\n".join(lines)


def default_output(cfg: train_loop.TrainConfig) -> Path:
    name = Path(cfg.dataset.replace(data.EMBEDDED_PREFIX, "")).stem
    return Path("bench/results") / f"{name}_len{cfg.max_length}_bs{cfg.batch_size}_steps{cfg.max_steps or 'epoch'}.md"


def write_results(rows: list[dict], meta: dict, table: str, output: Path) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(table + "\n")
    output.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


# --dry_run: the same command at a size that runs in seconds on a CPU, so that a CI test rehearses a GPU
# bench's exact flags (every arm, the repeats, the warm-up split) before GPU time is spent on them.
DRY_RUN = dict(max_length=64, batch_size=8, eval_batch_size=16, max_train_samples=64, max_eval_samples=16)


def dry_run_settings(cfg: train_loop.TrainConfig, bench_args) -> tuple[train_loop.TrainConfig, argparse.Namespace]:
    """Shrink a bench command to a dry run: small batches of short texts, a few steps, one round of the arms,
    a tiny random model in place of --random_init's, and compilation turned off (see main)."""
    warmup = min(bench_args.timed_warmup_steps, 1)
    args = argparse.Namespace(**{**vars(bench_args), "timed_warmup_steps": warmup, "repeats": 1,
                                 "untimed_warmup_steps": 0,
                                 "random_init": "tiny" if bench_args.random_init else None})
    return dataclasses.replace(cfg, **DRY_RUN, max_steps=warmup + 2), args


def bench_parser() -> argparse.ArgumentParser:
    """The bench's own flags; every other flag goes to train_loop's parser."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Every other flag is a train_loop.py flag with the same meaning (python train_loop.py --help): "
               "--dataset, --max_length, --batch_size, --max_steps (default here: "
               "one epoch), --max_eval_samples, --learning_rate, --lora_r ...")
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(DEFAULT_ARMS), help="runs, in this order")
    parser.add_argument("--output", type=Path, help="markdown table path; a .json with every figure goes beside it "
                        "(default: bench/results/<dataset>_len<L>_bs<B>_steps<N>.md)")
    parser.add_argument("--threads", type=int, help="torch threads for every run (default: torch's own choice)")
    parser.add_argument("--repeats", type=int, default=1, help="run the arms round-robin this many times; each "
                        "arm reports its median-speed run (guards against background load changing mid-run)")
    parser.add_argument("--untimed_warmup_steps", type=int, default=2, help="untimed warm-up steps before the runs")
    parser.add_argument("--timed_warmup_steps", type=int, default=0, help="the first N optimizer steps of every run are "
                        "timed apart as its warm-up (compilation happens there); the throughput figures count the "
                        "steps after them")
    parser.add_argument("--random_init", choices=sorted(MODEL_SHAPES), help="train a BERT of this shape built from its "
                        "config with random weights (MiniLM's tokenizer) instead of --model: a model size no download "
                        "provides")
    parser.add_argument("--dry_run", action="store_true", help="the same command at a size a CPU runs in seconds: "
                        f"{', '.join(f'--{k} {v}' for k, v in DRY_RUN.items())}, a few steps, one round of the "
                        "arms, a tiny model for --random_init, no compilation")
    return parser


def parse_args(argv=None):
    bench_args, train_flags = bench_parser().parse_known_args(argv)
    cfg = train_loop.parse_config(train_flags)
    if bench_args.dry_run:
        cfg, bench_args = dry_run_settings(cfg, bench_args)
    if bench_args.timed_warmup_steps < 0 or (cfg.max_steps and bench_args.timed_warmup_steps >= cfg.max_steps):
        raise train_loop.ConfigError(f"--timed_warmup_steps {bench_args.timed_warmup_steps} leaves no step to measure "
                                     f"in --max_steps {cfg.max_steps}; give it a number from 0 to max_steps - 1")
    return bench_args, cfg


def main(argv=None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    data.quiet_libraries()
    try:
        bench_args, cfg = parse_args(argv)
    except train_loop.ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if bench_args.dry_run:
        torch._dynamo.config.disable = True  # compiled arms run their compile plumbing, eagerly
    if bench_args.threads:
        torch.set_num_threads(bench_args.threads)
    output = bench_args.output or default_output(cfg)
    rows, meta = run_benchmark(cfg, bench_args.arms, warmup=bench_args.untimed_warmup_steps,
                               repeats=bench_args.repeats, random_init=bench_args.random_init,
                               timed_warmup_steps=bench_args.timed_warmup_steps,
                               on_progress=lambda rows, meta: write_results(rows, meta, format_table(rows, meta), output))
    print(format_table(rows, meta))
    print(f"\nwritten: {output} and {output.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
