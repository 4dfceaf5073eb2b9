"""Trust: nothing the tool did not write is deleted, nothing in a checkpoint is executed, and every
documented flag means what it says. One test per defect of issue #9; each failed on commit 613c913.

These drive ``train_loop.main`` as a user would (flags in, exit code and files out), so they test the
behaviour, not the implementation.
"""

import dataclasses
import json
import pickle
from pathlib import Path

import pytest
import torch
from conftest import sentiment_rows, tiny_args, write_csv
from safetensors.torch import load_file

import resume
import train_loop

FAST = ["--max_length", "16", "--eval_size", "16"]


def snapshot(folder: Path) -> dict:
    """Every file under ``folder`` with its bytes: compared before and after an operation."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def checkpointed_run(model: str, csv: str, out: Path) -> tuple[Path, list[str]]:
    """A finished 4-step run with checkpoints at steps 2 and 4; returns its output dir and flags."""
    args = tiny_args(model, csv, out, "--max_steps", "4", "--checkpoint_every", "2", *FAST)
    assert train_loop.main(args) == 0
    return out, args


@pytest.fixture
def csv48(tmp_path):
    return str(write_csv(tmp_path / "reviews.csv", sentiment_rows(48)))


# 1. --overwrite deletes only what the tool wrote ----------------------------------------------------


def test_overwrite_refuses_a_folder_holding_files_the_tool_did_not_write(tiny_model_dir, csv48, tmp_path, capsys):
    thesis = tmp_path / "thesis"
    (thesis / "chapters").mkdir(parents=True)
    (thesis / "thesis.tex").write_text("\\documentclass{book}")
    (thesis / "chapters" / "one.tex").write_text("Once upon a time")
    before = snapshot(thesis)
    assert train_loop.main(tiny_args(tiny_model_dir(), csv48, thesis, "--max_steps", "1", "--overwrite", *FAST)) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "holds no run of this tool" in line
    assert "--overwrite to" not in line  # never advises the flag
    assert snapshot(thesis) == before


def test_overwrite_of_a_run_moves_it_aside_whole_with_the_users_files(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    dataset = write_csv(out / "data.csv", sentiment_rows(48))  # the dataset lives inside the output dir
    args = tiny_args(tiny_model_dir(), str(dataset), out, "--max_steps", "1", *FAST)
    assert train_loop.main(args) == 2  # an input inside the output dir: refused
    elsewhere = tmp_path / "run2"
    assert train_loop.main(tiny_args(tiny_model_dir(), str(dataset), elsewhere, "--max_steps", "1", *FAST)) == 0
    (elsewhere / "notes.txt").write_text("mine")  # the user adds a file to a finished run
    before = snapshot(elsewhere)
    assert train_loop.main(tiny_args(tiny_model_dir(), str(dataset), elsewhere, "--max_steps", "2", "--overwrite",
                                     *FAST)) == 0
    assert json.loads((elsewhere / "metrics.json").read_text())["optimizer_steps"] == 2
    [aside] = tmp_path.glob("run2.previous-*")
    assert snapshot(aside) == before  # the previous run, the user's notes included, byte for byte
    assert dataset.exists()


@pytest.mark.parametrize("where", ["cwd", "parent", "home"])
def test_overwrite_never_applies_to_the_working_home_or_parent_directory(tiny_model_dir, csv48, tmp_path, monkeypatch,
                                                                         capsys, where):
    work = tmp_path / "work" / "project"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(tmp_path / "work"))
    target = {"cwd": ".", "parent": "..", "home": "~"}[where]
    assert train_loop.main(tiny_args(tiny_model_dir(), csv48, target, "--max_steps", "1", "--overwrite", *FAST)) == 2
    assert "never moves those" in one_error_line(capsys.readouterr().err)
    assert work.is_dir()


# 2. --overwrite with --resume_from_checkpoint ---------------------------------------------------------


def test_overwrite_with_resume_is_refused_and_deletes_nothing(tiny_model_dir, csv48, tmp_path, capsys):
    out, args = checkpointed_run(tiny_model_dir(), csv48, tmp_path / "run")
    before = snapshot(out)
    capsys.readouterr()
    assert train_loop.main(args + ["--overwrite", "--resume_from_checkpoint", "latest"]) == 2
    assert "contradict" in one_error_line(capsys.readouterr().err)
    assert snapshot(out) == before


def test_every_checkpoint_damaged_advises_overwrite_only_as_a_move(
        tiny_model_dir, csv48, tmp_path, capsys):
    out, args = checkpointed_run(tiny_model_dir(), csv48, tmp_path / "run")
    for checkpoint in (out / "checkpoints").glob("step_*"):
        (checkpoint / "trainer_state.json").write_text("{ damaged")
    capsys.readouterr()
    assert train_loop.main(args + ["--resume_from_checkpoint", "latest"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "damaged" in line and ("--overwrite" not in line or "moves this run aside" in line)


# 3. Resuming from an older checkpoint starts a new line ----------------------------------------------


def test_resume_from_an_older_checkpoint_moves_the_abandoned_line_aside(tiny_model_dir, csv48, tmp_path, capsys):
    out = tmp_path / "run"
    args = tiny_args(tiny_model_dir(), csv48, out, "--max_steps", "8", "--checkpoint_every", "2",
                     "--keep_checkpoints", "5", *FAST)
    assert train_loop.main(args) == 0
    old_line = {p.name: snapshot(p) for p in (out / "checkpoints").glob("step_*")}
    # 32 train rows / batch 8 = 4 steps an epoch: checkpoints every 2 steps and at each epoch end.
    assert set(old_line) == {"step_00000002", "step_00000004", "step_00000006", "step_00000008"}
    capsys.readouterr()
    resumed = args[:-len(FAST)] + ["--keep_checkpoints", "2", "--learning_rate", "5e-3", *FAST,
                                   "--resume_from_checkpoint", str(out / "checkpoints" / "step_00000004")]
    assert train_loop.main(resumed) == 0
    log = capsys.readouterr().out
    assert "moved the 2 newer checkpoint(s) aside" in log
    # The old line's newer checkpoints are kept, byte for byte, under checkpoints/abandoned/ ...
    abandoned = {p.name: snapshot(p) for p in (out / "checkpoints" / "abandoned").glob("*/step_*")}
    assert abandoned == {k: v for k, v in old_line.items() if k > "step_00000004"}
    # ... and `latest` now means the newest checkpoint of the new line, which used the new learning rate.
    newest = train_loop.checkpointing.list_checkpoints(out / "checkpoints")[-1]
    assert newest.name == "step_00000008"
    assert json.loads((newest / "trainer_state.json").read_text())["adjustable"]["learning_rate"] == 5e-3


# 4. Nothing in a checkpoint is ever unpickled ----------------------------------------------------------


class Planted:
    """Unpickling this creates a marker file: proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "code ran"))


