"""Throughput metering: samples/s, real tokens/s, and on a GPU peak memory and model FLOPs utilisation.

The loop hands each step's counts to a ``ThroughputMeter``; every ``--log_every`` steps the meter
turns them into one log record. Counts stay tensors on the device between logs: reading them (a
host-device sync) once per log instead of once per step lets the CPU queue the next steps while the
GPU works.

Model FLOPs utilisation (MFU) = the FLOPs the model needs for the real (non-padding) tokens trained on,
per second, over the card's dense peak for the run's precision. The FLOPs are counted for LoRA on a
frozen base (``training_flops_per_token``), not by the usual ``6 x parameters`` rule: that rule counts
the word embeddings (a lookup, no matmul) and the weight gradients of the frozen base (never computed),
and leaves out attention's sequence-length term.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch

# Dense peak FLOP/s (without 2:4 sparsity, which training does not use) per card and matmul precision:
# NVIDIA's datasheets, whose tensor-core figures are quoted with sparsity (halved here). fp32 is the
# plain CUDA-core rate; tf32 is what fp32 matmuls run at when TF32 is allowed.
PEAK_FLOPS = {
    "H100 SXM": {"bf16": 989.5e12, "fp16": 989.5e12, "tf32": 494.5e12, "fp32": 67e12},
    "H100 PCIe": {"bf16": 756.5e12, "fp16": 756.5e12, "tf32": 378e12, "fp32": 51e12},
    "H100 NVL": {"bf16": 835.5e12, "fp16": 835.5e12, "tf32": 417.5e12, "fp32": 60e12},
    "H200 SXM": {"bf16": 989.5e12, "fp16": 989.5e12, "tf32": 494.5e12, "fp32": 67e12},
    "H200 NVL": {"bf16": 835.5e12, "fp16": 835.5e12, "tf32": 417.5e12, "fp32": 60e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12},
    "L40S": {"bf16": 362.05e12, "fp16": 362.05e12, "tf32": 183e12, "fp32": 91.6e12},
    "L40": {"bf16": 181.05e12, "fp16": 181.05e12, "tf32": 90.5e12, "fp32": 90.5e12},
    "L4": {"bf16": 121e12, "fp16": 121e12, "tf32": 60e12, "fp32": 30.3e12},
}
# What torch.cuda.get_device_name() says, exactly, for each card above. An H100 PCIe runs at three
# quarters of an SXM's peak: guessing the card from a substring would misstate MFU by that much, so an
# unknown name gives no MFU rather than a wrong one (add its exact name here).
CARD_NAMES = {
    "NVIDIA H100 80GB HBM3": "H100 SXM", "NVIDIA H100 PCIe": "H100 PCIe", "NVIDIA H100 NVL": "H100 NVL",
    "NVIDIA H200": "H200 SXM", "NVIDIA H200 NVL": "H200 NVL",
    "NVIDIA A100-SXM4-80GB": "A100", "NVIDIA A100-SXM4-40GB": "A100", "NVIDIA A100-PCIE-40GB": "A100",
    "NVIDIA A100 80GB PCIe": "A100",
    "NVIDIA L40S": "L40S", "NVIDIA L40": "L40", "NVIDIA L4": "L4",
}


def matmul_precision(mixed_precision: str, allow_tf32: bool) -> str:
    """The precision a run's matmuls execute in: bf16/fp16 under mixed precision, else tf32 when fp32
    matmuls may use TF32 tensor cores (``torch.backends.cuda.matmul.allow_tf32``), else fp32."""
    if mixed_precision in ("bf16", "fp16"):
        return mixed_precision
    return "tf32" if allow_tf32 else "fp32"


def peak_flops(device_name: str, precision: str) -> float | None:
    """Dense peak FLOP/s of the card ``torch.cuda.get_device_name()`` names, at ``precision``
    (bf16 | fp16 | tf32 | fp32); None for a card not in CARD_NAMES."""
    card = CARD_NAMES.get(device_name.strip())
    return PEAK_FLOPS[card][precision] if card else None


@dataclass(frozen=True)
class MatmulCounts:
    """What a training step's FLOPs per token depend on.

    ``frozen`` and ``trainable``: weights of the matmuls every token goes through, in the frozen base
    and in what trains (LoRA's A and B, layers trained in full). Word and position embeddings are
    lookups, not matmuls; the pooler and classification head run once per text, not per token: none of
    them are counted. ``layers`` x ``attention_width`` (heads x head size) sizes attention's two
    sequence-length matmuls, Q K^T and the weighted sum of V."""

    frozen: int
    trainable: int
    layers: int
    attention_width: int


def training_flops_per_token(counts: MatmulCounts, seq_len: float) -> float:
    """FLOPs of one forward + backward pass per token of a sequence of ``seq_len`` tokens, LoRA on a frozen base.

    A matmul with a weight of N entries costs 2N FLOPs per token forward (a multiply and an add each).
    Backward, the gradient with respect to its input costs another 2N, and the one with respect to its
    weight 2N more, but only for weights that train: the frozen base needs the first (the gradient must
    flow through it to the adapters below) and never the second. Attention's Q K^T and (scores) V each
    cost 2 x seq_len x width per token and layer forward, and twice that backward (both operands are
    activations, so both get gradients).
    """
    forward = 2 * (counts.frozen + counts.trainable) + 2 * 2 * counts.layers * seq_len * counts.attention_width
    input_gradients = 2 * (counts.frozen + counts.trainable) + 2 * 2 * 2 * counts.layers * seq_len * counts.attention_width
    weight_gradients = 2 * counts.trainable
    return forward + input_gradients + weight_gradients


# Modules that run once per text (pooler, head) or not at all (PEFT's frozen copy of a module it trains
# in full): not part of the per-token count.
NOT_PER_TOKEN = ("pooler", "classifier", "pre_classifier", "score", "original_module")


def _weight_count(module) -> int:
    """Entries of a matmul layer's weight as the model uses it. ``in x out`` for a Linear: a 4-bit
    (QLoRA) weight packs two entries per byte, and a ZeRO-3 or FSDP shard holds a part of them."""
    if isinstance(module, torch.nn.Linear):
        return module.in_features * module.out_features
    shape = getattr(module.weight, "ds_shape", module.weight.shape)  # GPT-2's Conv1D; ZeRO-3 keeps the shape aside
    return int(torch.Size(shape).numel())


def matmul_counts(model) -> MatmulCounts:
    """``MatmulCounts`` of a (PEFT, possibly prepared or compiled) transformer classifier."""
    from transformers.pytorch_utils import Conv1D

    inner = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
    inner = getattr(inner, "module", inner)  # DDP's and DeepSpeed's wrapper
    frozen = trainable = 0
    for name, module in inner.named_modules():
        if not isinstance(module, (torch.nn.Linear, Conv1D)) or any(p in NOT_PER_TOKEN for p in name.split(".")):
            continue
        if module.weight.requires_grad:
            trainable += _weight_count(module)
        else:
            frozen += _weight_count(module)
    config = getattr(inner, "config", None)
    try:
        heads, layers, hidden = config.num_attention_heads, config.num_hidden_layers, config.hidden_size
    except AttributeError as err:
        raise ValueError(f"cannot size attention from this model's config ({err})") from None
    head_size = getattr(config, "head_dim", None) or hidden // heads
    return MatmulCounts(frozen, trainable, layers, heads * head_size)


def model_flops_utilisation(flops: float, seconds: float, peak: float | None) -> float | None:
    """Achieved FLOP/s over the peak; None when the peak is unknown."""
    return flops / seconds / peak if peak and seconds > 0 else None


class ThroughputMeter:
    """Sums loss, samples, tokens and time between two log lines."""

    def __init__(self, accelerator, model):
        device = accelerator.device
        self.on_gpu = device.type == "cuda"
        self.counts = self.peak_flops = None  # MFU: on a GPU whose peak is known, for a model we can size
        if self.on_gpu:
            precision = matmul_precision(accelerator.mixed_precision, torch.backends.cuda.matmul.allow_tf32)
            peak = peak_flops(torch.cuda.get_device_name(device), precision)
            try:
                self.counts = matmul_counts(model) if peak else None
                self.peak_flops = peak * accelerator.num_processes if peak else None
            except ValueError:
                pass  # an architecture whose config does not give its attention's size: no MFU, training goes on
        self.reset()

    def reset(self) -> None:
        self.loss, self.steps, self.samples, self.tokens, self.excluded = 0.0, 0, 0, 0, 0.0
        self.tokens_x_length = 0.0  # sum over steps of tokens x mean length: sizes attention's FLOPs
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
        # Attention's FLOPs grow with each text's length: a step's tokens times its texts' mean length
        # (exact for equal lengths, which length-grouped batches nearly have; a slight undercount otherwise).
        self.tokens_x_length = self.tokens_x_length + stats["tokens"] ** 2 / stats["samples"].clamp(min=1)
        self.steps += 1

    def record(self, learning_rate: float) -> tuple[dict, dict]:
        """The log record since the last one, and the interval's totals (seconds, samples, tokens); then
        start over. Reading the summed sample and token counts is the interval's one host-device sync."""
        seconds = max(time.perf_counter() - self.started - self.excluded, 1e-9)
        # The loss is already a Python float (train_step's one sync); the counts come over in one read.
        samples, tokens, tokens_x_length = (torch.stack([self.samples, self.tokens, self.tokens_x_length]).tolist()
                                            if self.steps else (0, 0, 0.0))
        samples, tokens = int(samples), int(tokens)
        record = {"train/loss": float(self.loss) / max(self.steps, 1), "train/lr": learning_rate,
                  "train/samples_per_s": samples / seconds, "train/tokens_per_s": tokens / seconds}
        if self.on_gpu:
            record["train/peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
            if self.peak_flops and tokens:
                flops = tokens * training_flops_per_token(self.counts, tokens_x_length / tokens)
                record["train/mfu"] = model_flops_utilisation(flops, seconds, self.peak_flops)
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
