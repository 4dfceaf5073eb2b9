"""Resume: continue a run exactly where a checkpoint left it, or refuse and say why. All of it is here.

``--resume_from_checkpoint latest|PATH`` goes through three steps:
  1. ``choose``   which checkpoint is meant; every file of it is read (``checkpointing.verify``) and its
                  identity compared with this run's: the settings that decide what is trained, and the
                  content fingerprints of the train split, the eval split and the model files. A
                  checkpoint of other settings or other inputs is refused, naming the difference; under
                  ``latest`` a damaged checkpoint falls back to the one before it. Read-only.
  2. ``restore``  adapter, optimizer, scheduler, RNG and the loop position (``checkpointing.load_checkpoint``);
                  newer checkpoints of an abandoned line and the best adapter it left are moved aside
                  (never deleted), and the checkpoint's own best adapter is put in place.
  3. the settings that may change on resume (``RESUME_MAY_CHANGE``) take effect: a new peak learning
     rate rescales the schedule from the current step.
The loop then skips the micro-batches the epoch already trained on (``fit``, ``skip_first_batches``).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import checkpointing
import data
import lora_setup
from checkpointing import CheckpointError, TrainState
from settings import ConfigError, TrainConfig

# Settings a user may change when resuming: where and how often things are written or logged, and the
# two a user lowers after a NaN (the NaN message advises it). Every other setting changes which rows a
# run sees, their order or what is trained, so it must match the checkpoint. Listing what MAY change
# (not what must match) means a new setting is covered by default.
RESUME_MAY_CHANGE = ("output_dir", "overwrite", "resume_from_checkpoint", "log_every", "eval_every", "checkpoint_every",
                     "keep_checkpoints", "report_to", "eval_batch_size", "num_workers", "merge", "learning_rate",
                     "max_grad_norm")
INPUT_WORDS = {"train": "the train split", "eval": "the eval split", "model": "the model's files"}


def fixed_settings(cfg: TrainConfig) -> dict:
    """Every setting but those a resumed run may change (RESUME_MAY_CHANGE)."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RESUME_MAY_CHANGE}


def resume_identity(cfg: TrainConfig, num_processes: int = 1, inputs: dict | None = None) -> dict:
    """What a checkpoint must share with the run resuming it: the fixed settings, and ``inputs``, the
    content fingerprints of the data and model (``data.fingerprint``, ``lora_setup.model_fingerprint``).
    The per-process batch size is replaced by the global batch: the batches depend on it alone
    (data.LengthGroupedSampler), so a run may resume on another number of processes as long as the
    global batch stays the same."""
    identity = fixed_settings(cfg)
    identity["global_batch_size"] = identity.pop("batch_size") * num_processes
    identity["inputs"] = inputs or {}
    return identity


def check_resume_identity(now: dict, saved: dict, path: Path, num_processes: int = 1) -> None:
    """Refuse a checkpoint whose run had other settings or read other data, naming each difference."""
    # A setting added after the checkpoint was written had its default value there.
    saved = {**resume_identity(TrainConfig(), num_processes), **saved}
    changed = {k: (saved.get(k), now.get(k)) for k in sorted(set(now) | set(saved))
               if k != "inputs" and saved.get(k) != now.get(k)}
    if not changed:  # the same settings: the inputs themselves must be the same too
        changed_inputs = [INPUT_WORDS.get(k, k) for k in sorted(set(now["inputs"]) | set(saved["inputs"]))
                          if now["inputs"].get(k) != saved["inputs"].get(k)]
        if changed_inputs:
            raise ConfigError(f"checkpoint '{path}' was trained on other inputs: {', '.join(changed_inputs)} changed "
                              "since (compared by content); resume with the data and model it was trained on, or "
                              "start a fresh run in another --output_dir")
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


def input_fingerprints(cfg: TrainConfig, splits: data.LabelledSplits) -> dict:
    """The content of everything a run reads, as fingerprints: recorded in run_config.json and each
    checkpoint, compared on resume and by eval.py, so edited data or a replaced model is noticed."""
    return {"train": data.fingerprint(splits.train), "eval": data.fingerprint(splits.eval),
            "model": lora_setup.model_fingerprint(cfg.model)}


# ----------------------------------------------------------------------------------------------
# 1. choose
# ----------------------------------------------------------------------------------------------