def test_planted_pickles_in_a_checkpoint_never_run(tiny_model_dir, csv48, tmp_path, capsys):
    out, args = checkpointed_run(tiny_model_dir(), csv48, tmp_path / "run")
    checkpoint = out / "checkpoints" / "step_00000002"
    marker = tmp_path / "marker"
    names = ["custom_checkpoint_0.pkl", "optimizer.bin", "random_states_0.pkl", "scaler.pt", "pytorch_model.bin"]
    for name in names:
        with open(checkpoint / name, "wb") as handle:
            pickle.dump(Planted(marker), handle)
        torch.save({"x": Planted(marker)}, checkpoint / f"torch_{name}")
    capsys.readouterr()
    # Resumed in its own dir and into a new one, the checkpoint's own files load and the planted ones are ignored.
    assert train_loop.main(args + ["--resume_from_checkpoint", str(checkpoint)]) == 0
    fresh = tmp_path / "fresh"
    assert train_loop.main(tiny_args(tiny_model_dir(), csv48, fresh, "--max_steps", "4", *FAST,
                                     "--resume_from_checkpoint", str(checkpoint))) == 0
    assert not marker.exists()


def test_a_missing_rng_state_is_reported(tiny_model_dir, csv48, tmp_path, capsys):
    out, args = checkpointed_run(tiny_model_dir(), csv48, tmp_path / "run")
    checkpoint = out / "checkpoints" / "step_00000002"
    (checkpoint / "rng_state_0.safetensors").unlink()
    capsys.readouterr()
    assert train_loop.main(tiny_args(tiny_model_dir(), csv48, tmp_path / "new", "--max_steps", "4", *FAST,
                                     "--resume_from_checkpoint", str(checkpoint))) == 2
    assert "rng_state_0.safetensors is missing" in one_error_line(capsys.readouterr().err)


