"""The big loop is the small loop plus features, and this test says so.

examples/minimal_loop.py (under 100 lines) and train_loop.py run the same job on a tiny BERT and CSV with
the same settings and seed, dropout on, and must end with the same adapter. The settings pick the cases
where loops go wrong: accumulation windows of 3 over 20 micro-batches (so each epoch ends with a short
window of 2), two epochs (a new shuffle each), warmup, clipping and weight decay.
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
