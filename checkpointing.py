"""Checkpoints: everything a run needs to continue exactly where it stopped, written without pickle.

A checkpoint is a folder ``OUTPUT_DIR/checkpoints/step_00000012`` holding:

  adapter_model.safetensors   the trained weights: LoRA matrices + the new head (the frozen base never changes,
  adapter_config.json         so it is never written); the same PEFT format as the final adapter
  best/                       the best adapter so far (same format), so the run's "best" survives a resume
  optimizer.safetensors       AdamW's moment tensors ...
  optimizer.json              ... and its param groups and step counts
  rng_state_<rank>.safetensors  each process's random generators (Python, NumPy, torch CPU and CUDA): the
                              dropout masks after a resume are the ones the uninterrupted run would draw
  trainer_state.json          the loop's position (optimizer step, epoch, micro-batches consumed in it), the
                              LR scheduler's few numbers, the best metric, the history, the run's settings

Why not ``accelerator.save_state``: it stores the scheduler and RNG states as pickles and loads them with
``weights_only=False`` (and under DeepSpeed the engine's own checkpoint is pickles too), so a planted
file would run code on resume. Here every tensor goes through
safetensors and everything else through JSON: loading a checkpoint can never execute anything.

Writes are atomic: a checkpoint is assembled under ``.incomplete_step_*`` and renamed when complete, so
a crash never leaves a folder that looks complete. Resuming from an older checkpoint by path starts a
new *line*: the newer checkpoints of the abandoned line are moved aside (never deleted), so ``latest``
always continues the line the user chose last.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import DistributedType
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

import lora_setup
import run_dir

CHECKPOINT_PREFIX = "step_"
INCOMPLETE_PREFIX = ".incomplete_"
ABANDONED_DIR = "abandoned"
STATE_FILE = "trainer_state.json"
ADAPTER_FILE = "adapter_model.safetensors"
BEST_SUBDIR = "best"
OPTIMIZER_TENSORS, OPTIMIZER_JSON = "optimizer.safetensors", "optimizer.json"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be resumed from; the message says why."""


@dataclass
class TrainState:
    """Everything besides tensors that a resumed run needs to carry on exactly where it stopped."""

    global_step: int = 0  # optimizer steps done (not micro-batches)
    epoch: int = 0  # epoch in progress
    batches_in_epoch: int = 0  # micro-batches of that epoch already consumed, per process
    best_metric: float | None = None
    best_step: int | None = None  # the optimizer step whose adapter is OUTPUT_DIR/best_adapter
    evals_without_improvement: int = 0
    train_seconds: float = 0.0
    samples_seen: int = 0
    tokens_seen: int = 0
    history: list = field(default_factory=list)
    identity: dict = field(default_factory=dict)  # the settings that must match on resume (train_loop)
    scheduler: dict = field(default_factory=dict)  # the LR scheduler's state_dict (plain numbers)
    adjustable: dict = field(default_factory=dict)  # learning rate and clipping, which a resume may change


# ----------------------------------------------------------------------------------------------
# Adapter weights under every backend
# ----------------------------------------------------------------------------------------------


def peft_model(accelerator, model):
    """The PeftModel inside whatever ``prepare`` wrapped it in (DDP, FSDP, DeepSpeed, torch.compile)."""
    return accelerator.unwrap_model(model, keep_torch_compile=False)


def gather_trainable_state(accelerator, model) -> dict | None:
    """The trainable tensors (LoRA matrices, the trained head), whole, under the PEFT model's parameter
    names, on the main process (``None`` elsewhere). Every process must call this.

    Only what trains is gathered: the frozen base never changes and is never saved, and under FSDP or
    ZeRO-3 gathering it would all-gather the whole model at every checkpoint and best-adapter save.
    Sharded tensors are gathered collectively, so that the main process does not save a shard or empty
    tensors (the known peft#453 / accelerate#3732 failures): FSDP through torch's ``get_model_state_dict``
    with ``ignore_frozen_params``, DeepSpeed through its per-parameter fp32 gather (``_gather_deepspeed``).
    """
    unwrapped = peft_model(accelerator, model)
    trainable = [(name, param) for name, param in unwrapped.named_parameters() if param.requires_grad]
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return _gather_deepspeed(accelerator, trainable)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                 ignore_frozen_params=True))
    if not accelerator.is_main_process:
        return None
    # Buffers are not parameters and stay in that state dict: keep the trainable parameters only. Wrapper
    # prefixes (torch.compile, FSDP1 units) are not part of the names PEFT saves under.
    names = {_plain_name(name) for name, _ in trainable}
    return {_plain_name(key): value for key, value in state.items() if _plain_name(key) in names}