# 5. --metric_for_best: direction and name ---------------------------------------------------------------


def test_metric_for_best_loss_keeps_the_lowest_loss(tiny_model_dir, csv48, tmp_path):
    out = tmp_path / "run"
    # A learning rate this high makes the eval loss go up and down between evaluations.
    args = tiny_args(tiny_model_dir(), csv48, out, "--max_steps", "10", "--eval_every", "1", "--learning_rate", "0.3",
                     "--lr_scheduler", "constant", "--warmup_ratio", "0", "--metric_for_best", "loss", *FAST)
    assert train_loop.main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    losses = [h["eval/loss"] for h in metrics["history"] if "eval/loss" in h]
    assert min(losses) < max(losses)
    assert metrics["final"]["loss"] == pytest.approx(min(losses), abs=1e-6)
    greater = tmp_path / "greater"
    assert train_loop.main(tiny_args(tiny_model_dir(), csv48, greater, *args[len(tiny_args("", "", "")):],
                                     "--greater_is_better")) == 0
    flipped = json.loads((greater / "metrics.json").read_text())
    assert flipped["final"]["loss"] == pytest.approx(max(losses), abs=1e-6)


def test_a_misspelt_metric_for_best_is_refused_at_start_up(tiny_model_dir, csv48, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_loop.main(tiny_args(tiny_model_dir(), csv48, out, "--metric_for_best", "acuracy", *FAST)) == 2
    assert "acuracy" in one_error_line(capsys.readouterr().err)
    assert not out.exists()  # refused before anything was written


# 6. Resume refuses changed settings that change the data ---------------------------------------------


def changed_value(name: str, value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, list):
        return value + ["x"]
    return "changed" if value is None or isinstance(value, str) else None


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(train_loop.TrainConfig)
                                  if f.name not in resume.RESUME_MAY_CHANGE])
def test_resume_refuses_each_setting_outside_the_allow_list(name):
    cfg = train_loop.TrainConfig()
    saved = resume.resume_identity(cfg)
    changed = train_loop.TrainConfig(**{**vars(cfg), name: changed_value(name, getattr(cfg, name))})
    with pytest.raises(train_loop.ConfigError, match=name):
        resume.check_resume_identity(resume.resume_identity(changed), saved, Path("step_00000002"))


def test_the_allow_list_is_output_logging_eval_cadence_and_what_a_nan_advises():
    assert set(resume.RESUME_MAY_CHANGE) == {
        "output_dir", "overwrite", "resume_from_checkpoint", "log_every", "eval_every", "checkpoint_every",
        "keep_checkpoints", "report_to", "eval_batch_size", "num_workers", "merge", "learning_rate", "max_grad_norm"}


def test_resume_with_another_eval_size_or_grouping_is_refused(tiny_model_dir, csv48, tmp_path, capsys):
    out, args = checkpointed_run(tiny_model_dir(), csv48, tmp_path / "run")
    before = snapshot(out)
    capsys.readouterr()
    for change in (["--eval_size", "20"], ["--no-group_by_length"]):
        assert train_loop.main(args + change + ["--resume_from_checkpoint", "latest"]) == 2
        line = one_error_line(capsys.readouterr().err)
        assert "other settings" in line and change[0].lstrip("-").replace("no-", "") in line
    assert snapshot(out) == before


