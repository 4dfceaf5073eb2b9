"""bench/bench_speed.py on a tiny model: every run trains the same number of steps on the same data,
the table holds every figure the issue asks for, and the results are written."""

import dataclasses
import json

import pytest
import torch

import data
import lora_setup
import train_loop
from bench import bench_speed


@pytest.fixture(scope="module")
def tiny_benchmark(tiny_model_dir, tmp_path_factory):
    from conftest import sentiment_rows, write_csv

    csv_path = write_csv(tmp_path_factory.mktemp("bench") / "reviews.csv", sentiment_rows(200))
    cfg = train_loop.TrainConfig(model=tiny_model_dir("bert"), dataset=str(csv_path), eval_size=40, batch_size=8,
                                 max_length=32, max_steps=3, learning_rate=5e-3, lora_r=4, lora_alpha=8)
    # One thread: a 16-wide model gains nothing from more, and on a busy machine OpenMP's waiting
    # threads make its tiny steps several times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    progress = []  # rows reported after each run, as the bench writes them to disk
    try:
        rows, meta = bench_speed.run_benchmark(cfg, warmup=1, on_progress=lambda rows, meta: progress.append(len(rows)))
    finally:
        torch.set_num_threads(threads)
    assert progress == [1, 2, 3, 4, 5, 6]
    return cfg, rows, meta


def test_every_run_trains_the_same_steps_and_samples(tiny_benchmark):
    cfg, rows, meta = tiny_benchmark
    assert [r["arm"] for r in rows] == ["a", "b", "c", "d", "e", "tfidf"]
    trained = rows[:5]
    for row in trained:
        assert row["optimizer_steps"] == 3 and row["samples"] == 3 * cfg.batch_size, row["arm"]
        assert row["samples_per_s"] > 0 and row["train_seconds"] <= row["wall_seconds"]
        assert 0 < row["real_token_share"] <= 1 and row["peak_rss_mb"] > 0
        assert 0 <= row["accuracy"] <= 1 and 0 <= row["f1"] <= 1
        split = [row[f"{phase}_ms_per_step"] for phase in ("forward", "backward", "optimizer")]
        assert all(ms > 0 for ms in split) and sum(split) < 1000 * row["train_seconds"] / 3
    by_arm = {r["arm"]: r for r in rows}
    assert by_arm["a"]["real_token_share"] > by_arm["b"]["real_token_share"]  # grouping removes padding
    # Accelerate seeds the Trainer's random sampler exactly as our sampler seeds its shuffle, so (b) and
    # (c) train on the very same batches: the only difference between them is the loop.
    assert by_arm["b"]["real_tokens_per_batch"] == by_arm["c"]["real_tokens_per_batch"]
    # (e) is (a) with PyTorch's dropout: the same batches, a different dropout mask.
    assert by_arm["e"]["real_tokens_per_batch"] == by_arm["a"]["real_tokens_per_batch"]
    assert by_arm["c"]["vs_c"] == pytest.approx(1.0) and by_arm["d"]["vs_d"] == pytest.approx(1.0)
    assert by_arm["a"]["vs_d"] == pytest.approx(by_arm["a"]["samples_per_s"] / by_arm["d"]["samples_per_s"])
    assert "samples_per_s" not in by_arm["tfidf"] and by_arm["tfidf"]["accuracy"] > 0.5
    assert meta["train_rows"] == 160 and meta["eval_rows"] == 40 and meta["max_steps"] == 3
    assert set(meta["collate_ms_per_batch"]) == {"ours", "DataCollatorWithPadding"}


