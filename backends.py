"""Accelerate and the backends it drives (DDP, FSDP, DeepSpeed): the few things each one needs from us.

The training program builds its ``Accelerator`` here; everything else about processes, sharding and
engines is Accelerate's. What is left to us: CPU processes must ask for a process group, DeepSpeed's
engine clips and steps inside ``backward`` (so it gets our clipping and our exact loss scale), and FSDP2
must not shard the input embeddings twice.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DistributedType, DynamoBackend, ProjectConfiguration

from settings import ConfigError, TrainConfig


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


def start_trackers(accelerator: Accelerator, cfg: TrainConfig) -> None:
    """The experiment trackers of --report_to; they write into the output dir, so only once it is claimed."""
    if cfg.report_to:
        accelerator.init_trackers("lora-text-classification", config={
            k: v for k, v in dataclasses.asdict(cfg).items() if v is not None and not isinstance(v, list)})


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


def engine_loss_divisor(accelerator) -> int:
    """DeepSpeed divides every loss by the accumulation steps of its config; our loss is already
    normalised exactly, so we multiply that division away (1 everywhere else)."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return 1
    return int(accelerator.deepspeed_config.get("gradient_accumulation_steps", 1))
