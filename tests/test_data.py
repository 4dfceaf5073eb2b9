"""data.py: loading, cleaning, splitting, label handling, collation, and every bad-input message."""

import json

import pytest
import torch
from conftest import make_tokenizer, sentiment_rows, write_csv

import data


def test_collate_pads_to_longest_and_masks_padding():
    rows = [{"input_ids": [5, 6, 7], "labels": 1}, {"input_ids": [8], "labels": 0}]
    batch = data.collate(rows, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [1, 0]
    assert batch["input_ids"].dtype == torch.long


def test_collate_rounds_width_up_to_multiple():
    rows = [{"input_ids": list(range(1, 10)), "labels": 0}, {"input_ids": [1, 2], "labels": 1}]
    batch = data.collate(rows, pad_token_id=99, pad_to_multiple_of=8)
    assert batch["input_ids"].shape == (2, 16)
    assert batch["input_ids"][1, 2:].eq(99).all() and batch["attention_mask"][1].sum() == 2


def test_tokenize_truncates_and_keeps_labels():
    import datasets

    rows = datasets.Dataset.from_dict({"text": ["good film " * 20, "bad"], "label": [1, 0]})
    tokenized = data.tokenize(rows, make_tokenizer(), max_length=8)
    assert tokenized.column_names == ["input_ids", "labels"]
    assert [len(ids) for ids in tokenized["input_ids"]] == [8, 3]  # [CLS] bad [SEP]
    assert list(tokenized["labels"]) == [1, 0]


def test_local_csv_split_is_stratified_deduplicated_and_seeded(tmp_path):
    rows = sentiment_rows(120)
    rows += rows[:10]  # duplicates must not end up on both sides of the split
    path = write_csv(tmp_path / "r.csv", rows)
    first = data.load_splits(str(path), eval_size=30, seed=1)
    again = data.load_splits(str(path), eval_size=30, seed=1)
    assert len(first.train) == 90 and len(first.eval) == 30
    assert sorted(first.eval["label"]) == [0] * 15 + [1] * 15  # stratified
    assert not set(first.train["text"]) & set(first.eval["text"])
    assert list(first.eval["text"]) == list(again.eval["text"])  # seeded
    assert first.label_names == ["0", "1"]


def test_eval_file_rows_seen_in_train_are_dropped(tmp_path):
    rows = sentiment_rows(60)
    train = write_csv(tmp_path / "train.csv", rows[:40])
    evaluation = write_csv(tmp_path / "eval.csv", rows[30:60])  # 10 rows overlap with train
    splits = data.load_splits(str(train), eval_file=str(evaluation))
    assert len(splits.train) == 40 and len(splits.eval) == 20


def test_string_labels_are_mapped_in_sorted_order(tmp_path):
    rows = [(text, ["neg", "pos"][label]) for text, label in sentiment_rows(40)]
    splits = data.load_splits(str(write_csv(tmp_path / "s.csv", rows)), eval_size=10)
    assert splits.label_names == ["neg", "pos"]
    texts = dict(rows)
    for text, label in zip(splits.train["text"], splits.train["label"]):
        assert splits.label_names[label] == texts[text]


def test_custom_column_names_and_jsonl(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps({"review": t, "stars": y}) for t, y in sentiment_rows(40)))
    splits = data.load_splits(str(path), text_column="review", label_column="stars", eval_size=0.25)
    assert len(splits.eval) == 10 and splits.train.column_names == ["text", "label"]


def test_subsampling(tmp_path):
    splits = data.load_splits(str(write_csv(tmp_path / "r.csv", sentiment_rows(100))), eval_size=20,
                              max_train_samples=30, max_eval_samples=7)
    assert (len(splits.train), len(splits.eval)) == (30, 7)


def test_embedded_rotten_tomatoes_default():
    splits = data.load_splits("embedded:rotten_tomatoes")
    assert splits.label_names == ["negative", "positive"]
    assert len(splits.eval) == 1000 and sum(splits.eval["label"]) == 500
    assert len(splits.train) + len(splits.eval) == len(set(splits.train["text"]) | set(splits.eval["text"]))


def test_embedded_imdb_has_no_html_breaks():
    splits = data.load_splits("embedded:imdb", max_train_samples=500)
    assert not any("<br" in t for t in splits.train["text"])


# --- bad input: one clear message naming the problem and the fix -------------------------------


@pytest.mark.parametrize(
    "rows, kwargs, message",
    [
        ([("a", 0)], {"text_column": "review"}, "no text column 'review'.*--text_column"),
        ([("a", 0)], {"label_column": "y"}, "no label column 'y'.*--label_column"),
        ([(f"t{i}", i % 3 - 1) for i in range(20)], {}, r"outside 0\.\.1.*GLUE"),
        ([(f"t{i}", i % 3) for i in range(20)], {"num_labels": 2}, r"\[2\] are outside 0\.\.1.*--num_labels"),
        ([(f"t{i}", 0.5) for i in range(20)], {}, "must be integers"),
        ([(f"t{i}", 1) for i in range(20)], {"eval_size": 4}, "only one class"),
        ([("", 0), ("b", 1), ("c", 0)], {}, r"1 empty or missing text.*--drop_empty_texts"),
        ([(f"t{i}", i % 2) for i in range(6)], {"eval_size": 10}, "cannot carve.*--eval_size"),
    ],
    ids=["missing-text-column", "missing-label-column", "label-minus-one", "label-out-of-range",
         "float-labels", "one-class", "empty-text", "eval-too-large"],
)
def test_bad_data_messages(tmp_path, rows, kwargs, message):
    path = write_csv(tmp_path / "bad.csv", rows)
    with pytest.raises(data.DataError, match=message):
        data.load_splits(str(path), **{"eval_size": 2, **kwargs})