def test_table_and_files(tiny_benchmark, tmp_path):
    _, rows, meta = tiny_benchmark
    table = bench_speed.format_table(rows, meta)
    for header in ("samples/s", "real-token share", "peak memory (MB)", "wall s", "accuracy", "F1", "x (c)", "x (d)",
                   "forward ms", "backward + clip ms", "data + other ms"):
        assert header in table
    body = [line for line in table.splitlines() if line.startswith("| (") or line.startswith("| TF-IDF")]
    assert len(body) == 6 + 5  # the main table, then the time split of the five trained runs
    assert body[5].startswith("| TF-IDF") and body[5].count(" - ") >= 5  # the baseline has no speed figures
    output = tmp_path / "results" / "tiny.md"
    bench_speed.write_results(rows, meta, table, output)
    assert output.read_text().strip() == table
    assert json.loads(output.with_suffix(".json").read_text())["rows"][0]["arm"] == "a"


def test_median_run_keeps_every_repeat():
    runs = [{"samples_per_s": s, "train_seconds": 1.0, "accuracy": 0.8, "f1": 0.8, "arm": "a"} for s in (3.0, 1.0, 2.0)]
    row = bench_speed.median_run(runs)
    assert row["samples_per_s"] == 2.0 and [r["samples_per_s"] for r in row["repeats"]] == [3.0, 1.0, 2.0]


def test_arguments_pass_train_loop_flags_through():
    args, cfg = bench_speed.parse_args(["--arms", "a", "d", "--dataset", "embedded:imdb", "--max_length", "512",
                                        "--batch_size", "16", "--max_eval_samples", "500"])
    assert args.arms == ["a", "d"] and cfg.max_steps is None  # one epoch, counted once the data is loaded
    assert (cfg.dataset, cfg.max_length, cfg.batch_size, cfg.max_eval_samples) == ("embedded:imdb", 512, 16, 500)
    assert bench_speed.default_output(cfg).name == "imdb_len512_bs16_stepsepoch.md"
    assert bench_speed.parse_args(["--max_steps", "20"])[1].max_steps == 20
    with pytest.raises(train_loop.ConfigError):
        bench_speed.parse_args(["--max_steps", "0"])


def test_without_max_steps_every_run_trains_one_epoch(tiny_benchmark):
    cfg, _, _ = tiny_benchmark
    job = bench_speed.prepare_job(dataclasses.replace(cfg, max_steps=None, batch_size=16))
    assert job.cfg.max_steps == 10  # 160 training rows / 16 per step


def test_profile_shows_the_dropout_masks_that_fast_dropout_removes(tiny_benchmark):
    from bench import profile_step

    cfg, _, _ = tiny_benchmark

    def bernoulli_calls(fast_dropout: bool) -> int:
        profiler, seconds = profile_step.profile_steps(dataclasses.replace(cfg, fast_dropout=fast_dropout), 2, 1)
        assert seconds > 0
        calls = {event.key: event.count for event in profiler.key_averages()}
        assert calls.get("aten::mm", 0) + calls.get("aten::addmm", 0) > 0  # the model's matmuls were profiled
        return calls.get("aten::bernoulli_", 0)

    # PyTorch's dropout draws every mask with bernoulli_; FastDropout leaves only the one inside attention.
    assert bernoulli_calls(False) > bernoulli_calls(True)


def test_scripts_call_only_what_our_modules_define():
    """bench/, scripts/ and examples/ run rarely (some only on a GPU): a function moved between our modules
    must not first fail there, after minutes of work. Every `module.name` they use on one of our modules
    (imported by its own name or an alias) must exist."""
    import ast
    import importlib
    from pathlib import Path

    root = Path(train_loop.__file__).resolve().parent
    ours = {p.stem for p in root.glob("*.py")}
    missing = []
    for script in sorted([*root.glob("bench/*.py"), *root.glob("scripts/*.py"), *root.glob("examples/*.py")]):
        tree = ast.parse(script.read_text())
        aliases = {(alias.asname or alias.name): alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                   for alias in node.names if alias.name in ours}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
                if not hasattr(importlib.import_module(aliases[node.value.id]), node.attr):
                    missing.append(f"{script.relative_to(root)}:{node.lineno} {node.value.id}.{node.attr}")
    assert not missing, missing


