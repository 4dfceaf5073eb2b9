"""A small multi-label set from the embedded Rotten Tomatoes reviews, to try several labels per text offline.

Tag 1 is the sentiment (``positive`` or ``negative``); tag 2, ``long``, marks the reviews with more words
than the median of the sample (about half of them). Every row has its sentiment tag.

    python examples/multilabel_rotten_tomatoes.py rt_tags.jsonl          # 3000 reviews, seeded
    accelerate launch train_loop.py --dataset rt_tags.jsonl --label_column labels --eval_size 600 \
        --num_epochs 3 --max_length 64 --tune_thresholds --output_dir outputs/rt_tags
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import data  # noqa: E402


def build(path: str, rows: int = 3000, seed: int = 0) -> float:
    """Write ``rows`` reviews as JSON lines ``{"text", "labels"}``; returns the median word count."""
    import pandas as pd

    frame = pd.read_csv(data.embedded_csv_path())
    frame = frame[frame["source"] == "rotten_tomatoes"].drop_duplicates("text").sample(n=rows, random_state=seed)
    words = frame["text"].str.split().str.len()
    median = float(words.median())
    with open(path, "w") as out:
        for text, label, count in zip(frame["text"], frame["label"], words):
            tags = ["positive" if label == 1 else "negative"] + (["long"] if count > median else [])
            out.write(json.dumps({"text": text, "labels": tags}) + "\n")
    return median


if __name__ == "__main__":
    target = sys.argv[1] if len(sys.argv) > 1 else "rt_tags.jsonl"
    print(f"wrote {target} (long = more than {build(target):.0f} words)")
