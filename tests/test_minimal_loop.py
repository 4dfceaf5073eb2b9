"""The big loop is the small loop plus features, and this test says so.

examples/minimal_loop.py (under 100 lines) and train_loop.py run the same job on a tiny BERT and CSV with
the same settings and seed, dropout on, and must end with the same adapter. The settings pick the cases
where loops go wrong: accumulation windows of 3 over 20 micro-batches (so each epoch ends with a short
window of 2), two epochs (a new shuffle each), warmup, clipping and weight decay. And again under two
processes, where the last global batch has fewer rows than processes (a filler row that counts for nothing).
"""

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import sentiment_rows, tiny_args, write_csv
from safetensors.torch import load_file

import train_loop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import minimal_loop  # noqa: E402

SETTINGS = ("--num_epochs", "2", "--gradient_accumulation_steps", "3", "--warmup_ratio", "0.2")
ADAPTER = "adapter_model.safetensors"


def minimal_flags(flags: list[str]) -> list[str]:
    """The ``--name value`` pairs of ``flags`` that the minimal loop knows (tiny_args adds --log_every)."""
    return [x for name, value in zip(flags[::2], flags[1::2]) if name[2:] in minimal_loop.FLAGS for x in (name, value)]


def max_abs_diff(dir_a: Path, dir_b: Path) -> float:
    a, b = load_file(dir_a / ADAPTER), load_file(dir_b / ADAPTER)
    assert a.keys() == b.keys() and len(a) > 0
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """Run both loops once: ``(folder, train_loop's metrics.json dict, minimal loop's last metrics, flags)``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model on cores shared with other jobs: threads only wait for each other
    folder = tmp_path_factory.mktemp("minimal")
    csv_path = str(write_csv(folder / "reviews.csv", sentiment_rows(200)))  # 160 train rows: 20 batches of 8

    def flags(out: str, *extra: str) -> list[str]:
        return tiny_args(tiny_model_dir("bert"), csv_path, folder / out, *SETTINGS, *extra)

    # train_loop keeps the adapter of its *best* evaluation; the minimal loop keeps the last weights. So
    # train_loop evaluates once, at the end (--eval_every beyond the last step): its saved adapter is then
    # its last one too. The minimal loop still evaluates after every epoch; both evaluate before training.
    # Matching adapters therefore also show that evaluation (and train_loop's checkpoints) draw no random
    # numbers: data.build_dataloader gives each loader its own generator, so dropout masks stay in step.
    big = ["--eval_every", "1000000"]
    if "fast_dropout" in train_loop.TrainConfig.__dataclass_fields__:
        big.append("--no-fast_dropout")  # the minimal loop uses PyTorch's dropout; FastDropout draws differently
    assert train_loop.main(flags("big", *big)) == 0
    small = minimal_loop.main(minimal_flags(flags("small")))
    yield folder, json.loads((folder / "big" / "metrics.json").read_text()), small, flags
    torch.set_num_threads(threads)


def test_minimal_loop_ends_with_the_same_adapter_as_train_loop(runs):
    folder, big, small, _ = runs
    assert big["optimizer_steps"] == 2 * 7  # windows of 3, 3, 3, 3, 3, 3 and 2 micro-batches per epoch
    diff = max_abs_diff(folder / "big", folder / "small")
    print(f"max abs difference between the two adapters: {diff:.3g}")
    assert diff <= 1e-6
    assert small["loss"] == pytest.approx(big["final"]["loss"], abs=1e-6)
    assert small["confusion_matrix"] == big["final"]["confusion_matrix"]
    assert small["loss"] < big["baseline"]["loss"]  # and training lowered the eval loss


@pytest.mark.parametrize("change", [("--gradient_accumulation_steps", "2"), ("--learning_rate", "5e-3")])
def test_the_comparison_sees_a_changed_setting(runs, change):
    """The test above can fail: one setting changed in the minimal loop gives a different adapter."""
    folder, _, _, flags = runs
    out = f"small_{change[0][2:]}"
    minimal_loop.main(minimal_flags(flags(out)) + list(change))  # argparse: the last value wins
    assert max_abs_diff(folder / "big", folder / out) > 1e-3


# 97 train rows (137 - 40 eval) at 2 processes x batch 8: six global batches of 16 and a last one of a
# single row, fewer rows than processes, so one process gets a filler row (data.IGNORED_LABEL) that
# train_loop.train_step leaves out of the loss and the sample count. The minimal loop must do the same.
TWO_PROCESS_ROWS = 137
DRIVER = """
import sys
sys.path[:0] = [{repo!r}, {examples!r}]
import minimal_loop, train_loop
minimal_loop.main({small!r})  # first: train_loop ends with accelerator.end_training(), which ends the group
assert train_loop.main({big!r}) == 0
"""


def test_minimal_loop_equals_train_loop_under_two_processes_with_a_filler_row(tiny_model_dir, tmp_path):
    import os
    import socket
    import subprocess

    assert (TWO_PROCESS_ROWS - 40) % 16 == 1  # --eval_size 40 (tiny_args): the last global batch holds one row
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    repo = Path(__file__).resolve().parent.parent
    csv_path = str(write_csv(tmp_path / "reviews.csv", sentiment_rows(TWO_PROCESS_ROWS, seed=4)))
    flags = tiny_args(tiny_model_dir("bert"), csv_path, tmp_path / "out", "--num_epochs", "2",
                      "--gradient_accumulation_steps", "3", "--warmup_ratio", "0.2")
    out = flags.index("--output_dir") + 1
    small = minimal_flags(flags[:out] + [str(tmp_path / "small")] + flags[out + 1:])
    big = flags[:out] + [str(tmp_path / "big")] + flags[out + 1:] + ["--eval_every", "1000000"]
    if "fast_dropout" in train_loop.TrainConfig.__dataclass_fields__:
        big.append("--no-fast_dropout")
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(repo=str(repo), examples=str(repo / "examples"), small=small, big=big))
    accelerate = str(Path(sys.executable).parent / "accelerate")
    result = subprocess.run([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", port,
                             str(driver)], capture_output=True, text=True, timeout=600, cwd=tmp_path,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)})
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "big" / "metrics.json").read_text())
    assert metrics["num_processes"] == 2
    assert metrics["optimizer_steps"] == 2 * 3  # 7 micro-batches per process per epoch: windows of 3, 3, 1
    diff = max_abs_diff(tmp_path / "big", tmp_path / "small")
    print(f"two processes: max abs difference between the two adapters: {diff:.3g}")
    assert diff <= 1e-6
