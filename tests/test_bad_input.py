"""Bad input (issue #14): the README promises that it "stops with one line naming the problem and the
fix, exit code 2, and nothing saved is touched". Every case below goes through an entry point's
``main()`` (train_loop.py or eval.py) and checks exactly that: exit code 2, exactly one ``error:`` line
on stderr matching the case's regex, no traceback, and every file that existed before byte-identical
after (and no file added). Most cases stop before any model is loaded.

Odd-but-good input (a byte-order mark, CRLF, quoted newlines, emoji, a JSON array in a .jsonl file,
reordered columns, an extra eval column, ...) must train and read every row.
"""

import contextlib
import csv
import io
import json
import os
import re
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import sentiment_rows, tiny_args, tiny_config

import data
import eval as evaluation
import lora_setup
import train_loop

REPO = Path(__file__).resolve().parent.parent
ROWS = sentiment_rows(60)  # 60 unique texts, labels 0/1 alternating
NAMED = [(text, ["neg", "pos"][label]) for text, label in ROWS]


def csv_text(rows, header=("text", "label"), delimiter=",", newline="\n") -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter=delimiter, lineterminator=newline)
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def put(folder: Path, name: str, content) -> str:
    path = folder / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


def jsonl(rows, keys=("text", "label")) -> str:
    return "".join(json.dumps(dict(zip(keys, row))) + "\n" for row in rows)


def good(t: Path) -> str:
    return put(t, "reviews.csv", csv_text(ROWS))