def test_empty_texts_can_be_dropped(tmp_path):
    rows = [("", 0)] + sentiment_rows(20)
    splits = data.load_splits(str(write_csv(tmp_path / "r.csv", rows)), eval_size=4, drop_empty_texts=True)
    assert len(splits.train) + len(splits.eval) == 20


def test_missing_label_value(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text("text,label\na,0\nb,\nc,1\n")
    with pytest.raises(data.DataError, match="1 row.*no label"):
        data.load_splits(str(path), eval_size=1)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_text("text,label\n")
    with pytest.raises(data.DataError, match="train file .*empty.csv' holds no rows"):
        data.load_splits(str(path))


def test_missing_file():
    with pytest.raises(data.DataError, match="train file '/nonexistent/reviews.csv' does not exist"):
        data.load_splits("/nonexistent/reviews.csv")


def test_unparsable_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"text": "a", "label": 0\n{not json at all')
    with pytest.raises(data.DataError, match="could not parse"):
        data.load_splits(str(path))


def test_unknown_hub_dataset_fails_fast_offline():
    with pytest.raises(data.DataError, match="could not load dataset 'no-such-user/no-such-data'.*embedded"):
        data.load_splits("no-such-user/no-such-data")


def test_unknown_embedded_dataset():
    with pytest.raises(data.DataError, match="embedded:rotten_tomatoes, embedded:imdb"):
        data.load_splits("embedded:sst2")


# --- sampler -------------------------------------------------------------------------------------


def test_length_grouped_sampler_batches_are_homogeneous_and_random():
    lengths = [(i * 37) % 101 + 1 for i in range(1000)]
    sampler = data.LengthGroupedSampler(lengths, batch_size=10, seed=3, mega_batch_factor=10)
    order = list(sampler)
    assert sorted(order) == list(range(1000))
    batches = [order[i:i + 10] for i in range(0, 1000, 10)]
    spread = sum(max(lengths[j] for j in b) - min(lengths[j] for j in b) for b in batches) / len(batches)
    assert spread < 15  # a random batch of this data spans ~90 length units
    firsts = [max(lengths[j] for j in b) for b in batches]
    assert firsts != sorted(firsts, reverse=True) and firsts != sorted(firsts)  # batch order is shuffled
    assert list(sampler) == order  # same seed + epoch: same order
    sampler.set_epoch(1)
    assert list(sampler) != order


def test_sampler_keeps_partial_batch_last():
    lengths = list(range(1, 24))
    order = list(data.LengthGroupedSampler(lengths, batch_size=5, seed=0, mega_batch_factor=2))
    full = [order[i:i + 5] for i in range(0, 20, 5)]
    # every full batch is one sorted chunk of a mega-batch, so its lengths are contiguous in a sort
    assert all(len(b) == 5 for b in full) and len(order[20:]) == 3


def test_padding_share_improves_with_grouping():
    tokenizer = make_tokenizer()
    import datasets

    texts = [(t, y) for t, y in sentiment_rows(400)]
    ds = datasets.Dataset.from_dict({"text": [t for t, _ in texts], "label": [y for _, y in texts]})
    tokenized = data.tokenize(ds, tokenizer, 64)
    grouped = data.real_token_share(data.build_dataloader(tokenized, 0, 16, train=True))
    plain = data.real_token_share(data.build_dataloader(tokenized, 0, 16, train=True, group_by_length=False))
    assert grouped > 0.95 > plain


# --- one way to rebuild a run's splits (issue #9.7), GLUE-style test labels (issue #9.9) -----------


def test_run_splits_take_every_split_setting_of_train_config():
    import inspect

    import train_loop

    fields = {f.name: f.default for f in train_loop.dataclasses.fields(train_loop.TrainConfig)}
    parameters = inspect.signature(data.load_splits).parameters
    assert set(data.SPLIT_SETTINGS) == set(parameters) and set(data.SPLIT_SETTINGS) <= set(fields)
    assert all(parameters[k].default == fields[k] for k in data.SPLIT_SETTINGS)  # missing keys: same defaults


def test_class_label_eval_split_without_labels_is_refused(monkeypatch):
    import datasets

    names = datasets.ClassLabel(names=["negative", "positive"])
    features = datasets.Features({"text": datasets.Value("string"), "label": names})
    rows = sentiment_rows(40)
    train = datasets.Dataset.from_dict({"text": [t for t, _ in rows], "label": [y for _, y in rows]}, features=features)
    test = datasets.Dataset.from_dict({"text": ["a b", "c d"], "label": [-1, -1]}, features=features)
    monkeypatch.setattr(data, "load_raw", lambda *args, **kwargs: (train, test))
    with pytest.raises(data.DataError, match=r"the eval split has 2 unlabelled row\(s\).*--eval_split validation"):
        data.load_splits("glue/sst2", eval_split="test")


def test_a_small_dataset_with_default_settings_holds_out_a_fifth_with_every_class(tmp_path):
    """A 450-row, 3-class CSV with every setting left at its default: 1,000 eval rows cannot be carved,
    so the default becomes 20 % (90 rows), every class on both sides, and the log says so."""
    path = write_csv(tmp_path / "three.csv", sentiment_rows(450, num_classes=3))
    splits = data.load_splits(str(path))
    assert (len(splits.train), len(splits.eval)) == (360, 90)
    assert set(splits.train["label"]) == set(splits.eval["label"]) == {0, 1, 2}
    assert any("held out 90 of 450 rows" in note for note in splits.notes)
    big = write_csv(tmp_path / "big.csv", sentiment_rows(6000))
    assert len(data.load_splits(str(big)).eval) == 1000  # larger data: the 1,000 rows of before, no note