WRAPPER_PREFIXES = ("_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def _plain_name(name: str) -> str:
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def _gather_deepspeed(accelerator, trainable: list) -> dict | None:
    """The fp32 weights DeepSpeed's optimizer steps, gathered per trainable parameter on every process.

    Under bf16 the module holds bf16 copies (ZeRO-3: only a slice of each), and the weights the optimizer
    updates are fp32 partitions inside the engine: ``safe_get_full_fp32_param`` gathers those (a
    collective under every stage), so the adapter saved is the one trained, not its bf16 rounding, as
    under DDP and FSDP. ZeRO-3 needs no 16-bit gather of the whole model for it.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    gathered = {name: safe_get_full_fp32_param(param) for name, param in trainable}
    if not accelerator.is_main_process:
        return None
    # None: a parameter DeepSpeed does not partition (no ZeRO stage), whole in the module
    return {name: (tensor if tensor is not None else param).detach().to("cpu", copy=True)
            for (name, param), tensor in zip(trainable, gathered.values())}


def adapter_weights(accelerator, model, state: dict) -> dict:
    """The adapter + head part of a state dict, under PEFT's saved key names, on the CPU."""
    # save_embedding_layers=False: LoRA never touches the embeddings here, and PEFT's default ("auto") asks
    # the Hub whether the base model's vocabulary changed -- a network lookup (or a warning offline) per save.
    adapter = get_peft_model_state_dict(peft_model(accelerator, model), state_dict=state, save_embedding_layers=False)
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in adapter.items()}


def save_adapter(accelerator, model, tokenizer, folder: Path) -> None:
    """The PEFT adapter folder (``AutoPeftModelForSequenceClassification.from_pretrained(folder)``
    reloads it), gathered from every process and written by the main one. Every process calls this."""
    trained = gather_trainable_state(accelerator, model)
    if accelerator.is_main_process:
        lora_setup.save_adapter(peft_model(accelerator, model), tokenizer, folder, state_dict=trained)
    accelerator.wait_for_everyone()


