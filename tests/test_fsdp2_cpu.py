"""FSDP2 on a CPU gloo mesh: the adapter gathered from sharded parameters is the unsharded one.

Accelerate turns FSDP on only with accelerators (on CPU its FSDP plugin is ignored and the run is plain
DDP), so this test drives torch's FSDP2 (``fully_shard``) directly, under ``torchrun --nproc_per_node 2``,
with the same PEFT-LoRA model our loop trains. What it proves: our tiny PEFT model can be sharded,
scored by our ``evaluate`` before training (as the loop scores the baseline) and still train, and its adapter gathered to full tensors on rank 0 with
``torch.distributed.checkpoint.state_dict.get_model_state_dict`` (the function in tests/fsdp2_worker.py,
``gather_adapter_state_dict``), equal to an unsharded model trained on the same global batch. What it
does not exercise: Accelerate's own FSDP wiring (its plugin, ``accelerator.get_state_dict``, sharded
optimizer state and checkpoints), which tests/test_fsdp2_accelerate_cpu.py runs on CPU, and mixed
precision, which tests/gpu/test_backends.py runs on a GPU.
"""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_fsdp2_sharded_lora_gathers_to_the_unsharded_adapter(tiny_model_dir, tmp_path):
    pytest.importorskip("torch.distributed.fsdp", reason="needs torch with FSDP2")
    from torch.distributed.fsdp import fully_shard  # noqa: F401  (FSDP2: torch >= 2.6)

    out = tmp_path / "report.json"
    with socket.socket() as s:  # a free port: --master_port 0 makes the two ranks wait for each other forever
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    proc = subprocess.Popen([*torchrun, str(REPO / "tests" / "fsdp2_worker.py"), tiny_model_dir("bert-nodropout"),
                             str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}, start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both ranks: nothing left running
        raise
    assert proc.returncode == 0, stderr[-3000:]
    report = json.loads(out.read_text())
    assert "DTensor" in report["sharded_parameter_types"]  # the model really was sharded
    assert report["keys"] == report["expected_keys"] == report["full_keys"]  # LoRA A/B of every layer + head
    assert any("lora_A" in k for k in report["keys"]) and any("classifier" in k for k in report["keys"])
    assert report["shapes_match"]
    assert report["lora_B_max_abs"] > 0  # trained: B started at zero
    assert report["eval_counts"] == [8, 8]  # our evaluate, before and after training: both ranks' rows
    assert report["types_after_baseline"] == ["DTensor"]  # evaluate put the gathered weights back in shards
    assert report["max_diff"] <= 1e-6 and report["max_diff_full_gather"] <= 1e-6