def choose(request: str, checkpoint_dir: Path, identity: dict, num_processes: int = 1, log=print) -> Path | None:
    """The checkpoint ``--resume_from_checkpoint latest|PATH`` means, checked but not loaded (``None``:
    'latest' and no checkpoint yet). Read-only, so it runs before the output dir is claimed.

    ``latest`` takes the newest complete checkpoint of this output dir, falling back to the one before
    when it is damaged (and saying so). A checkpoint of other settings or inputs is refused.
    """
    if request == "latest":
        candidates = list(reversed(checkpointing.list_checkpoints(checkpoint_dir)))
        if not candidates:
            log(f"no checkpoint in {checkpoint_dir}: starting from scratch")
            return None
    else:
        path = Path(request).expanduser()
        if not (path / checkpointing.STATE_FILE).is_file():
            raise CheckpointError(f"'{path}' is not a checkpoint folder (no {checkpointing.STATE_FILE}); pass one of "
                                  f"{[str(p) for p in checkpointing.list_checkpoints(checkpoint_dir)]} or 'latest'")
        candidates = [path]
    for path in candidates:
        try:
            check_resume_identity(identity, checkpointing.verify(path).identity, path, num_processes)
            return path
        except CheckpointError as err:
            if request != "latest":
                raise
            log(f"warning: {err}; trying the previous checkpoint")
    raise CheckpointError(f"every checkpoint in {checkpoint_dir} is damaged; nothing was changed. Move that folder "
                          "away to start over, or pass --overwrite (which moves this run aside and starts over)")


# ----------------------------------------------------------------------------------------------
# 2. restore
# ----------------------------------------------------------------------------------------------


def move_aside_newer(checkpoint_dir: Path, step: int) -> list[Path]:
    """Move the checkpoints newer than ``step`` to ``checkpoints/abandoned/<time>/``: resuming from an
    older checkpoint abandons them, and mixing them into the new line would let ``latest`` pick one."""
    newer = [p for p in checkpointing.list_checkpoints(checkpoint_dir)
             if int(p.name[len(checkpointing.CHECKPOINT_PREFIX):]) > step]
    return checkpointing.move_aside(checkpoint_dir, newer) if newer else []


def restore_best(checkpoint: Path, best_dir: Path, checkpoint_dir: Path) -> None:
    """The best adapter of the resumed line is the checkpoint's copy: whatever ``best_dir`` holds now (the
    later part of this line, or an abandoned one) is moved aside beside the abandoned checkpoints."""
    if best_dir.exists():
        checkpointing.move_aside(checkpoint_dir, [best_dir])
    if (checkpoint / checkpointing.BEST_SUBDIR).is_dir():
        shutil.copytree(checkpoint / checkpointing.BEST_SUBDIR, best_dir)


def restore(run, path: Path) -> TrainState:
    """Load the checkpoint ``choose`` picked into the prepared model, optimizer and scheduler (every
    process); the main process then moves newer checkpoints and the current best adapter aside."""
    accelerator = run.accelerator
    state = checkpointing.load_checkpoint(accelerator, run.model, run.optimizer, run.scheduler, path)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        moved = move_aside_newer(run.checkpoint_dir, state.global_step)
        if moved:
            accelerator.print(f"resuming from step {state.global_step} starts a new line: moved the {len(moved)} newer "
                              f"checkpoint(s) aside to {moved[0].parent} (nothing deleted)")
        restore_best(path, run.best_dir, run.checkpoint_dir)
    accelerator.wait_for_everyone()
    accelerator.print(f"resumed from {path} (optimizer step {state.global_step}, epoch {state.epoch + 1})")
    return state


# ----------------------------------------------------------------------------------------------
# 3. settings changed on resume
# ----------------------------------------------------------------------------------------------


def adjustable_settings(cfg: TrainConfig) -> dict:
    """The settings that may change on resume and change what is trained: recorded in each checkpoint."""
    return {"learning_rate": cfg.learning_rate, "max_grad_norm": cfg.max_grad_norm}


def apply_resume_changes(run, state: TrainState) -> dict:
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


def start_or_resume(run) -> TrainState:
    """A fresh state, or the one of the checkpoint ``setup`` chose (``run.resume_from``)."""
    if run.resume_from is None:
        state = TrainState(identity=run.identity)
    else:
        state = restore(run, run.resume_from)
        changes = apply_resume_changes(run, state)
        if changes:
            run.accelerator.print(f"resumed with changed settings: {changes}")
            state.history.append({"step": state.global_step, "epoch": state.epoch, "resumed_with_changes": changes})
    state.adjustable = adjustable_settings(run.cfg)
    return state
