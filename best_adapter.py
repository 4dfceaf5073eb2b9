"""The best adapter and early stopping: which evaluation wins, where its adapter is kept, when to stop.

Every evaluation during training is compared with the best so far by ``--metric_for_best`` (higher is
better, except for the losses). The winner's adapter is saved to ``OUTPUT_DIR/best_adapter`` (and
copied into each checkpoint, so it survives a resume); after ``--early_stopping_patience`` evaluations
without a win the run stops. At the end the model gets the best evaluation's weights back, so the saved
adapter and the final metrics are the best ones, not merely the last.
"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file

import eval as evaluation
import metric_names
from checkpointing import ADAPTER_FILE, TrainState, load_adapter_weights, save_adapter
from settings import ConfigError, TrainConfig


def greater_is_better(cfg: TrainConfig, metric: str) -> bool:
    if cfg.greater_is_better is not None:
        return cfg.greater_is_better
    return metric not in metric_names.LOWER_IS_BETTER


def metric_for_best(cfg: TrainConfig, multi_label: bool) -> str:
    """The eval metric that picks the best adapter. Multi-label runs have no plain accuracy (subset accuracy
    is all-or-nothing per text and moves little): the default ``accuracy`` means ``f1_micro`` there."""
    names = metric_names.MULTI_LABEL_METRICS if multi_label else metric_names.REPORT_METRICS
    metric = "f1_micro" if multi_label and cfg.metric_for_best == "accuracy" else cfg.metric_for_best
    if metric not in names:
        kind = "multi-label" if multi_label else "single-label"
        raise ConfigError(f"--metric_for_best {cfg.metric_for_best} is not a {kind} metric; this data is {kind}, "
                          f"choose one of {', '.join(names)}")
    return metric


class BestAdapter:
    """Keeps the adapter of the best evaluation in ``folder`` and counts evaluations without
    improvement. Its numbers live in the ``TrainState``, so they survive a resume, and so does a stop."""

    def __init__(self, state: TrainState, folder: Path, metric: str, greater_is_better: bool, patience: int, tokenizer):
        self.state, self.folder, self.metric, self.greater, self.patience = state, folder, metric, greater_is_better, patience
        self.tokenizer = tokenizer
        self.last_step, self.last_metrics = None, None

    @property
    def should_stop(self) -> bool:
        """Read from the state, not remembered: a run resumed after its early stop stays stopped."""
        return bool(self.patience) and self.state.evals_without_improvement >= self.patience

    def improves(self, score: float, best: float | None) -> bool:
        return best is None or (score > best if self.greater else score < best)

    def update(self, run, metrics: dict) -> None:
        """Every process calls this (saving the adapter gathers it from all of them)."""
        state, score = self.state, metrics[self.metric]
        self.last_step, self.last_metrics = state.global_step, metrics
        if self.improves(score, state.best_metric):
            state.best_metric, state.best_step, state.evals_without_improvement = score, state.global_step, 0
            save_adapter(run.accelerator, run.model, self.tokenizer, self.folder)
        else:
            state.evals_without_improvement += 1
        run.accelerator.print(f"eval at step {state.global_step}: {self.metric} {score:.4f} (best {state.best_metric:.4f} "
                              f"at step {state.best_step}), loss {metrics['loss']:.4f}")
        if self.should_stop:
            run.accelerator.print(f"early stopping: no improvement in {self.patience} evaluation(s)")

    def final_metrics(self, run, tune: bool = False) -> dict:
        """The best evaluation's metrics, with its weights loaded back into the model if they are not the
        current ones (every process calls this). ``tune`` (multi-label ``--tune_thresholds``): evaluated
        again on those weights with each label's threshold tuned on the eval split."""
        state = self.state
        best_is_current = self.last_step == state.global_step and state.best_step == state.global_step
        if best_is_current and not tune:
            return self.last_metrics  # the last evaluation was the best: no need to run it again
        if not best_is_current:
            run.accelerator.wait_for_everyone()
            load_adapter_weights(run.accelerator, run.model, load_file(self.folder / ADAPTER_FILE))
        return evaluation.evaluate(run.model, run.eval_loader, run.accelerator, run.label_names,
                                   getattr(run, "multi_label", False), tune=tune)
