"""How long are the embedded IMDB reviews in model tokens? The share over each --max_length tells how
much of the data truncation touches (docs/user_paths.md, "Long reviews").

    python bench/imdb_lengths.py [--model embedded:minilm] [--dataset embedded:imdb]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import data  # noqa: E402
import lora_setup  # noqa: E402

LIMITS = (128, 256, 512)


def length_shares(lengths: list[int], limits=LIMITS) -> dict[int, float]:
    """Share of texts longer than each limit (special tokens included, as --max_length counts them)."""
    return {limit: sum(n > limit for n in lengths) / len(lengths) for limit in limits}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="embedded:minilm")
    parser.add_argument("--dataset", default="embedded:imdb")
    args = parser.parse_args()
    tokenizer = lora_setup.load_tokenizer(args.model)
    raw, _ = data.load_raw(args.dataset)  # every row: the figure describes the data, not one split
    texts = sorted(set(raw["text"]))
    lengths = [len(ids) for ids in tokenizer(texts, truncation=False)["input_ids"]]
    lengths.sort()
    print(f"{len(texts)} distinct reviews of {args.dataset}, {args.model} tokens: median {lengths[len(lengths) // 2]}, "
          f"90th percentile {lengths[int(0.9 * len(lengths))]}, max {lengths[-1]}")
    for limit, share in length_shares(lengths).items():
        print(f"longer than {limit:>3} tokens: {100 * share:5.1f} %")


if __name__ == "__main__":
    main()
