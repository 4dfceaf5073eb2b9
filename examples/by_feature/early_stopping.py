"""The minimal loop + early stopping, keeping the best adapter. Lines marked `# New`.

    python examples/by_feature/early_stopping.py --num_epochs 6 --early_stopping_patience 2 --output_dir outputs/es

tests/test_by_feature.py: with scores that rise, then fall twice, the run stops after the second fall and
the saved adapter is the one of the best epoch, bit for bit. train_loop.py does the same (and can also
evaluate every --eval_every steps, and keeps the best adapter inside each checkpoint so a resume keeps it).
"""

import argparse
import math
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root: data.py, train_loop.py ...
import data  # noqa: E402
import eval as evaluation  # noqa: E402
import lora_setup  # noqa: E402
import settings  # noqa: E402
import train_loop  # noqa: E402

FLAGS = ["model", "dataset", "output_dir", "eval_size", "max_length", "seed", "lora_r", "lora_alpha", "lora_dropout",
         "num_epochs", "batch_size", "gradient_accumulation_steps", "learning_rate", "weight_decay", "lr_scheduler",
         "warmup_ratio", "max_grad_norm", "eval_batch_size"]
FLAGS += ["metric_for_best", "early_stopping_patience"]  # New: which score picks the adapter; when to give up


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    fields = train_loop.TrainConfig.__dataclass_fields__
    for name in FLAGS:  # train_loop.py's flags: the same names, types, defaults and help
        kind, _ = settings._field_type(name)  # Optional[float] -> float
        parser.add_argument(f"--{name}", type=kind, default=fields[name].default, help=fields[name].metadata["help"])
    return parser.parse_args(argv)


def main(argv=None) -> dict:
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
    best, evals_without_gain = None, 0  # New: the best score so far, and how many evaluations since it
    for epoch in range(args.num_epochs):
        model.train()  # dropout on (evaluation switched it off)
        train_loader.set_epoch(epoch)  # a fresh shuffle, the same on every process
        for window in train_loop.accumulation_windows(train_loader, args.gradient_accumulation_steps):
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
        # Every process must evaluate: evaluate() gathers the predictions of all of them.
        metrics = evaluation.evaluate(model, eval_loader, accelerator, splits.label_names)
        accelerator.print(f"epoch {epoch + 1}: accuracy {metrics['accuracy']:.4f}, loss {metrics['loss']:.4f}")
        # New: keep the adapter of the best evaluation, not the last one (loss: lower is better, else higher);
        # stop after --early_stopping_patience evaluations without improvement (0: never). Every process
        # takes the same decision, since evaluate() returns the same gathered metrics on all of them.
        score = metrics[args.metric_for_best]
        if best is None or (score < best if args.metric_for_best == "loss" else score > best):
            best, evals_without_gain = score, 0
            if accelerator.is_main_process:  # adapter + head weights, tokenizer and config, reloadable with PEFT
                lora_setup.save_adapter(accelerator.unwrap_model(model), tokenizer, args.output_dir)
        else:
            evals_without_gain += 1
            if evals_without_gain == args.early_stopping_patience:
                break
    accelerator.wait_for_everyone()  # New: the best adapter is already saved (above)
    return {**metrics, "best": best, "epochs": epoch + 1}  # New: what was kept, and when training stopped


if __name__ == "__main__":
    main()