def load_adapter_weights(accelerator, model, weights: dict) -> None:
    """Put saved adapter + head weights (PEFT's saved key names) back into the prepared ``model``."""
    unwrapped = peft_model(accelerator, model)
    # With --lora_bias all, PEFT's saved files also hold the head's bias a second time under its wrapper's
    # inner name (``classifier.modules_to_save.bias``) and the unused original head's bias: copies of a
    # wrapper's insides that no model key matches. The trained head itself is saved as ``classifier.*``.
    weights = {k: v for k, v in weights.items() if ".modules_to_save." not in k and ".original_module." not in k}
    if accelerator.distributed_type == DistributedType.FSDP:
        # Sharded parameters take a full state dict through torch's distributed-checkpoint helpers, keyed
        # by the model's own parameter names: PEFT saves 'lora_A.weight' for 'lora_A.default.weight'.
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        model_keys = _model_keys(unwrapped)
        renamed = {model_keys[k]: v for k, v in weights.items()}
        set_model_state_dict(model, renamed, options=StateDictOptions(full_state_dict=True, strict=False))
        return
    if accelerator.distributed_type == DistributedType.DEEPSPEED and accelerator.state.deepspeed_plugin.zero_stage == 3:
        import deepspeed

        # ZeRO-3 partitions every parameter: gather the trainable ones, write on rank 0, re-partition.
        trainable = [p for p in unwrapped.parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters(trainable, modifier_rank=0):
            if accelerator.is_main_process:
                _set_adapter(unwrapped, weights)
        return
    _set_adapter(unwrapped, weights)


def _set_adapter(peft_model, weights: dict) -> None:
    result = set_peft_model_state_dict(peft_model, weights)
    if result.unexpected_keys:
        raise CheckpointError(f"adapter weights do not fit this model: {result.unexpected_keys[:3]}")


def _model_keys(peft_model) -> dict:
    """``{key as PEFT saves it: the model's parameter name}``: PEFT drops the adapter name from LoRA keys
    (``lora_A.default.weight`` -> ``lora_A.weight``) and the wrapper from trained-in-full modules
    (``classifier.modules_to_save.default.weight`` -> ``classifier.weight``)."""
    name = peft_model.active_adapter
    saved = {}
    for key in peft_model.state_dict():
        if f"modules_to_save.{name}." in key:
            saved[key.replace(f"modules_to_save.{name}.", "")] = key
        elif f".{name}." in key:
            saved[key.replace(f".{name}.", ".")] = key
    return saved


# ----------------------------------------------------------------------------------------------
# Optimizer and RNG states as safetensors + JSON
# ----------------------------------------------------------------------------------------------


def _optimizer_state(accelerator, model, optimizer) -> dict:
    """AdamW's full state, whatever the backend (every process calls this: under FSDP and DeepSpeed the
    state is sharded and gathering it is collective)."""
    if accelerator.distributed_type == DistributedType.FSDP:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer.optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return _deepspeed_optimizer_state(accelerator, model, optimizer)
    return optimizer.state_dict()


def _zero_inner_optimizer(optimizer):
    """The torch AdamW that DeepSpeed's ZeRO optimizer runs over its flat fp32 partitions."""
    return optimizer.optimizer.optimizer  # Accelerate's wrapper -> ZeRO optimizer -> torch AdamW


def _deepspeed_optimizer_state(accelerator, model, optimizer) -> dict:
    """ZeRO keeps an fp32 master copy and AdamW's moments of every trainable parameter in partitions
    inside its engine, and its own checkpoints are pickles. DeepSpeed's ``safe_get_full_*`` helpers
    gather them per parameter (collectively), so we store them like any optimizer state, by name."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    inner = _zero_inner_optimizer(optimizer)
    step = next((s["step"] for s in inner.state.values() if "step" in s), torch.tensor(0.0))
    state = {}
    for name, param in peft_model(accelerator, model).named_parameters():
        if param.requires_grad:
            state[name] = {"fp32": safe_get_full_fp32_param(param).cpu(), "step": torch.as_tensor(step).cpu(),
                           **{key: safe_get_full_optimizer_state(param, key).cpu() for key in ("exp_avg", "exp_avg_sq")}}
    return {"state": state, "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in inner.param_groups]}


def _restore_deepspeed_optimizer(accelerator, model, optimizer, state_dict: dict) -> None:
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    inner = _zero_inner_optimizer(optimizer)
    step = next(iter(state_dict["state"].values()))["step"]
    for group, saved in zip(inner.param_groups, state_dict["param_groups"]):
        group.update({k: v for k, v in saved.items() if k in ("lr", "initial_lr")})
        step_device = "cpu" if not (group.get("fused") or group.get("capturable")) else None  # AdamW's rule
        # AdamW creates its state at the first step: before it, make room, for every fp32 partition ZeRO
        # keeps (stage 3 and stages 1-2 name their lists differently).
        zero = optimizer.optimizer
        flats = (list(group["params"]) + list(getattr(zero, "fp32_partitioned_groups_flat", None) or [])
                 + list(getattr(zero, "single_partition_of_fp32_groups", None) or []))
        for flat in flats:
            inner.state[flat].setdefault("exp_avg", torch.zeros_like(flat))
            inner.state[flat].setdefault("exp_avg_sq", torch.zeros_like(flat))
            inner.state[flat]["step"] = step.clone().to(step_device or flat.device)
    named = dict(peft_model(accelerator, model).named_parameters())
    for name, values in state_dict["state"].items():
        safe_set_full_fp32_param(named[name], values["fp32"].to(accelerator.device))
        for key in ("exp_avg", "exp_avg_sq"):
            safe_set_full_optimizer_state(named[name], values[key].to(accelerator.device), key)


def save_optimizer(state_dict: dict, folder: Path) -> None:
    """``optimizer.state_dict()`` split in two: tensors to safetensors, the rest (groups, scalars) to JSON."""
    tensors, scalars = {}, {}
    for param, values in state_dict["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{param}/{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(param), {})[name] = value
    save_file(tensors, folder / OPTIMIZER_TENSORS)
    keys = {str(param): type(param).__name__ for param in state_dict["state"]}
    (folder / OPTIMIZER_JSON).write_text(json.dumps(
        {"param_groups": state_dict["param_groups"], "scalars": scalars, "keys": keys}))


def load_optimizer(folder: Path) -> dict:
    meta = json.loads((folder / OPTIMIZER_JSON).read_text())
    cast = {key: int if kind == "int" else str for key, kind in meta["keys"].items()}
    state = {cast[key](key): dict(meta["scalars"].get(key, {})) for key in meta["keys"]}
    for name, tensor in load_file(folder / OPTIMIZER_TENSORS).items():
        key, _, field_name = name.rpartition("/")
        state[cast[key](key)][field_name] = tensor
    return {"state": state, "param_groups": meta["param_groups"]}


def _restore_optimizer(accelerator, model, optimizer, state_dict: dict) -> None:
    if accelerator.distributed_type == DistributedType.FSDP:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer.optimizer, optim_state_dict=state_dict,
                                 options=StateDictOptions(full_state_dict=True))
        return
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        _restore_deepspeed_optimizer(accelerator, model, optimizer, state_dict)
        return
    optimizer.load_state_dict(state_dict)


def save_rng_state(path: Path) -> None:
    """This process's generators: Python's and NumPy's as JSON metadata, torch's as byte tensors."""
    numpy_state = np.random.get_state()
    tensors = {"torch_cpu": torch.get_rng_state(), "numpy_keys": torch.from_numpy(numpy_state[1].astype(np.int64))}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = state
    version, words, gauss = random.getstate()
    metadata = {"python": json.dumps([version, list(words), gauss]),
                "numpy": json.dumps([numpy_state[0], *map(float, numpy_state[2:])])}
    save_file(tensors, path, metadata=metadata)


def load_rng_state(path: Path) -> None:
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    version, words, gauss = json.loads(metadata["python"])
    name, position, has_gauss, cached = json.loads(metadata["numpy"])
    random.setstate((version, tuple(words), gauss))
    np.random.set_state((name, tensors["numpy_keys"].numpy().astype(np.uint32), int(position), int(has_gauss), cached))
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[f"torch_cuda_{i}"] for i in range(torch.cuda.device_count()) if f"torch_cuda_{i}" in tensors]
    if cuda:
        torch.cuda.set_rng_state_all(cuda)


# ----------------------------------------------------------------------------------------------
# Save, list, load, resume
# ----------------------------------------------------------------------------------------------


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def list_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first. Half-written ones live under a '.incomplete_' name."""
    if not checkpoint_dir.is_dir():
        return []
    return sorted(p for p in checkpoint_dir.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir())




def save_checkpoint(accelerator, model, optimizer, scheduler, state: TrainState, checkpoint_dir: Path,
                    best_dir: Path | None = None) -> tuple[Path, list[str]]:
    """Write a checkpoint atomically: into a temporary folder, then one rename. Every process calls this
    (the weights are gathered collectively; each process saves its own RNG state).

    Returns the checkpoint folder and the names of the files written into it (on the main process),
    which is all ``prune`` may ever remove again.
    """
    final = checkpoint_dir / checkpoint_name(state.global_step)
    temporary = checkpoint_dir / f"{INCOMPLETE_PREFIX}{final.name}"
    if accelerator.is_main_process:
        if temporary.exists():  # a crash during this very save left it: set aside, never deleted
            move_aside(checkpoint_dir, [temporary])
        temporary.mkdir(parents=True)
    accelerator.wait_for_everyone()
    trained = gather_trainable_state(accelerator, model)
    optimizer_state = _optimizer_state(accelerator, model, optimizer)
    save_rng_state(temporary / f"rng_state_{accelerator.process_index}.safetensors")
    written = [f"rng_state_{rank}.safetensors" for rank in range(accelerator.num_processes)]
    if accelerator.is_main_process:
        unwrapped = peft_model(accelerator, model)
        save_file(adapter_weights(accelerator, model, trained), temporary / ADAPTER_FILE)
        unwrapped.peft_config[unwrapped.active_adapter].save_pretrained(temporary)
        save_optimizer(optimizer_state, temporary)
        if best_dir is not None and (best_dir / ADAPTER_FILE).is_file():
            copied = shutil.copytree(best_dir, temporary / BEST_SUBDIR)
            written += [str(p.relative_to(temporary)) for p in Path(copied).rglob("*") if p.is_file()]
        state.scheduler = scheduler.state_dict()
        state.scheduler.pop("lr_lambdas", None)  # functions; rebuilt from the settings
        record = dataclasses.asdict(state) | {"num_processes": accelerator.num_processes}
        (temporary / STATE_FILE).write_text(json.dumps(record))
        written += [ADAPTER_FILE, "adapter_config.json", OPTIMIZER_TENSORS, OPTIMIZER_JSON, STATE_FILE]
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():  # one checkpoint per step and line: an existing one means a bug, never overwrite it
            raise CheckpointError(f"checkpoint '{final}' already exists; move it away and resume")
        os.replace(temporary, final)
    accelerator.wait_for_everyone()
    return final, written


def prune(written: list[tuple[Path, list[str]]], keep: int, log=print) -> None:
    """Remove all but the newest ``keep`` of the checkpoints this process wrote (``written``: what
    ``save_checkpoint`` returned, oldest first, kept in memory). Only the files named there are
    unlinked, then the folders if that left them empty: a checkpoint this process did not write (one
    it resumed from, an older run's) is never in the list, and nothing on disk can add to it."""
    while len(written) > keep:
        folder, files = written.pop(0)
        for name in files:
            (folder / name).unlink(missing_ok=True)
        for sub in sorted({(folder / name).parent for name in files}, key=lambda p: len(p.parts), reverse=True):
            if sub.is_dir() and not any(sub.iterdir()):
                sub.rmdir()
        if folder.exists():
            log(f"warning: kept '{folder}': it holds files this run did not write")


def read_state(path: Path) -> tuple[TrainState, int]:
    """The loop position, and how many processes wrote the checkpoint."""
    try:
        record = json.loads((path / STATE_FILE).read_text())
        saved_processes = record.pop("num_processes", 1)
        return TrainState(**record), saved_processes
    except (OSError, ValueError, TypeError) as err:
        raise CheckpointError(f"checkpoint '{path}' is damaged ({type(err).__name__}: {err})") from None


def load_checkpoint(accelerator, model, optimizer, scheduler, path: Path) -> TrainState:
    """Restore adapter, optimizer, scheduler and this process's RNG states; return the loop position.
    Call ``verify`` first: it reads every file, so a damaged checkpoint is refused before anything changes."""
    state, saved_processes = read_state(path)
    try:
        load_adapter_weights(accelerator, model, load_file(path / ADAPTER_FILE))
        _restore_optimizer(accelerator, model, optimizer, load_optimizer(path))
        scheduler.load_state_dict({**state.scheduler, "lr_lambdas": [None] * len(optimizer.param_groups)})
    except (RuntimeError, ValueError, KeyError, IndexError, TypeError) as err:
        raise CheckpointError(f"checkpoint '{path}' does not fit this model ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''})") from None
    # Resumed on another number of processes (same global batch, so the same batches and weights), a
    # process without an RNG file of its own keeps its seeded generator: its dropout masks differ.
    rng_file = path / f"rng_state_{accelerator.process_index}.safetensors"
    if rng_file.is_file():
        load_rng_state(rng_file)
    if saved_processes != accelerator.num_processes:
        accelerator.print(f"note: checkpoint written by {saved_processes} process(es), resumed on "
                          f"{accelerator.num_processes}: the same batches and optimizer state; the dropout masks are "
                          "drawn per process, so with dropout on the weights differ slightly from an uninterrupted run")
    return state


def move_aside(checkpoint_dir: Path, folders: list[Path]) -> list[Path]:
    """Rename ``folders`` into ``checkpoints/abandoned/<time>/``; returns their new paths. A name already
    there (two moves within a second) gets a ``-2``, ``-3`` ... suffix: nothing is ever replaced."""
    target = checkpoint_dir / ABANDONED_DIR / time.strftime("%Y%m%d-%H%M%S")
    target.mkdir(parents=True, exist_ok=True)
    moved = []
    for path in folders:
        moved.append(run_dir.unused_path(target / path.name))
        os.replace(path, moved[-1])
    return moved


def verify(path: Path) -> TrainState:
    """Read every file of a checkpoint (each process's RNG state included) without applying anything.

    Every process runs the same check on the same files, so all of them take the same decision about
    a damaged checkpoint: one process falling back to an older checkpoint alone would train alone."""
    state, saved_processes = read_state(path)
    try:
        load_file(path / ADAPTER_FILE)
        load_optimizer(path)
        for rank in range(saved_processes):
            rng_file = path / f"rng_state_{rank}.safetensors"
            if not rng_file.is_file():
                raise FileNotFoundError(f"{rng_file.name} is missing: a resume would draw other random numbers")
            with safe_open(str(rng_file), framework="pt") as handle:
                json.loads(handle.metadata()["python"])
                [handle.get_tensor(k) for k in handle.keys()]
        if state.best_step is not None:  # the best adapter so far travels with the checkpoint: read it now, not at the end
            load_file(path / BEST_SUBDIR / ADAPTER_FILE)
            json.loads((path / BEST_SUBDIR / "adapter_config.json").read_text())
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as err:
        raise CheckpointError(f"checkpoint '{path}' is damaged ({type(err).__name__}: {err})") from None
    return state
