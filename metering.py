"""Throughput metering: samples/s, real tokens/s, and on a GPU peak memory and model FLOPs utilisation.

The loop hands each step's counts to a ``ThroughputMeter``; every ``--log_every`` steps the meter
turns them into one log record. Counts stay tensors on the device between logs: reading them (a
host-device sync) once per log instead of once per step lets the CPU queue the next steps while the
GPU works.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch

# Dense bf16 peak FLOP/s of known GPUs. Longest names first: "L40S" and "L40" must not match "L4".
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L40": 181e12,
                   "A10G": 125e12, "L4": 121e12}


def peak_bf16_flops(device_name: str) -> float | None:
    """Dense bf16 peak of known GPUs, for model FLOPs utilisation (MFU); None when unknown."""
    return next((PEAK_BF16_FLOPS[k] for k in sorted(PEAK_BF16_FLOPS, key=len, reverse=True) if k in device_name), None)


def training_flops_per_token(total_params: int) -> float:
    """2N for the forward pass + 2N for the backward pass through activations. The usual 6N also
    counts 2N for weight gradients, which frozen base weights do not need."""
    return 4.0 * total_params


class ThroughputMeter:
    """Sums loss, samples, tokens and time between two log lines."""

    def __init__(self, device: torch.device, total_params: int, num_processes: int):
        self.on_gpu = device.type == "cuda"
        self.flops_per_token = training_flops_per_token(total_params)
        peak = peak_bf16_flops(torch.cuda.get_device_name(device)) if self.on_gpu else None
        self.peak_flops = peak * num_processes if peak else None
        self.reset()

    def reset(self) -> None:
        self.loss, self.steps, self.samples, self.tokens, self.excluded = 0.0, 0, 0, 0, 0.0
        self.started = time.perf_counter()

    @contextmanager
    def paused(self):
        """Time spent inside (evaluation, checkpoints) is not training time."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.excluded += time.perf_counter() - started

    def add(self, stats: dict) -> None:
        """One optimizer step's ``train_step`` result (its counts are still device tensors)."""
        self.loss = self.loss + stats["loss"]
        self.samples = self.samples + stats["samples"]
        self.tokens = self.tokens + stats["tokens"]
        self.steps += 1

    def record(self, learning_rate: float) -> tuple[dict, dict]:
        """The log record since the last one, and the interval's totals (seconds, samples, tokens); then
        start over. Reading the summed sample and token counts is the interval's one host-device sync."""
        seconds = max(time.perf_counter() - self.started - self.excluded, 1e-9)
        # The loss is already a Python float (train_step's one sync); both counts come over in one read.
        samples, tokens = (int(n) for n in torch.stack([self.samples, self.tokens]).tolist()) if self.steps else (0, 0)
        record = {"train/loss": float(self.loss) / max(self.steps, 1), "train/lr": learning_rate,
                  "train/samples_per_s": samples / seconds, "train/tokens_per_s": tokens / seconds}
        if self.on_gpu:
            record["train/peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
            if self.peak_flops:
                record["train/mfu"] = record["train/tokens_per_s"] * self.flops_per_token / self.peak_flops
        interval = {"seconds": seconds, "samples": samples, "tokens": tokens}
        self.reset()
        return record, interval


def log_progress(run, state, meter: ThroughputMeter, progress) -> None:
    """A log line: loss, learning rate and throughput since the last one, to the trackers, the progress
    bar and the run's history; the time, samples and tokens are added to the state's totals."""
    record, interval = meter.record(run.scheduler.get_last_lr()[0])
    state.train_seconds += interval["seconds"]
    state.samples_seen += interval["samples"]
    state.tokens_seen += interval["tokens"]
    run.accelerator.log(record, step=state.global_step)
    progress.set_postfix(loss=f"{record['train/loss']:.4f}", lr=f"{record['train/lr']:.2e}",
                         samples_s=f"{record['train/samples_per_s']:.1f}")
    state.history.append({"step": state.global_step, "epoch": state.epoch, **record})