def snapshot(*folders: Path) -> dict:
    return {p: p.read_bytes() for folder in folders for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def assert_refused(call, pattern: str, capsys, *folders: Path) -> None:
    """Exit code 2, one `error:` line on stderr and nothing else there, no traceback, no file touched."""
    before = snapshot(*folders)
    capsys.readouterr()  # what fixtures printed (building the tiny model) is not ours
    code = call()
    out, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2, err
    assert len(errors) == 1 and err.strip() == errors[0], err
    assert re.search(pattern, errors[0]), errors[0]
    assert "Traceback" not in out + err
    assert snapshot(*folders) == before


# --- train_loop.py: flags and config files -------------------------------------------------------

def config(name, text):
    return lambda t: (good(t), ["--config", put(t, name, text)])


def flags(*extra):
    return lambda t: (good(t), list(extra))


TRAIN_ERRORS = [
    ("flag-int-given-float", flags("--batch_size", "4.5"), r"--batch_size: invalid int value: '4\.5'"),
    ("flag-unknown", flags("--learning-rate", "1"), r"unrecognized arguments: --learning-rate 1; see --help"),
    ("flag-seed-negative", flags("--seed", "-1"), r"--seed must be in 0\.\.2\*\*32-1 \(got -1\)"),
    ("flag-seed-huge", flags("--seed", str(2**40)), r"--seed must be in 0\.\.2\*\*32-1"),
    ("flag-lr-nan", flags("--learning_rate", "nan"), r"--learning_rate must be a finite number \(got nan\)"),
    ("flag-lr-inf", flags("--learning_rate", "inf"), r"--learning_rate must be a finite number"),
    ("flag-lr-zero", flags("--learning_rate", "0"), r"--learning_rate must be > 0"),
    ("flag-eval-size-fraction-count", flags("--eval_size", "2.5"), r"--eval_size must be a whole number of rows"),
    ("flag-eval-size-zero", flags("--eval_size", "0"), r"--eval_size must be > 0"),
    ("flag-num-labels-one", flags("--num_labels", "1"), r"--num_labels must be at least 2"),
    ("flag-metric-for-best", flags("--metric_for_best", "acuracy"), r"--metric_for_best must be one of accuracy"),
    ("flag-warmup-one", flags("--warmup_ratio", "1"), r"--warmup_ratio must be in \[0, 1\)"),
    ("flag-dropout-one", flags("--lora_dropout", "1.0"), r"--lora_dropout must be in \[0, 1\)"),
    ("flag-max-steps-zero", flags("--max_steps", "0"), r"--max_steps must be a positive integer"),
    ("flag-scheduler", flags("--lr_scheduler", "exp"), r"--lr_scheduler must be linear, cosine or constant"),
    ("flag-bool-value", flags("--overwrite", "yes"), r"unrecognized arguments: yes"),
    ("flag-unknown-tracker", flags("--report_to", "nonsense"), r"--report_to must be one of all, .*tensorboard"),
    ("text-column-is-label-column", flags("--text_column", "label"),
     r"--text_column and --label_column both name column 'label'.*--label_column"),
    ("eval-split-with-local-file", flags("--eval_split", "test"), r"--eval_split applies to Hub datasets.*--eval_file"),
    ("dataset-config-with-local-file", flags("--dataset_config", "sst2"), r"--dataset_config applies to Hub datasets"),
    ("eval-file-with-embedded", lambda t: (good(t), ["--dataset", "embedded:rotten_tomatoes", "--eval_file", good(t)]),
     r"--eval_file goes with a local --dataset file.*drop --eval_file"),
    ("config-int-given-float", config("c.yaml", "batch_size: 4.5\n"),
     r"config file '.*c\.yaml': batch_size must be an integer \(got 4\.5\); fix it in the file"),
    ("config-float-given-word", config("c.yaml", "learning_rate: fast\n"), r"learning_rate must be a number \(got 'fast'\)"),
    ("config-bool-given-word", config("c.yaml", "group_by_length: maybe\n"), r"group_by_length must be true or false"),
    ("config-int-given-bool", config("c.yaml", "seed: true\n"), r"seed must be an integer \(got True\)"),
    ("config-str-given-int", config("c.yaml", "model: 123\n"), r"model must be a string \(got 123\)"),
    ("config-list-given-str", config("c.yaml", "target_modules: query\n"), r"target_modules must be a list of names"),
    ("config-required-null", config("c.yaml", "num_epochs: null\n"), r"num_epochs must be an integer \(got None\)"),
    ("config-not-a-mapping", config("c.yaml", "- lora_r\n- 8\n"), r"must hold settings as `name: value` lines"),
    ("config-unknown-key", config("c.json", '{"learning_rat": 1}'), r"unknown settings \['learning_rat'\]"),
    ("config-bad-yaml", config("c.yaml", "lora_r: [8\n"), r"could not parse config file '.*c\.yaml'"),
    ("config-bad-json", config("c.json", '{"lora_r": 8,}'), r"could not parse config file '.*c\.json'"),
    ("config-latin1", config("c.yaml", "model: caf\xe9\n".encode("latin-1")), r"config file '.*c\.yaml' is not UTF-8"),
    ("config-value-out-of-range", config("c.yaml", "seed: -5\n"), r"--seed must be in 0\.\.2\*\*32-1 \(got -5\)"),
    ("config-missing", lambda t: (good(t), ["--config", str(t / "nope.yaml")]), r"config file '.*nope\.yaml' does not exist"),
    ("config-is-directory", lambda t: (good(t), ["--config", str(t)]), r"config file '.*' is a directory"),
]

# --- train_loop.py: data files -------------------------------------------------------------------

def dataset(name, content, *extra):
    return lambda t: (put(t, name, content), list(extra))


def with_eval(name, content, *extra):
    return lambda t: (good(t), ["--eval_file", put(t, name, content), *extra])


LATIN1 = csv_text([("caf\xe9 " + text, label) for text, label in ROWS]).encode("latin-1")
TRAIN_ERRORS += [
    ("file-latin1", dataset("r.csv", LATIN1), r"train file '.*r\.csv' is not UTF-8 \(byte 0xe9 at offset \d+\).*iconv"),
    ("file-utf16", dataset("r.csv", csv_text(ROWS).encode("utf-16")), r"is a binary file, not UTF-8 text"),
    ("file-binary", dataset("r.csv", bytes(range(256)) * 4), r"train file '.*r\.csv' is a binary file"),
    ("file-zero-bytes", dataset("r.csv", b""), r"train file '.*r\.csv' is empty; give a file with a header"),
    ("file-whitespace-only", dataset("r.csv", "\n \n"), r"train file '.*r\.csv' is empty"),
    ("file-header-only", dataset("r.csv", "text,label\n"), r"train file '.*r\.csv' holds no rows"),
    ("file-row-too-many-fields", dataset("r.csv", "text,label\na,0\nb,1,2\nc,0\n"),
     r"could not parse train file '.*r\.csv' as csv: .*Expected 2 fields in line 3, saw 3"),
    ("file-broken-json", dataset("r.json", '{"text": "a", "label": 0\n{not json'), r"could not parse train file .* as json"),
    ("file-broken-parquet", dataset("r.parquet", b"PAR1 this is not parquet"), r"could not parse train file .* as parquet"),
    ("file-missing", lambda t: (str(t / "nope.csv"), []), r"train file '.*nope\.csv' does not exist"),
    ("file-is-directory", lambda t: (str(t), []), r"train file '.*' is a directory; pass one data file"),
    ("file-unknown-format", dataset("r.txt", "text,label\na,0\n"), r"cannot read train file '.*r\.txt': use one of the formats"),
    ("eval-file-latin1", with_eval("e.csv", LATIN1), r"eval file '.*e\.csv' is not UTF-8"),
    ("eval-file-zero-bytes", with_eval("e.csv", b""), r"eval file '.*e\.csv' is empty"),
    ("eval-file-missing", lambda t: (good(t), ["--eval_file", str(t / "nope.csv")]), r"eval file '.*nope\.csv' does not exist"),
    ("eval-file-is-directory", lambda t: (good(t), ["--eval_file", str(t)]), r"eval file '.*' is a directory"),
    ("eval-file-missing-column", with_eval("e.csv", csv_text(ROWS, header=("text", "y"))),
     r"eval split has no label column 'label'; its columns are \['text', 'y'\]"),
    ("semicolon-csv-wrong-column", dataset("r.csv", csv_text(ROWS, delimiter=";"), "--text_column", "review"),
     r"no text column 'review'; its columns are \['text', 'label'\]"),  # sniffed: the columns are found
    ("text-column-numbers", dataset("r.csv", csv_text([(i, i % 2) for i in range(60)])),
     r"text column 'text' holds 60 value\(s\) that are not text \(row 0: int '0'\).*--text_column"),
    ("text-column-lists", dataset("r.jsonl", jsonl([([1, 2], 0), ("fine", 1)] * 10)),
     r"holds 10 value\(s\) that are not text \(row 0: list '\[1, 2\]'\)"),
    ("text-empty", dataset("r.csv", csv_text([("", 0)] + ROWS)), r"1 empty or missing text.*--drop_empty_texts"),
    ("texts-all-empty-dropped", dataset("r.csv", csv_text([("", 0), (" ", 1)]), "--drop_empty_texts"),
     r"the train split is empty after dropping empty texts"),
    ("label-missing", dataset("r.csv", "text,label\na,0\nb,\nc,1\n"), r"1 row\(s\) have no label"),
    ("label-fraction", dataset("r.csv", csv_text([(t, 0.5) for t, _ in ROWS])), r"must be integers .* found \[0\.5\]"),
    ("label-object", dataset("r.jsonl", jsonl([(t, {"a": y}) for t, y in ROWS])), r"labels must be integers"),
    ("labels-ids-and-names-csv", dataset("r.csv", csv_text(ROWS[:30] + NAMED[30:])),
     r"mixes class ids \[0, 1\] with class names \['neg', 'pos'\].*one way"),
    ("labels-ids-and-names-jsonl", dataset("r.jsonl", jsonl(ROWS[:30] + NAMED[30:])), r"mixes class ids"),
    ("labels-differ-in-case", dataset("r.csv", csv_text([(t, "Pos" if i % 4 == 1 else y) for i, (t, y) in enumerate(NAMED)])),
     r"labels \['Pos', 'pos'\] differ only in upper/lower case"),
    ("labels-not-from-zero", dataset("r.csv", csv_text([(t, y + 1) for t, y in ROWS])),
     r"class id\(s\) \[0\] never occur in the train split.*renumber the labels 0\.\.K-1"),
    ("labels-minus-one", dataset("r.csv", csv_text([(t, y - 1) for t, y in ROWS])), r"outside 0\.\.0.*GLUE"),
    ("labels-over-num-labels", dataset("r.csv", csv_text([(t, i % 3) for i, (t, _) in enumerate(ROWS)]), "--num_labels", "2"),
     r"\[2\] are outside 0\.\.1.*--num_labels"),
    ("labels-one-class", dataset("r.csv", csv_text([(t, 1) for t, _ in ROWS])), r"only one class"),
    ("eval-label-unseen-name", lambda t: (put(t, "r.csv", csv_text(NAMED)),
                                          ["--eval_file", put(t, "e.csv", csv_text([("so so film", "meh")]))]),
     r"eval label\(s\) \['meh'\] never occur in the train split"),
    ("eval-label-unseen-id", with_eval("e.csv", csv_text([("so so film", 2), ("bad film", 0)])),
     r"eval label\(s\) \[2\] never occur in the train split"),
    ("eval-size-too-large", flags("--eval_size", "100"), r"cannot carve a stratified eval split.*--eval_size"),
    ("missing-text-column", flags("--text_column", "review"), r"train split has no text column 'review'.*--text_column"),
    ("missing-label-column", flags("--label_column", "stars"), r"train split has no label column 'stars'.*--label_column"),
    ("unknown-embedded-dataset", flags("--dataset", "embedded:sst2"), r"embedded:rotten_tomatoes, embedded:imdb"),
    ("hub-dataset-offline", flags("--dataset", "no-such-user/no-such-data"), r"could not load dataset 'no-such-user"),
    ("model-missing", flags("--model", "/nonexistent/model"), r"could not load model '/nonexistent/model'"),
    ("csv-duplicate-column", dataset("r.csv", csv_text([(t, y, 1 - y) for t, y in ROWS], header=("text", "label", "label"))),
     r"train file '.*r\.csv' has 2 columns named 'label'; rename or remove all but one"),
    ("eval-csv-duplicate-column", with_eval("e.csv", csv_text([(t, y, t) for t, y in ROWS], header=("text", "label", "text"))),
     r"eval file '.*e\.csv' has 2 columns named 'text'"),
    ("jsonl-malformed-line", dataset("r.jsonl", jsonl(ROWS[:10]) + '{"text": "cut off", "label": \n' + jsonl(ROWS[10:])),
     r"could not parse train file '.*r\.jsonl' as jsonl: line 11 is not valid JSON \(Expecting value, column 30\)"),
    ("json-document-malformed", dataset("r.json", '[\n  {"text": "a", "label": 0},\n  {"text": "b" "label": 1}\n]'),
     r"as json: line 3 is not valid JSON \(Expecting ',' delimiter"),
    ("eval-rows-all-in-train", with_eval("e.csv", csv_text(ROWS[:10])),
     r"every eval row's text also appears in the train data.*dropped from eval.*eval data with other texts, or "
     r"drop --eval_file"),
    ("max-length-beyond-positions", lambda t: (put(t, "r.csv", csv_text([(" ".join([x] * 12), y) for x, y in ROWS])),
                                               ["--max_length", "65"]),
     r"--max_length 65 is more than model '.*' can read: its position embeddings cover 64 tokens; pass "
     r"--max_length 64 or less"),
    ("num-labels-with-class-names", lambda t: (put(t, "r.csv", csv_text(NAMED)), ["--num_labels", "3"]),
     r"--num_labels is 3 but the data names 2 classes \['neg', 'pos'\]; drop --num_labels"),
    ("output-dir-under-proc", flags("--output_dir", "/proc/run"),
     r"--output_dir '/proc/run' cannot be written.*pass a folder you can write to"),
]


@pytest.mark.parametrize("build, pattern", [case[1:] for case in TRAIN_ERRORS], ids=[case[0] for case in TRAIN_ERRORS])
def test_train_loop_refuses_bad_input(build, pattern, tiny_model_dir, tmp_path, capsys):
    dataset_path, extra = build(tmp_path)
    args = tiny_args(tiny_model_dir("bert"), dataset_path, tmp_path / "run", "--eval_size", "20", "--max_steps", "2") + extra
    assert_refused(lambda: train_loop.main(args), pattern, capsys, tmp_path)
    assert not (tmp_path / "run").exists()


@contextlib.contextmanager
def memory_cap(extra_bytes: int):
    """Raise MemoryError instead of filling the machine when the code under test allocates more than
    ``extra_bytes`` beyond what the process holds now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    in_use = int(Path("/proc/self/statm").read_text().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (in_use + extra_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads the process size from /proc (Linux)")
def test_a_huge_class_id_is_refused_without_listing_every_id(tiny_model_dir, tmp_path, capsys):
    """An id column such as 0 / 1099511627776 (a user id taken for the label): the refusal names the missing
    ids without building all 2**40 of them (which filled the memory of the machine)."""
    path = put(tmp_path, "r.csv", csv_text([(t, [0, 2**40][y]) for t, y in ROWS]))
    args = tiny_args(tiny_model_dir("bert"), path, tmp_path / "run", "--eval_size", "20", "--max_steps", "2")
    with memory_cap(2 << 30):
        assert_refused(lambda: train_loop.main(args), r"class id\(s\) \[1, 2, 3, 4, 5\] never occur in the train "
                       r"split \(ids found: \[0, 1099511627776\]\)", capsys, tmp_path)


@pytest.mark.parametrize("suffix", ["csv", "jsonl"])
def test_true_false_labels_are_class_names(suffix, tmp_path):
    rows = [(text, bool(label)) for text, label in ROWS]  # CSV: True/False; JSONL: true/false
    splits, texts = read_all(put(tmp_path, f"r.{suffix}", csv_text(rows) if suffix == "csv" else jsonl(rows)))
    assert splits.label_names == ["False", "True"] and len(texts) == 60
    by_text = dict(rows)
    assert all(splits.label_names[y] == str(by_text[x]) for x, y in zip(splits.train["text"], splits.train["label"]))


@pytest.mark.parametrize("family, limit", [("bert", 64), ("roberta", 69), ("distilbert", 64), ("gpt2", 64),
                                           ("llama", None)])
def test_position_limit_of_each_family(family, limit):
    """RoBERTa numbers positions from padding_idx + 1 (70 embeddings read 69 tokens); Llama's rotary
    positions have no table to run past."""
    from transformers import AutoModel

    assert lora_setup.position_limit(AutoModel.from_config(tiny_config(family))) == limit


# --- odd but good: trains, and every row is read --------------------------------------------------

ODD_TEXTS = [(f"café naïve “quoted” 🎬 {text}", label) for text, label in ROWS]
MULTILINE = [(text.replace(" ", "\n", 1) + ", with a comma", label) for text, label in ROWS]
TRAIN_GOOD = [
    ("utf8-bom", dataset("r.csv", "\ufeff" + csv_text(ROWS))),
    ("crlf", dataset("r.csv", csv_text(ROWS, newline="\r\n"))),
    ("quoted-newlines", dataset("r.csv", csv_text(MULTILINE))),
    ("non-ascii-and-emoji", dataset("r.csv", csv_text(ODD_TEXTS))),
    ("json-array-in-jsonl", dataset("r.jsonl", json.dumps([{"text": t, "label": y} for t, y in ROWS]))),
    ("columns-in-another-order", dataset("r.csv", csv_text([(y, t) for t, y in ROWS], header=("label", "text")))),
    ("extra-column-in-eval-file", lambda t: (put(t, "r.csv", csv_text(ROWS[:40])), ["--eval_file", put(
        t, "e.csv", csv_text([(t_, y, "x") for t_, y in ROWS[40:]], header=("text", "label", "source")))])),
]


@pytest.mark.parametrize("build", [case[1] for case in TRAIN_GOOD], ids=[case[0] for case in TRAIN_GOOD])
def test_odd_but_good_input_trains_on_every_row(build, tiny_model_dir, tmp_path, capsys):
    dataset_path, extra = build(tmp_path)
    out = tmp_path / "run"
    args = tiny_args(tiny_model_dir("bert"), dataset_path, out, "--eval_size", "20", "--max_steps", "2") + extra
    capsys.readouterr()
    assert train_loop.main(args) == 0
    logged = re.search(r"data: (\d+) train / (\d+) eval rows", capsys.readouterr().out)
    train_rows, eval_rows = int(logged[1]), int(logged[2])
    assert (train_rows, eval_rows) == (40, 20)
    assert json.loads((out / "metrics.json").read_text())["final"]["num_samples"] == eval_rows


def read_all(path, **settings):
    splits = data.load_splits(path, **{"eval_size": 20, **settings})
    return splits, list(splits.train["text"]) + list(splits.eval["text"])


# Good input checked with data.load_splits alone (what the trained cases above prove for the loop).
SPLITS_GOOD = [
    ("semicolon-delimited-csv", lambda t: put(t, "r.csv", csv_text(ROWS, delimiter=";")), {}),
    ("tab-delimited-csv", lambda t: put(t, "r.csv", csv_text(ROWS, delimiter="\t")), {}),
    ("pipe-delimited-csv", lambda t: put(t, "r.csv", csv_text(ROWS, delimiter="|")), {}),
    ("tsv", lambda t: put(t, "r.tsv", csv_text(ROWS, delimiter="\t")), {}),
    ("comma-separated-tsv", lambda t: put(t, "r.tsv", csv_text(ROWS)), {}),
    ("bom-jsonl", lambda t: put(t, "r.jsonl", "\ufeff" + jsonl(ROWS)), {}),
    ("integer-strings-are-ids", lambda t: put(t, "r.jsonl", jsonl([(x, str(y)) for x, y in ROWS])), {}),
    ("float-integer-labels", lambda t: put(t, "r.csv", csv_text([(x, float(y)) for x, y in ROWS])), {}),
    ("eval-file-in-another-format", lambda t: put(t, "r.csv", csv_text(ROWS[:40])),
     {"eval_file": "e.jsonl"}),
    ("eval-file-columns-reordered", lambda t: put(t, "r.csv", csv_text(ROWS[:40])), {"eval_file": "e2.csv"}),
]


@pytest.mark.parametrize("build, settings", [case[1:] for case in SPLITS_GOOD], ids=[case[0] for case in SPLITS_GOOD])
def test_odd_but_good_files_read_every_row(build, settings, tmp_path):
    put(tmp_path, "e.jsonl", jsonl(ROWS[40:]))
    put(tmp_path, "e2.csv", csv_text([(y, x) for x, y in ROWS[40:]], header=("label", "text")))
    if "eval_file" in settings:
        settings = {**settings, "eval_file": str(tmp_path / settings["eval_file"])}
    splits, texts = read_all(build(tmp_path), **settings)
    assert sorted(texts) == sorted(text for text, _ in ROWS) and splits.label_names == ["0", "1"]
    by_text = dict(ROWS)
    assert all(by_text[x] == y for x, y in zip(splits.train["text"], splits.train["label"]))


def test_label_whitespace_is_stripped_and_noted(tmp_path):
    rows = [(x, f" {y}  " if i % 3 == 0 else y) for i, (x, y) in enumerate(NAMED)]
    splits, texts = read_all(put(tmp_path, "r.csv", csv_text(rows)))
    assert splits.label_names == ["neg", "pos"] and len(texts) == 60
    assert any("stripped surrounding whitespace" in note and "' neg  '" in note for note in splits.notes)


def test_config_file_values_are_read_like_flags(tmp_path):
    # PyYAML reads 1e-3 as a string; argparse would take it as a float, so the config file does too.
    path = put(tmp_path, "c.yaml", "learning_rate: 1e-3\nlora_r: '8'\nweight_decay: 0\nmax_steps: null\n")
    cfg = train_loop.parse_config(["--config", path])
    assert (cfg.learning_rate, cfg.lora_r, cfg.weight_decay, cfg.max_steps) == (1e-3, 8, 0.0, None)
    assert isinstance(cfg.weight_decay, float)


# --- eval.py -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory):
    """One trained tiny run (labels 0/1) shared by the eval.py cases; each case checks it is untouched."""
    folder = tmp_path_factory.mktemp("run")
    csv_path = put(folder, "reviews.csv", csv_text(ROWS))
    assert train_loop.main(tiny_args(tiny_model_dir("bert"), csv_path, folder / "run", "--eval_size", "20",
                                     "--max_steps", "2")) == 0
    return folder / "run"


def ev(*extra):
    return lambda t, run: ["--adapter_dir", str(run), *extra]


def predict_file(content, *extra):
    return lambda t, run: ["--adapter_dir", str(run), "--predict_file", put(t, "texts.txt", content), *extra]


EVAL_ERRORS = [
    ("predict-file-binary", predict_file(bytes(range(256))), r"--predict_file '.*texts\.txt' is a binary file"),
    ("predict-file-latin1", predict_file("caf\xe9\n".encode("latin-1")), r"--predict_file '.*' is not UTF-8"),
    ("predict-file-empty", predict_file(b""), r"--predict_file '.*texts\.txt' holds no text; write one text per line"),
    ("predict-file-empty-with-output", lambda t, run: predict_file("\n\n", "--output", str(t / "p.csv"))(t, run),
     r"holds no text"),
    ("predict-file-missing", ev("--predict_file", "/nonexistent/texts.txt"), r"--predict_file '.*' does not exist"),
    ("predict-file-is-directory", lambda t, run: ev("--predict_file", str(t))(t, run), r"--predict_file '.*' is a directory"),
    ("output-is-predict-file", lambda t, run: ["--adapter_dir", str(run), "--predict_file",
                                               put(t, "texts.csv", "good film\n"), "--output", str(t / "texts.csv")],
     r"--output '.*texts\.csv' is the --predict_file itself"),
    ("output-suffix", lambda t, run: predict_file("good\n", "--output", str(t / "texts.txt"))(t, run),
     r"--output '.*texts\.txt' must end in \.csv or \.jsonl"),
    ("output-folder-missing", ev("--predict", "good", "--output", "/nonexistent/dir/p.csv"),
     r"folder that does not exist"),
    ("output-is-directory", lambda t, run: ev("--predict", "good", "--output", str(t / "d.csv"))(
        (t / "d.csv").mkdir() or t, run), r"--output '.*d\.csv' is a directory"),
    ("output-without-predict", lambda t, run: ev("--output", str(t / "p.csv"))(t, run), r"--output is where predictions go"),
    ("dataset-with-predict", ev("--predict", "good", "--dataset", "x.csv"), r"--dataset selects data to evaluate on"),
    ("report-with-predict", ev("--predict", "good", "--report"), r"--report does not go with --predict"),
    ("batch-size-zero", ev("--batch_size", "0"), r"--batch_size must be a positive integer"),
    ("batch-size-word", ev("--batch_size", "many"), r"argument --batch_size: invalid int value: 'many'; see --help"),
    ("adapter-dir-not-given", lambda t, run: ["--predict", "good"], r"the following arguments are required: --adapter_dir"),
    ("adapter-dir-missing", lambda t, run: ["--adapter_dir", str(t / "nope"), "--predict", "good"],
     r"holds no saved adapter"),
    ("report-without-metrics", lambda t, run: ["--adapter_dir", str(t), "--report"], r"metrics\.json' does not exist"),
    ("metrics-json-damaged", lambda t, run: ["--adapter_dir", str(Path(put(t, "metrics.json", "{broken")).parent),
                                             "--report"], r"metrics\.json' is damaged"),
    ("text-column-is-label-column", ev("--dataset", "x.csv", "--text_column", "label"),
     r"--text_column and --label_column both name column 'label'"),
    ("eval-dataset-latin1", lambda t, run: ev("--dataset", put(t, "e.csv", LATIN1))(t, run), r"is not UTF-8"),
    ("max-length-beyond-positions", ev("--max_length", "65", "--predict", " ".join(["good film"] * 40)),
     r"--max_length 65 is more than model '.*' can read: its position embeddings cover 64 tokens"),
    ("eval-dataset-other-labels", lambda t, run: ev("--dataset", put(t, "e.csv", csv_text(NAMED)))(t, run),
     r"dataset labels \['neg', 'pos'\] differ from the model's \['0', '1'\]"),
]


@pytest.mark.parametrize("build, pattern", [case[1:] for case in EVAL_ERRORS], ids=[case[0] for case in EVAL_ERRORS])
def test_eval_refuses_bad_input(build, pattern, run_dir, tmp_path, capsys):
    args = build(tmp_path, run_dir)
    assert_refused(lambda: evaluation.main(args), pattern, capsys, tmp_path, run_dir)


def test_eval_predicts_every_line_of_an_odd_but_good_file(run_dir, tmp_path, capsys):
    texts = put(tmp_path, "texts.txt", "\ufeffgood film 🎬\r\n\r\ncafé was dull\r\nfine\r\n")
    out = tmp_path / "p.csv"
    assert evaluation.main(["--adapter_dir", str(run_dir), "--predict_file", texts, "--output", str(out)]) == 0
    rows = list(csv.DictReader(out.open(encoding="utf-8")))
    assert [r["text"] for r in rows] == ["good film 🎬", "café was dull", "fine"]


# --- the real console: nothing but our one line, from a fresh process -----------------------------


@pytest.mark.parametrize("script, build", [
    ("eval.py", lambda t, run: ["--adapter_dir", str(run), "--predict_file", put(t, "t.txt", b"\x00\x01")]),
    ("train_loop.py", lambda t, run: ["--dataset", put(t, "r.csv", LATIN1), "--output_dir", str(t / "run")]),
], ids=["eval", "train_loop"])
def test_console_shows_only_the_error_line(script, build, run_dir, tmp_path):
    result = subprocess.run([sys.executable, script, *build(tmp_path, run_dir)], capture_output=True, text=True,
                            cwd=REPO, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
    assert result.stdout == ""
