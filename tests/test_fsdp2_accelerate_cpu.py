"""Accelerate's own FSDP2 path, end to end on two CPU processes, against the same run under DDP.

`accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 2` starts
tests/fsdp_on_cpu_worker.py, which runs ``train_loop.main`` unchanged after labelling the CPU process group
as GPUs (Accelerate ignores an FSDP plugin on CPU otherwise; see the worker). So this is the code a GPU
run takes, on a gloo mesh: Accelerate's fully_shard of each block, our evaluation of the sharded model
(the baseline first), train_step, checkpoints with sharded AdamW state, resume, the adapter gathered to
full tensors, and a plain-PEFT reload. What only a GPU shows (bf16 mixed precision, NCCL, world size 1 on
CUDA) is in tests/gpu/test_backends.py, run by scripts/gpu_check.sh.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import reloaded_confusion_matrix, sentiment_rows, tiny_args, write_csv
from test_multiprocess import adapter_gap, free_port, resumable_copy, run_env

REPO = Path(__file__).resolve().parent.parent
ACCELERATE = str(Path(sys.executable).parent / "accelerate")
STEPS, RESUME_AT = 14, 5  # 137 rows - 40 eval = 97 train rows, global batch 16: 7 steps an epoch, 2 epochs


def launch(backend: list[str], args: list[str], cwd: Path) -> str:
    command = [ACCELERATE, "launch", *backend, "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
               "no", "--main_process_port", str(free_port()), str(REPO / "tests" / "fsdp_on_cpu_worker.py"), *args]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd,
                            env=run_env(), start_new_session=True)
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks
        raise
    assert proc.returncode == 0, err[-3000:]
    return out + err


FSDP = ["--config_file", str(REPO / "configs" / "accelerate" / "fsdp.yaml")]
DDP = ["--multi_gpu"]


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    pytest.importorskip("torch.distributed.fsdp", reason="needs torch with FSDP2")
    root = tmp_path_factory.mktemp("fsdp_accelerate")
    csv = str(write_csv(root / "r.csv", sentiment_rows(137, seed=4)))
    model = tiny_model_dir("bert-nodropout")  # no dropout: the two backends draw no different random numbers
    args = lambda out, *extra: tiny_args(model, csv, out, "--num_epochs", "2", "--lora_dropout", "0",  # noqa: E731
                                         "--log_every", "1", "--checkpoint_every", "5", "--keep_checkpoints", "20",
                                         *extra)
    logs = {name: launch(backend, args(root / name), root) for name, backend in (("fsdp", FSDP), ("ddp", DDP))}
    return {"root": root, "args": args, "logs": logs}


def test_fsdp2_shards_the_model_and_trains_the_adapter_ddp_trains(runs):
    root, logs = runs["root"], runs["logs"]
    assert "parameters: ['DTensor']" in logs["fsdp"]  # every parameter sharded over the two ranks
    assert "parameters: ['Parameter']" in logs["ddp"]
    fsdp, ddp = (json.loads((root / name / "metrics.json").read_text()) for name in ("fsdp", "ddp"))
    assert fsdp["num_processes"] == ddp["num_processes"] == 2 and fsdp["optimizer_steps"] == STEPS
    losses = [[h["train/loss"] for h in m["history"] if "train/loss" in h] for m in (fsdp, ddp)]
    assert len(losses[0]) == STEPS and max(abs(a - b) for a, b in zip(*losses)) < 1e-5
    assert fsdp["final"]["confusion_matrix"] == ddp["final"]["confusion_matrix"]
    assert adapter_gap(root / "fsdp", root / "ddp") <= 1e-5


def test_an_fsdp2_checkpoint_resumes_to_the_same_adapter(runs):
    root = runs["root"]
    resumed = resumable_copy(root / "fsdp", root / "fsdp-resumed", RESUME_AT)
    log = launch(FSDP, runs["args"](resumed, "--resume_from_checkpoint", "latest"), root)
    assert f"step {RESUME_AT}" in log  # it did resume, mid-way through the first epoch
    assert json.loads((resumed / "metrics.json").read_text())["optimizer_steps"] == STEPS
    assert adapter_gap(root / "fsdp", resumed) <= 1e-6


def test_the_fsdp2_adapter_reloads_with_plain_peft_and_predicts_what_the_run_reported(runs):
    run = runs["root"] / "fsdp"
    reported = json.loads((run / "metrics.json").read_text())["final"]["confusion_matrix"]
    assert reloaded_confusion_matrix(runs["args"](run), run) == reported


def test_fsdp2_with_bf16_keeps_fp32_adapter_weights_and_follows_the_fp32_run(runs):
    """FSDP2's mixed-precision policy (Accelerate sets it from --mixed_precision bf16): the sharded weights the
    optimizer steps stay fp32 and compute runs in bf16, so the losses follow the fp32 run's closely."""
    from safetensors.torch import load_file

    root = runs["root"]
    launch(FSDP, runs["args"](root / "fsdp-bf16", "--mixed_precision", "bf16"), root)
    bf16, fp32 = (json.loads((root / name / "metrics.json").read_text()) for name in ("fsdp-bf16", "fsdp"))
    assert bf16["mixed_precision"] == "bf16" and bf16["optimizer_steps"] == STEPS
    losses = [[h["train/loss"] for h in m["history"] if "train/loss" in h] for m in (bf16, fp32)]
    assert 0 < max(abs(a - b) for a, b in zip(*losses)) < 0.02  # bf16 differs, but only by rounding
    saved = load_file(root / "fsdp-bf16" / "adapter_model.safetensors")
    assert {str(v.dtype) for v in saved.values()} == {"torch.float32"}
