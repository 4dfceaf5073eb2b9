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
