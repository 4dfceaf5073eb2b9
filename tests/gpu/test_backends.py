"""The real `accelerate launch --config_file configs/accelerate/...` backends on one GPU (world size 1):
FSDP2, DeepSpeed ZeRO-2 and ZeRO-3 each train a tiny model with checkpoints, resume from the latest one,
save, and the saved adapter, reloaded with plain PEFT, predicts what the run reported: exactly in fp32,
within rounding under bf16 (the precision these configs are for), where the saved adapter must still be
the fp32 weights the optimizer stepped.

Why a GPU: DeepSpeed refuses to start without an accelerator, and CUDA kernels and NCCL exist only
there. The CPU suite covers the sampler, DDP over gloo, two machines, checkpoints under
2 processes, FSDP2 driven by torch directly (tests/test_fsdp2_cpu.py), and Accelerate's FSDP2 path on
two CPU processes labelled as GPUs (tests/test_fsdp2_accelerate_cpu.py). Self-contained: skipped without CUDA (and ZeRO-3 without deepspeed).
Each test launches two short runs of a few seconds each on an H100.
"""

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _helpers():
    """tests/conftest.py's tiny-model and data builders (loaded by path: tests/gpu may have its own conftest)."""
    spec = importlib.util.spec_from_file_location("_cpu_suite_conftest", REPO / "tests" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    pytest.importorskip("datasets")
    helpers = _helpers()
    root = tmp_path_factory.mktemp("backends")
    model = str(helpers.save_tiny_model("bert", root / "tiny-bert"))
    csv = str(helpers.write_csv(root / "reviews.csv", helpers.sentiment_rows(200)))
    # 160 train rows, batch 8: 20 optimizer steps; checkpoints every 6 (the 2nd one is mid-epoch).
    # fp32 ("no") lets the reloaded adapter's predictions be compared exactly with the run's own; bf16 is
    # what the backends' configs run.
    args = lambda out, precision="no": helpers.tiny_args(  # noqa: E731
        model, csv, out, "--num_epochs", "1", "--checkpoint_every", "6", "--keep_checkpoints", "10",
        "--mixed_precision", precision, "--log_every", "2")
    return {"root": root, "args": args, "sys_path": str(REPO), "helpers": helpers}


def free_port() -> int:
    """A port nobody listens on (port 0 makes torchrun's rendezvous hang)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(config: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    accelerate = str(Path(sys.executable).parent / "accelerate")
    command = [accelerate, "launch", "--config_file", str(REPO / "configs" / "accelerate" / config),
               "--num_processes", "1", "--num_machines", "1", "--main_process_port", str(free_port()),
               str(REPO / "train_loop.py"), *args]
    # The GPU kit's packages (datasets, deepspeed) come through the caller's PYTHONPATH: keep it.
    python_path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": python_path, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0")}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=cwd, env=env)
    assert result.returncode == 0, f"{config}:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result


def adapter_shapes_expected(job, output_dir: Path) -> dict:
    """Names and shapes of the adapter a fresh, unsharded PEFT model of the same run would save."""
    sys.path.insert(0, job["sys_path"])
    import train_loop
    from peft import get_peft_model_state_dict

    cfg = train_loop.parse_config(job["args"](output_dir))
    tokenizer = __import__("lora_setup").load_tokenizer(cfg.model)
    model, _ = train_loop.build_model(cfg, ["0", "1"], tokenizer.pad_token_id)
    return {k: tuple(v.shape) for k, v in get_peft_model_state_dict(model).items()}


PRECISIONS = ["no", "bf16"]
# bf16 rounds every matmul: a reloaded fp32 copy may flip a prediction near the boundary, and the resumed
# run's weights follow the uninterrupted run's to within the rounding Adam's steps amplify.
BF16_ACCURACY_GAP, BF16_ADAPTER_GAP = 2 / 40, 1e-2


def accuracy(confusion_matrix) -> float:
    return sum(row[i] for i, row in enumerate(confusion_matrix)) / sum(map(sum, confusion_matrix))


def run_checkpoint_resume_reload(job, config: str, name: str, precision: str = "no") -> tuple[Path, Path]:
    from safetensors.torch import load_file

    args = lambda out: job["args"](out, precision)  # noqa: E731
    straight = job["root"] / f"{name}-{precision}-straight"
    launch(config, args(straight), job["root"])
    checkpoints = sorted((straight / "checkpoints").glob("step_*"))
    assert f"step_{12:08d}" in [c.name for c in checkpoints], checkpoints
    # Resume from step 12 (mid-epoch) in a copy of the run, as if it had stopped there.
    resumed = job["root"] / f"{name}-{precision}-resumed"
    shutil.copytree(straight, resumed)
    for checkpoint in sorted((resumed / "checkpoints").glob("step_*")):
        if int(checkpoint.name.split("_")[1]) > 12:
            shutil.rmtree(checkpoint)
    result = launch(config, [*args(resumed), "--resume_from_checkpoint", "latest"], job["root"])
    assert "12" in result.stdout + result.stderr

    for run in (straight, resumed):
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["optimizer_steps"] == 20 and metrics["mixed_precision"] == precision
        reported, reloaded = metrics["final"]["confusion_matrix"], job["helpers"].reloaded_confusion_matrix(args(run), run)
        if precision == "no":
            assert reloaded == reported, run
        else:
            assert abs(accuracy(reloaded) - accuracy(reported)) <= BF16_ACCURACY_GAP, (run, reloaded, reported)
    a, b = (load_file(run / "adapter_model.safetensors") for run in (straight, resumed))
    assert a.keys() == b.keys()
    # The adapter saved is the fp32 one the optimizer steps, under bf16 too (not a bf16 rounding of it).
    assert {str(v.dtype) for v in [*a.values(), *b.values()]} == {"torch.float32"}
    gap = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert gap <= (1e-4 if precision == "no" else BF16_ADAPTER_GAP), gap  # same GPU, same kernels
    return straight, resumed


@pytest.mark.parametrize("precision", PRECISIONS)
def test_fsdp2_one_gpu_checkpoint_resume_and_plain_peft_reload(job, precision):
    straight, _ = run_checkpoint_resume_reload(job, "fsdp.yaml", "fsdp", precision)
    metrics = json.loads((straight / "metrics.json").read_text())
    assert metrics["num_processes"] == 1


def assert_whole_and_trained(job, straight: Path, resumed: Path) -> None:
    """The saved adapter has every tensor a fresh PEFT model of the run would save, whole and trained."""
    from safetensors.torch import load_file

    expected = adapter_shapes_expected(job, straight)
    for run in (straight, resumed):
        saved = load_file(run / "adapter_model.safetensors")
        # ZeRO-3 keeps only shards (empty placeholders) in the module: a rank-0 read without gathering
        # would be empty tensors. The saved adapter must be whole.
        assert {k: tuple(v.shape) for k, v in saved.items()} == expected
        assert all(v.numel() > 0 for v in saved.values())
        assert any("lora_B" in k and v.abs().max() > 0 for k, v in saved.items())  # trained (B starts at 0)
        assert all(v.abs().max() > 0 for k, v in saved.items() if "lora_A" in k or "classifier" in k)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_deepspeed_zero3_one_gpu_adapter_is_gathered_and_reloads(job, precision):
    pytest.importorskip("deepspeed")
    assert_whole_and_trained(job, *run_checkpoint_resume_reload(job, "deepspeed_zero3.yaml", "zero3", precision))


@pytest.mark.parametrize("precision", PRECISIONS)
def test_deepspeed_zero2_one_gpu_checkpoint_resume_and_plain_peft_reload(job, precision):
    """ZeRO-2 partitions optimizer state and gradients, not the weights: its checkpoints restore AdamW's
    moments and fp32 master weights through DeepSpeed's per-parameter helpers, as ZeRO-3's do."""
    pytest.importorskip("deepspeed")
    assert_whole_and_trained(job, *run_checkpoint_resume_reload(job, "deepspeed_zero2.yaml", "zero2", precision))
