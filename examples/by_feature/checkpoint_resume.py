"""The minimal loop + checkpoints and exact resume. Lines marked `# New`.

    python examples/by_feature/checkpoint_resume.py --checkpoint_every 50 --output_dir outputs/ckpt
    python examples/by_feature/checkpoint_resume.py --output_dir outputs/ckpt \
        --resume_from_checkpoint outputs/ckpt/checkpoints/step_50

tests/test_by_feature.py: a run stopped mid-epoch and resumed from its last checkpoint ends with the
adapter of a run never stopped, bit for bit, dropout on. train_loop.py (checkpointing.py) adds `latest`,
keeping the last K, checking that a resume uses the run's settings and data, and saving under FSDP/DeepSpeed.
"""

import argparse
import json  # New: checkpoints are safetensors + JSON, never pickle (a planted pickle runs code on load)
import math
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors.torch import load_file, save_file  # New

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root: data.py, train_loop.py ...
import data  # noqa: E402
import eval as evaluation  # noqa: E402
import lora_setup  # noqa: E402
import settings  # noqa: E402
import train_loop  # noqa: E402

FLAGS = ["model", "dataset", "output_dir", "eval_size", "max_length", "seed", "lora_r", "lora_alpha", "lora_dropout",
         "num_epochs", "batch_size", "gradient_accumulation_steps", "learning_rate", "weight_decay", "lr_scheduler",
         "warmup_ratio", "max_grad_norm", "eval_batch_size"]
FLAGS += ["checkpoint_every", "resume_from_checkpoint"]  # New: save every N optimizer steps; resume from a folder


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    fields = train_loop.TrainConfig.__dataclass_fields__
    for name in FLAGS:  # train_loop.py's flags: the same names, types, defaults and help
        kind, _ = settings._field_type(name)  # Optional[float] -> float
        parser.add_argument(f"--{name}", type=kind, default=fields[name].default, help=fields[name].metadata["help"])
    return parser.parse_args(argv)


