"""Checkpoints and resume: atomic writes, SIGKILL mid-epoch then resume, damaged checkpoints, NaN stop."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from conftest import tiny_args
from safetensors.torch import load_file

import checkpointing
import train_loop

REPO = Path(__file__).resolve().parent.parent


def adapter_weights(folder: Path) -> dict:
    return load_file(folder / "adapter_model.safetensors")


def test_half_written_checkpoints_are_invisible(tmp_path):
    (tmp_path / "step_00000004").mkdir()
    (tmp_path / ".incomplete_step_00000008").mkdir()  # what a crash during save_checkpoint leaves
    assert checkpointing.list_checkpoints(tmp_path) == [tmp_path / "step_00000004"]


def start_slowed_run(args: list[str]) -> subprocess.Popen:
    """Run train_loop in a child process, each optimizer step slowed down so the test can kill it
    mid-epoch reliably. The slowdown wraps train_step from outside: the product has no test hooks."""
    code = (
        "import sys, time\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "import train_loop\n"
        "real_step = train_loop.train_step\n"
        "def slowed(*a, **k):\n"
        "    time.sleep(0.15)\n"
        "    return real_step(*a, **k)\n"
        "train_loop.train_step = slowed\n"
        f"sys.exit(train_loop.main({args!r}))\n"
    )
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            # As many threads as the uninterrupted run in this process: a float sum split
                            # over another number of threads rounds differently, and the test compares exactly.
                            env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})


def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(tiny_model_dir, tiny_csv, tmp_path, capsys):
    # 160 train rows / batch 8 = 20 optimizer steps per epoch; checkpoints at steps 6, 12, 18, 20 (epoch end) ...
    common = ["--num_epochs", "3", "--checkpoint_every", "6", "--keep_checkpoints", "20", "--lora_dropout", "0.1"]
    straight = tmp_path / "straight"
    assert train_loop.main(tiny_args(tiny_model_dir("bert"), tiny_csv, straight, *common)) == 0

    killed = tmp_path / "killed"
    args = tiny_args(tiny_model_dir("bert"), tiny_csv, killed, *common)
    process = start_slowed_run(args)
    target = killed / "checkpoints" / "step_00000012"
    deadline = time.time() + 180
    while not target.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert target.exists(), "the child run never reached its step-12 checkpoint"
    assert not (killed / "metrics.json").exists(), "the run finished before it could be killed"
    # Keep the two mid-epoch checkpoints (6 and 12), as if the kill came right after step 12 ...
    for later in checkpointing.list_checkpoints(killed / "checkpoints"):
        if later.name > target.name:
            import shutil

            shutil.rmtree(later)
    # ... and damage the newest one: resume must report it and fall back to step 6.
    (target / checkpointing.ADAPTER_FILE).write_bytes(b"not a safetensors file")

    assert train_loop.main(args + ["--resume_from_checkpoint", "latest"]) == 0
    out = capsys.readouterr().out
    assert "step_00000012' is damaged" in out and "resumed from" in out and "step_00000006" in out

    expected, resumed = adapter_weights(straight), adapter_weights(killed)
    assert expected.keys() == resumed.keys()  # no second adapter stacked on resume
    assert max((expected[k] - resumed[k]).abs().max().item() for k in expected) <= 1e-6
    straight_metrics = json.loads((straight / "metrics.json").read_text())
    resumed_metrics = json.loads((killed / "metrics.json").read_text())
    assert resumed_metrics["optimizer_steps"] == straight_metrics["optimizer_steps"] == 60
    assert resumed_metrics["final"] == straight_metrics["final"]
    assert not list((killed / "checkpoints").glob(".incomplete_*"))
    assert len(checkpointing.list_checkpoints(killed / "checkpoints")) <= 20

    # A checkpoint of this run cannot be resumed under another LoRA config.
    other = tiny_args(tiny_model_dir("bert"), tiny_csv, tmp_path / "other", *common, "--lora_r", "8",
                      "--resume_from_checkpoint", str(straight / "checkpoints" / "step_00000060"))
    assert train_loop.main(other) == 2
    assert "comes from a run with other settings (lora_r=4 there vs 8 now)" in capsys.readouterr().err


def test_resume_latest_without_checkpoints_starts_fresh(tiny_model_dir, tiny_csv, tmp_path, capsys):
    out = tmp_path / "run"
    args = tiny_args(tiny_model_dir("bert"), tiny_csv, out, "--max_steps", "3", "--resume_from_checkpoint", "latest")
    assert train_loop.main(args) == 0
    assert "no checkpoint in" in capsys.readouterr().out


def test_non_finite_loss_stops_with_the_step_and_keeps_earlier_checkpoints(
        tiny_model_dir, tiny_csv, tmp_path, monkeypatch, capsys):
    real_step, calls = train_loop.train_step, []

    def failing_at_step_5(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise train_loop.NonFiniteLossError("loss is nan")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_loop, "train_step", failing_at_step_5)
    out = tmp_path / "run"
    assert train_loop.main(tiny_args(tiny_model_dir("bert"), tiny_csv, out, "--checkpoint_every", "2")) == 1
    err = capsys.readouterr().err
    assert "loss is nan at optimizer step 5 (epoch 1)" in err and "Traceback" not in err
    assert [p.name for p in checkpointing.list_checkpoints(out / "checkpoints")] == ["step_00000002", "step_00000004"]
    assert not (out / "metrics.json").exists()


def test_checkpoints_every_n_steps_keep_the_last_k(tiny_model_dir, tiny_csv, tmp_path):
    out = tmp_path / "run"
    args = tiny_args(tiny_model_dir("bert"), tiny_csv, out, "--max_steps", "7", "--checkpoint_every", "2",
                     "--keep_checkpoints", "2")
    assert train_loop.main(args) == 0
    kept = checkpointing.list_checkpoints(out / "checkpoints")
    assert [p.name for p in kept] == ["step_00000004", "step_00000006"]
    state = json.loads((kept[-1] / "trainer_state.json").read_text())
    assert (state["global_step"], state["epoch"], state["batches_in_epoch"]) == (6, 0, 6)
    assert {"adapter_model.safetensors", "optimizer.safetensors", "optimizer.json", "rng_state_0.safetensors",
            "trainer_state.json"} <= {p.name for p in kept[-1].iterdir()}
    assert not [p for p in kept[-1].rglob("*") if p.suffix in (".pkl", ".bin", ".pt")]  # nothing to unpickle
