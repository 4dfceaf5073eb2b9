"""Two processes (DDP over gloo on CPU) must train and evaluate exactly like one process.

Launched from pytest exactly as the README documents it for a CPU machine:
``accelerate launch --multi_gpu --num_processes 2 train_loop.py ...`` (no GPU needed; train_loop then
asks Accelerate for CPU processes, which join one gloo group). ``accelerate launch --cpu
--num_processes 2`` silently starts a single process; ``torchrun --nproc_per_node 2`` also works.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import sentiment_rows, tiny_args, write_csv
from safetensors.torch import load_file

import train_loop

REPO = Path(__file__).resolve().parent.parent


def test_two_processes_match_one_process_with_twice_the_batch(tiny_model_dir, tmp_path):
    # 201 rows -> 160 train (10 optimizer steps of 16 per epoch) and 41 eval rows: an eval set that
    # does not split evenly over 2 processes x batch 4, so Accelerate pads the last batches.
    csv = str(write_csv(tmp_path / "r.csv", sentiment_rows(201)))
    common = ["--eval_size", "41", "--eval_batch_size", "4", "--num_epochs", "2", "--gradient_accumulation_steps", "2",
              "--no-group_by_length", "--lora_dropout", "0", "--log_every", "1", "--warmup_ratio", "0.2"]
    model = tiny_model_dir("bert-nodropout")

    single = tmp_path / "single"
    assert train_loop.main(tiny_args(model, csv, single, *common, "--batch_size", "16")) == 0

    double = tmp_path / "double"
    accelerate = str(Path(sys.executable).parent / "accelerate")
    command = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", "29533",
               str(REPO / "train_loop.py"), *tiny_args(model, csv, double, *common, "--batch_size", "8")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-3000:]

    one, two = (json.loads((d / "metrics.json").read_text()) for d in (single, double))
    assert two["num_processes"] == 2 and one["num_processes"] == 1
    assert two["optimizer_steps"] == one["optimizer_steps"] == 10
    # Same LR at every optimizer step: the schedule follows optimizer steps, not processes.
    lrs = [[h["train/lr"] for h in m["history"] if "train/lr" in h] for m in (one, two)]
    assert len(lrs[0]) == 10 and lrs[0] == lrs[1]
    # Exactly the metrics of one process: the padded duplicates are not counted.
    for stage in ("baseline", "final"):
        assert two[stage]["num_samples"] == one[stage]["num_samples"] == 41
        assert two[stage]["confusion_matrix"] == one[stage]["confusion_matrix"]
        assert abs(two[stage]["loss"] - one[stage]["loss"]) < 1e-5
    # Same trained adapter.
    a, b = (load_file(d / "adapter_model.safetensors") for d in (single, double))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    # Only the main process prints and shows progress bars.
    assert result.stdout.count("baseline (before training)") == 1
    assert result.stderr.count("| 0/10 [") == 1


# ---------------------------------------------------------------------------------------------------
# Two "machines" on localhost, default length-grouped batches, checkpoints, resume (issue #10)
# ---------------------------------------------------------------------------------------------------

import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402

import pytest  # noqa: E402

ACCELERATE = str(Path(sys.executable).parent / "accelerate")
# 137 rows -> 97 train rows = 6 global batches of 16 + one of a single row, fewer rows than processes: under 2
# processes one of them gets an ignored row (data.split_global_batch). 7 optimizer steps per epoch.
SCALE_ROWS, SCALE_STEPS_PER_EPOCH, RESUME_AT = 137, 7, 10  # step 10: mid-way through the second epoch
SCALE_COMMON = ["--num_epochs", "2", "--lora_dropout", "0", "--log_every", "1", "--warmup_ratio", "0.2",
                "--checkpoint_every", "5", "--keep_checkpoints", "20"]  # default: --group_by_length


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1"}


def launch_two_machines(args: list[str], cwd: Path) -> list[subprocess.CompletedProcess]:
    """Two launchers, one process each, as on two nodes: machine_rank 0 and 1, rendezvous on rank 0."""
    port = free_port()
    launchers = [subprocess.Popen(
        [ACCELERATE, "launch", "--multi_gpu", "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank),
         "--main_process_ip", "127.0.0.1", "--main_process_port", str(port), str(REPO / "train_loop.py"), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd, env=run_env(), start_new_session=True)
        for rank in (0, 1)]
    results = []
    for rank, proc in enumerate(launchers):
        try:
            out, err = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for p in launchers:  # each launcher and the training process it started
                os.killpg(p.pid, signal.SIGKILL)
            raise
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    for rank, result in enumerate(results):
        assert result.returncode == 0, f"machine_rank {rank}:\n{result.stderr[-3000:]}"
    return results


def launch_one_machine(args: list[str], cwd: Path, processes: int = 2) -> subprocess.CompletedProcess:
    command = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", str(processes), "--main_process_port",
               str(free_port()), str(REPO / "train_loop.py"), *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=cwd, env=run_env())
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def adapter_gap(a: Path, b: Path) -> float:
    x, y = (load_file(d / "adapter_model.safetensors") for d in (a, b))
    assert x.keys() == y.keys()
    return max((x[k] - y[k]).abs().max().item() for k in x)


@pytest.fixture(scope="module")
def scale_runs(tiny_model_dir, tmp_path_factory):
    """One process x batch 16 (in this process) and two machines x one process x batch 8, both with the
    default length-grouped batches and no dropout anywhere, checkpointing every 5 steps."""
    root = tmp_path_factory.mktemp("scale")
    csv = str(write_csv(root / "r.csv", sentiment_rows(SCALE_ROWS, seed=4)))
    model = tiny_model_dir("bert-nodropout")
    args = lambda out, batch, *extra: tiny_args(model, csv, out, *SCALE_COMMON, "--batch_size", str(batch), *extra)  # noqa: E731
    single = root / "single"
    assert train_loop.main(args(single, 16)) == 0
    double = root / "double"
    launched = launch_two_machines(args(double, 8), root)
    return {"root": root, "args": args, "single": single, "double": double, "launched": launched}


def test_two_machines_with_length_grouping_match_one_process_with_the_global_batch(scale_runs):
    single, double = scale_runs["single"], scale_runs["double"]
    one, two = (json.loads((d / "metrics.json").read_text()) for d in (single, double))
    assert one["num_processes"] == 1 and two["num_processes"] == 2
    assert one["optimizer_steps"] == two["optimizer_steps"] == 2 * SCALE_STEPS_PER_EPOCH
    # Same rows in every step: same losses step by step (the partial last step too), same LR curve.
    for key in ("train/loss", "train/lr"):
        a, b = ([h[key] for h in m["history"] if key in h] for m in (one, two))
        assert len(a) == len(b) == 2 * SCALE_STEPS_PER_EPOCH
        assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5, key
    for stage in ("baseline", "final"):
        assert one[stage]["confusion_matrix"] == two[stage]["confusion_matrix"]
        assert abs(one[stage]["loss"] - two[stage]["loss"]) < 1e-5
    assert adapter_gap(single, double) <= 1e-5
    # accelerator.print prints on each machine's local main process: once per machine, not per process.
    assert all(r.stdout.count("baseline (before training)") == 1 for r in scale_runs["launched"])


def resumable_copy(run: Path, destination: Path, step: int) -> Path:
    """The run's output dir as it was when checkpoint ``step`` had just been written (newer ones removed)."""
    shutil.copytree(run, destination)
    checkpoints = sorted((destination / "checkpoints").glob("step_*"))
    assert f"step_{step:08d}" in [c.name for c in checkpoints], checkpoints
    for checkpoint in checkpoints:
        if int(checkpoint.name.split("_")[1]) > step:
            shutil.rmtree(checkpoint)
    return destination