# New: what an exact resume needs. The trainable weights (the frozen base is reloaded from its files),
# AdamW's moments, the schedule's position, every process's random-number state (the next dropout masks)
# and the loop's position. Written to a temporary folder and renamed: a crash never leaves a half checkpoint.
def save_checkpoint(folder: Path, accelerator, model, optimizer, scheduler, position: dict) -> None:
    temporary = folder.with_name(folder.name + ".tmp")
    temporary.mkdir(parents=True, exist_ok=True)
    rng = {"torch": torch.get_rng_state()} | ({"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {})
    save_file(rng, temporary / f"rng_{accelerator.process_index}.safetensors")
    if accelerator.is_main_process:
        state = optimizer.state_dict()
        tensors = {f"adam.{i}.{k}": v for i, s in state["state"].items() for k, v in s.items()}
        tensors |= {f"weight.{n}": p.detach() for n, p in accelerator.unwrap_model(model).named_parameters()
                    if p.requires_grad}
        save_file({k: v.cpu().contiguous() for k, v in tensors.items()}, temporary / "state.safetensors")
        meta = {"position": position, "param_groups": state["param_groups"], "scheduler": scheduler.state_dict()}
        (temporary / "state.json").write_text(json.dumps(meta))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        temporary.rename(folder)
    accelerator.wait_for_everyone()


def load_checkpoint(folder: Path, accelerator, model, optimizer, scheduler) -> dict:  # New: the way back
    tensors, meta = load_file(folder / "state.safetensors"), json.loads((folder / "state.json").read_text())
    for name, param in accelerator.unwrap_model(model).named_parameters():
        if param.requires_grad:
            param.data.copy_(tensors[f"weight.{name}"])
    state = {}
    for key, value in tensors.items():
        if key.startswith("adam."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    rng = load_file(folder / f"rng_{accelerator.process_index}.safetensors")
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"])
    return meta["position"]


def main(argv=None, stop_after=None) -> dict:  # New: stop_after N steps stands in for a crash (tests)
    args = parse_args(argv)
    # `accelerate launch` sets processes and precision; without a GPU they form a group only if cpu=True.
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    set_seed(args.seed)  # seeds the new head, LoRA's A matrices and every dropout mask

    # Data: load, dedupe, split, tokenize once; batches of similar lengths, padded per batch (data.py).
    tokenizer = lora_setup.load_tokenizer(args.model)
    splits = data.load_splits(args.dataset, eval_size=args.eval_size, seed=args.seed)
    train_loader = data.build_dataloader(data.tokenize(splits.train, tokenizer, args.max_length),
                                         tokenizer.pad_token_id, args.batch_size, train=True, seed=args.seed)
    eval_loader = data.build_dataloader(data.tokenize(splits.eval, tokenizer, args.max_length),
                                        tokenizer.pad_token_id, args.eval_batch_size, train=False)

    # Model: pretrained body + new head; LoRA on every projection. Only the adapter and the head train.
    model, head_modules = lora_setup.load_base_model(args.model, splits.label_names, tokenizer.pad_token_id)
    model = lora_setup.apply_lora(model, lora_setup.build_lora_config(
        model, head_modules, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout))
    optimizer = train_loop.build_optimizer(model, args.learning_rate, args.weight_decay)  # AdamW, decay on matrices
    model, optimizer, train_loader, eval_loader = accelerator.prepare(model, optimizer, train_loader, eval_loader)
    # The schedule counts optimizer steps and we step it by hand, unprepared: a prepared scheduler steps
    # once per process per call, N times too fast with N processes. len(train_loader) is per process.
    total_steps = math.ceil(len(train_loader) / args.gradient_accumulation_steps) * args.num_epochs
    warmup = math.ceil(args.warmup_ratio * total_steps)
    scheduler = train_loop.build_scheduler(optimizer, args.lr_scheduler, warmup, total_steps)
    # LoRA's B matrices start at zero, so this scores the untouched model with its new random head.
    metrics = evaluation.evaluate(model, eval_loader, accelerator, splits.label_names)
    accelerator.print(f"before training: accuracy {metrics['accuracy']:.4f}, loss {metrics['loss']:.4f}")
    # New: start where the checkpoint stands. The data order is not saved: it follows from seed + epoch.
    position = {"epoch": 0, "step": 0, "batches": 0}  # epoch, optimizer steps, micro-batches of this epoch done
    if args.resume_from_checkpoint:
        position = load_checkpoint(Path(args.resume_from_checkpoint), accelerator, model, optimizer, scheduler)
    for epoch in range(position["epoch"], args.num_epochs):
        model.train()  # dropout on (evaluation switched it off)
        train_loader.set_epoch(epoch)  # a fresh shuffle, the same on every process
        # New: skip what this epoch already trained on, once (the next epoch starts from its first batch).
        skip = position["batches"]
        batches = accelerator.skip_first_batches(train_loader, skip) if skip else train_loader
        for window in train_loop.accumulation_windows(batches, args.gradient_accumulation_steps):
            # Step on the mean loss over the window's real samples on all processes, as one big batch would: the sum
            # of per-sample losses / their count (a short last window has fewer; filler rows labelled IGNORED_LABEL,
            # which cross_entropy ignores, are not counted) x processes (DDP averages gradients over processes).
            samples = sum(data.real_rows(batch["labels"]).sum() for batch in window)
            scale = accelerator.num_processes / accelerator.reduce(samples, reduction="sum").item()
            for i, batch in enumerate(window):
                # no_sync: processes all-reduce gradients once per window, on its last micro-batch only.
                with accelerator.no_sync(model) if i < len(window) - 1 else nullcontext():
                    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                    loss = F.cross_entropy(logits.float(), batch["labels"], reduction="sum")
                    accelerator.backward(loss * scale)  # gradients add up over the window's micro-batches
            if args.max_grad_norm > 0:
                accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            # New: count the step and save every --checkpoint_every steps (not at an epoch's end: saved below).
            position["step"], position["batches"] = position["step"] + 1, position["batches"] + len(window)
            if position["step"] == stop_after:
                return {"stopped_at": position["step"]}
            mid_epoch = position["batches"] < len(train_loader)
            if args.checkpoint_every and position["step"] % args.checkpoint_every == 0 and mid_epoch:
                save_checkpoint(Path(args.output_dir) / "checkpoints" / f"step_{position['step']}", accelerator, model,
                                optimizer, scheduler, position)
        # Every process must evaluate: evaluate() gathers the predictions of all of them.
        metrics = evaluation.evaluate(model, eval_loader, accelerator, splits.label_names)
        accelerator.print(f"epoch {epoch + 1}: accuracy {metrics['accuracy']:.4f}, loss {metrics['loss']:.4f}")
        position = {"epoch": epoch + 1, "step": position["step"], "batches": 0}  # New: a checkpoint per epoch
        save_checkpoint(Path(args.output_dir) / "checkpoints" / f"step_{position['step']}", accelerator, model,
                        optimizer, scheduler, position)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:  # adapter + head weights, tokenizer and config, reloadable with PEFT
        lora_setup.save_adapter(accelerator.unwrap_model(model), tokenizer, args.output_dir)
    return metrics


if __name__ == "__main__":
    main()