def test_a_lower_learning_rate_on_resume_is_applied_logged_and_recorded(tiny_model_dir, csv48, tmp_path, capsys):
    out = tmp_path / "run"
    args = tiny_args(tiny_model_dir(), csv48, out, "--max_steps", "6", "--checkpoint_every", "2", "--log_every", "1",
                     "--lr_scheduler", "constant", "--warmup_ratio", "0", *FAST)
    assert train_loop.main(args) == 0
    capsys.readouterr()
    assert train_loop.main(args + ["--learning_rate", "1e-3", "--resume_from_checkpoint",
                                   str(out / "checkpoints" / "step_00000004")]) == 0
    assert "resumed with changed settings" in capsys.readouterr().out
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert any(h.get("resumed_with_changes", {}).get("learning_rate") == [1e-2, 1e-3] for h in history)
    assert [h["train/lr"] for h in history if h.get("step") in (5, 6) and "train/lr" in h] == [1e-3, 1e-3]


# 8. Resuming by path into a new output dir -------------------------------------------------------------


def test_resume_by_path_into_a_new_output_dir_finishes_with_the_best_adapter(tiny_model_dir, csv48, tmp_path):
    first = tmp_path / "first"
    common = ["--num_epochs", "2", "--checkpoint_every", "2", "--eval_every", "2", "--keep_checkpoints", "9", *FAST]
    assert train_loop.main(tiny_args(tiny_model_dir(), csv48, first, *common)) == 0
    second = tmp_path / "second"
    assert train_loop.main(tiny_args(tiny_model_dir(), csv48, second, *common, "--resume_from_checkpoint",
                                     str(first / "checkpoints" / "step_00000004"))) == 0
    a, b = (load_file(d / "adapter_model.safetensors") for d in (first, second))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert (second / "best_adapter" / "adapter_model.safetensors").exists()
    assert snapshot(first / "checkpoints" / "step_00000004")  # the other run's checkpoint is untouched


# 10. Gradient clipping is applied -----------------------------------------------------------------------


def test_max_grad_norm_clips_the_gradient_the_optimizer_sees(tiny_model_dir, monkeypatch):
    from test_train_loop import make_lora_model, tiny_loader

    from accelerate import Accelerator

    norms = {}
    for clip in (0.0, 1e-4):
        model, tokenizer = make_lora_model(tiny_model_dir("bert"))
        optimizer = train_loop.build_optimizer(model, 1e-3, 0.0)
        scheduler = train_loop.build_scheduler(optimizer, "constant", 0, 10)
        real_step = optimizer.step

        def recording_step(*args, **kwargs):
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            norms[clip] = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()
            return real_step(*args, **kwargs)

        optimizer.step = recording_step
        window = [next(iter(tiny_loader(tokenizer, 16, 8)))]
        train_loop.train_step(model, optimizer, scheduler, window, Accelerator(cpu=True), clip)
    assert norms[0.0] > 1e-3
    assert norms[1e-4] == pytest.approx(1e-4, rel=1e-3)


def test_mfu_table_does_not_take_an_l40_for_an_l4():
    import metering

    assert metering.peak_flops("NVIDIA L40", "bf16") == 181.05e12
    assert metering.peak_flops("NVIDIA L40S", "bf16") == 362.05e12
    assert metering.peak_flops("NVIDIA L4", "bf16") == 121e12


def test_a_half_written_checkpoint_left_by_a_crash_is_set_aside_not_deleted(tiny_model_dir, csv48, tmp_path):
    """The next save of the same step finds '.incomplete_step_*' from a crash: it is moved to
    checkpoints/abandoned/, with whatever it holds, never deleted."""
    out, args = checkpointed_run(tiny_model_dir(), csv48, tmp_path / "run")
    leftover = out / "checkpoints" / ".incomplete_step_00000004"
    leftover.mkdir()
    (leftover / "notes.txt").write_text("put here by hand")
    assert train_loop.main(args + ["--resume_from_checkpoint", str(out / "checkpoints" / "step_00000002")]) == 0
    kept = list((out / "checkpoints" / "abandoned").glob("*/.incomplete_step_00000004/notes.txt"))
    assert [p.read_text() for p in kept] == ["put here by hand"]
    assert (out / "checkpoints" / "step_00000004" / "trainer_state.json").is_file()