def test_a_two_process_checkpoint_resumes_under_two_processes_to_the_same_adapter(scale_runs):
    resumed = resumable_copy(scale_runs["double"], scale_runs["root"] / "resumed2", RESUME_AT)
    result = launch_one_machine(scale_runs["args"](resumed, 8, "--resume_from_checkpoint", "latest"),
                                scale_runs["root"])
    assert f"step {RESUME_AT}" in result.stdout + result.stderr  # it did resume, mid-way through epoch 2
    metrics = json.loads((resumed / "metrics.json").read_text())
    assert metrics["optimizer_steps"] == 2 * SCALE_STEPS_PER_EPOCH
    assert adapter_gap(scale_runs["double"], resumed) <= 1e-6
    original = json.loads((scale_runs["double"] / "metrics.json").read_text())
    assert metrics["final"]["confusion_matrix"] == original["final"]["confusion_matrix"]


def test_a_two_process_checkpoint_resumes_exactly_on_one_process_at_the_same_global_batch(scale_runs):
    """Global batches do not depend on the process count, so the checkpoint's position (global batches
    done in the epoch) means the same rows on 1 process x batch 16 as on 2 x 8: resume is exact."""
    resumed = resumable_copy(scale_runs["double"], scale_runs["root"] / "resumed1", RESUME_AT)
    assert train_loop.main(scale_runs["args"](resumed, 16, "--resume_from_checkpoint", "latest")) == 0
    metrics = json.loads((resumed / "metrics.json").read_text())
    assert metrics["optimizer_steps"] == 2 * SCALE_STEPS_PER_EPOCH and metrics["num_processes"] == 1
    assert adapter_gap(scale_runs["double"], resumed) <= 1e-5
    original = json.loads((scale_runs["double"] / "metrics.json").read_text())
    assert metrics["final"]["confusion_matrix"] == original["final"]["confusion_matrix"]


def test_resume_with_another_global_batch_is_refused_in_one_line(scale_runs, capsys):
    """Same --batch_size on another process count is another global batch: another run, refused."""
    resumed = resumable_copy(scale_runs["double"], scale_runs["root"] / "refused", RESUME_AT)
    assert train_loop.main(scale_runs["args"](resumed, 8, "--resume_from_checkpoint", "latest")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "batch" in err[0], err
