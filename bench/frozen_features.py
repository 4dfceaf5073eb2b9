"""What the untouched base model's features already hold: a linear probe on each way of reading a text.

    python bench/frozen_features.py [--seed 42] [--model embedded:minilm]

The base model (no LoRA, no training) encodes the run's train and eval splits (the same seeded split
train_loop.py uses); a logistic regression is fitted on the train split's features and scored on the eval
split, for three readings of the last layer: the [CLS] token, the masked mean of every token (what
all-MiniLM-L6-v2 was trained to be read by) and BERT's pooler over [CLS] (what
``BertForSequenceClassification``'s head reads). It shows where fine-tuning starts from, in about a minute
and a half on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import data  # noqa: E402
import lora_setup  # noqa: E402
import settings  # noqa: E402


@torch.inference_mode()
def features(model, tokenizer, texts: list[str], max_length: int, batch_size: int = 128) -> dict:
    """``{"cls" | "mean" | "pooler": texts x hidden}`` from the last layer."""
    out = {"cls": [], "mean": [], "pooler": []}
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(texts[start:start + batch_size], padding=True, truncation=True, max_length=max_length,
                          return_tensors="pt")
        result = model(**batch)
        hidden, mask = result.last_hidden_state, batch["attention_mask"].unsqueeze(-1).float()
        out["cls"].append(hidden[:, 0])
        out["mean"].append((hidden * mask).sum(1) / mask.sum(1))
        out["pooler"].append(result.pooler_output)
    return {name: torch.cat(parts).numpy() for name, parts in out.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=42, help="the split's seed (train_loop.py --seed)")
    parser.add_argument("--model", default="embedded:minilm")
    parser.add_argument("--dataset", default="embedded:rotten_tomatoes")
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--max_train_samples", type=int, default=None, help="probe on a sample (a quick look)")
    parser.add_argument("--max_eval_samples", type=int, default=None)
    args = parser.parse_args(argv)
    from sklearn.linear_model import LogisticRegression
    from transformers import AutoModel

    cfg = settings.parse_config(["--seed", str(args.seed), "--model", args.model, "--dataset", args.dataset,
                                 *(["--max_train_samples", str(args.max_train_samples)] if args.max_train_samples else []),
                                 *(["--max_eval_samples", str(args.max_eval_samples)] if args.max_eval_samples else [])])
    splits = data.load_run_splits(dataclasses.asdict(cfg))
    tokenizer = lora_setup.load_tokenizer(cfg.model)
    model = AutoModel.from_pretrained(lora_setup.resolve_model(cfg.model)[0]).eval()
    train = features(model, tokenizer, list(splits.train["text"]), args.max_length)
    scored = features(model, tokenizer, list(splits.eval["text"]), args.max_length)
    print(f"{len(splits.train)} train / {len(splits.eval)} eval texts, seed {args.seed}; eval accuracy of a logistic "
          "regression on the frozen features (C = inverse regularisation strength)")
    print("| reading | C=0.1 | C=1 | C=10 |\n|---|---:|---:|---:|")
    for name in ("cls", "mean", "pooler"):
        scores = [LogisticRegression(C=c, max_iter=3000).fit(train[name], splits.train["label"])
                  .score(scored[name], splits.eval["label"]) for c in (0.1, 1.0, 10.0)]
        print(f"| {name} | " + " | ".join(f"{100 * s:.1f} %" for s in scores) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