def test_every_arm_trains_on_the_tokens_the_run_settings_cut(tiny_model_dir, tmp_path):
    """The Trainer arms read the job's tokens, ours get theirs from train_loop.setup: both cut by --truncation
    (the job's were always cut at the head, so with --truncation tail the arms trained on other tokens)."""
    from conftest import sentiment_rows, write_csv

    import data

    csv_path = write_csv(tmp_path / "reviews.csv", sentiment_rows(60))
    cfg = train_loop.TrainConfig(model=tiny_model_dir("bert"), dataset=str(csv_path), eval_size=20, batch_size=8,
                                 max_length=6, truncation="tail", max_steps=1, lora_r=4, lora_alpha=8)
    job = bench_speed.prepare_job(cfg)
    tail = data.tokenize(job.splits.train, job.tokenizer, 6, "tail")["input_ids"]
    assert tail != data.tokenize(job.splits.train, job.tokenizer, 6, "head")["input_ids"]  # the cut matters here
    assert job.train_tokens["input_ids"] == tail
    run = bench_speed.setup_our_loop(job, group_by_length=True, fast_dropout=True, max_steps=1)
    assert run.label_names == job.splits.label_names and run.accelerator.device == job.accelerator.device


def test_trainer_with_our_settings_gets_our_loader_optimizer_and_compile(tiny_model_dir, tmp_path, monkeypatch):
    """Runs (g)/(h) give the Trainer what our loop does on a GPU, so that they compare the loops, not the settings."""
    from conftest import sentiment_rows, write_csv

    csv_path = write_csv(tmp_path / "reviews.csv", sentiment_rows(60))
    cfg = train_loop.TrainConfig(model=tiny_model_dir("bert"), dataset=str(csv_path), eval_size=20, batch_size=8,
                                 max_length=16, max_steps=2, lora_r=4, lora_alpha=8)
    job = bench_speed.prepare_job(cfg)
    monkeypatch.setattr(bench_speed.Job, "on_gpu", property(lambda self: True))  # the settings a GPU run gets
    ours = bench_speed.our_settings(job, compile=True)
    loader = data.loader_options(cfg.num_workers, True)
    assert ours == {**loader, "fused": True, "compile": True} and loader["pad_to_multiple_of"] == 8
    args = bench_speed.trainer_arguments(job, True, str(tmp_path / "trainer"), ours)
    assert (args.dataloader_num_workers, args.dataloader_pin_memory) == (loader["num_workers"], loader["pin_memory"])
    assert args.optim == "adamw_torch_fused" and args.torch_compile and args.train_sampling_strategy == "group_by_length"
    job.accelerator = train_loop.build_accelerator(cfg)  # TrainingArguments reset Accelerate's state; a Trainer rebuilds it
    defaults = bench_speed.trainer_arguments(job, False, str(tmp_path / "trainer"))
    assert defaults.dataloader_num_workers == 0 and not defaults.torch_compile


def test_a_random_init_model_has_the_shape_asked_and_minilms_tokenizer(tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    folder = bench_speed.save_random_model("tiny", tmp_path / "model", seed=0)
    config = AutoConfig.from_pretrained(folder)
    assert (config.num_hidden_layers, config.hidden_size) == (2, 32)
    minilm = lora_setup.load_tokenizer("embedded:minilm")
    assert AutoTokenizer.from_pretrained(folder).get_vocab() == minilm.get_vocab()
    assert config.vocab_size == len(minilm)
    assert bench_speed.MODEL_SHAPES["bert-base"] == dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                                         intermediate_size=3072)


def test_timed_warmup_must_leave_steps_to_measure(capsys):
    assert bench_speed.main(["--max_steps", "5", "--timed_warmup_steps", "5"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --timed_warmup_steps 5 leaves no step to measure in --max_steps 5; give it a number from 0 to "
        "max_steps - 1"]
