"""Each examples/by_feature/ file is the minimal loop plus one feature, and each test here proves its feature.

The files are copies of examples/minimal_loop.py with the feature's lines marked `# New`: the first test
checks that nothing else differs, so a reader can trust that the marked lines are the whole feature, and the
copies cannot drift from the loop they extend. The others run each on a tiny BERT and CSV, in seconds.
"""

import difflib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import sentiment_rows, tiny_args, write_csv
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
FEATURES = sorted((EXAMPLES / "by_feature").glob("*.py"))
sys.path.insert(0, str(EXAMPLES))
import minimal_loop  # noqa: E402

ADAPTER = "adapter_model.safetensors"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"by_feature_{name}", EXAMPLES / "by_feature" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def code_lines(path: Path) -> list[str]:
    """The file without its docstring; the repo root is one folder further up from examples/by_feature/."""
    text = path.read_text()
    return text[text.index('"""', 3) + 4:].replace(".parents[2]))", ".parent.parent))").splitlines()


def unmarked_changes(path: Path) -> list[str]:
    """Every run of added or removed lines against the minimal loop must start its added lines with one
    marked `# New` (a removed line is only allowed where marked lines replace it)."""
    problems = []
    matcher = difflib.SequenceMatcher(a=code_lines(EXAMPLES / "minimal_loop.py"), b=code_lines(path), autojunk=False)
    for tag, a0, a1, b0, b1 in matcher.get_opcodes():
        added = matcher.b[b0:b1]
        if tag != "equal" and not (added and "# New" in added[0]):
            problems.append(f"{path.name}: {tag} {matcher.a[a0:a1]} -> {added}")
    return problems


def test_there_is_a_file_per_feature_and_each_differs_from_the_minimal_loop_only_by_marked_lines():
    assert [p.stem for p in FEATURES] == ["checkpoint_resume", "early_stopping", "mixed_precision"]
    for path in FEATURES:
        assert unmarked_changes(path) == []


def test_the_marking_check_sees_an_unmarked_change(tmp_path):
    """The test above can fail: one changed line without its marker is reported."""
    copy = tmp_path / "copy.py"
    copy.write_text((EXAMPLES / "minimal_loop.py").read_text().replace('batch["labels"], reduction="sum"',
                                                                         'batch["labels"], reduction="mean"'))
    assert len(unmarked_changes(copy)) == 1


@pytest.fixture(scope="module")
def tiny(tiny_model_dir, tmp_path_factory):
    """``flags(output_dir, *extra)`` for the examples: tiny BERT (dropout on), 160 train rows = 20 batches of 8
    per epoch, 40 eval rows. Run with one thread: a tiny model on shared cores only waits for the others."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("by_feature")
    csv_path = str(write_csv(folder / "reviews.csv", sentiment_rows(200)))
    known = set(minimal_loop.FLAGS) | {"mixed_precision", "metric_for_best", "early_stopping_patience",
                                       "checkpoint_every", "resume_from_checkpoint"}

    def flags(out: str, *extra: str) -> list[str]:
        pairs = tiny_args(tiny_model_dir("bert"), csv_path, folder / out, *extra)
        return [x for name, value in zip(pairs[::2], pairs[1::2]) if name[2:] in known for x in (name, value)]

    yield folder, flags
    torch.set_num_threads(threads)


def adapter_gap(a: Path, b: Path) -> float:
    x, y = load_file(a / ADAPTER), load_file(b / ADAPTER)
    assert x.keys() == y.keys() and len(x) > 0
    return max((x[k] - y[k]).abs().max().item() for k in x)


# ------------------------------------------------------------------------------------------------ accumulation
def test_accumulation_4_x_batch_8_equals_one_batch_of_32_in_the_minimal_loop(tiny, tiny_model_dir, tmp_path):
    """The minimal loop's accumulation lines: 32 train rows are one global batch, so batch 32 and batch 8 x 4
    take the same optimizer step on the same rows each epoch (no dropout: 4 forwards draw other masks than 1)."""
    csv_path = str(write_csv(tmp_path / "r.csv", sentiment_rows(72)))  # 72 - 40 eval = 32 train rows
    common = tiny_args(tiny_model_dir("bert-nodropout"), csv_path, tmp_path / "x", "--num_epochs", "3",
                       "--lora_dropout", "0")
    common = [x for n, v in zip(common[::2], common[1::2]) if n[2:] in minimal_loop.FLAGS for x in (n, v)]
    runs = {"32x1": ("32", "1"), "8x4": ("8", "4"), "8x1": ("8", "1")}
    for out, (batch, accumulation) in runs.items():
        minimal_loop.main(common + ["--output_dir", str(tmp_path / out), "--batch_size", batch,
                                    "--gradient_accumulation_steps", accumulation])
    assert adapter_gap(tmp_path / "32x1", tmp_path / "8x4") <= 1e-5
    assert adapter_gap(tmp_path / "32x1", tmp_path / "8x1") > 1e-3  # four small steps are another training


# --------------------------------------------------------------------------------------------- mixed precision
def test_mixed_precision_off_is_the_minimal_loop_and_bf16_keeps_fp32_weights(tiny):
    folder, flags = tiny
    minimal_loop.main(flags("minimal", "--num_epochs", "1"))
    load_example("mixed_precision").main(flags("fp32", "--num_epochs", "1", "--mixed_precision", "no"))
    assert adapter_gap(folder / "minimal", folder / "fp32") == 0
    # bf16 in its own process: Accelerate's state (and its precision) is fixed once per process.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, str(EXAMPLES / "by_feature" / "mixed_precision.py"),
               *flags("bf16", "--num_epochs", "1", "--mixed_precision", "bf16")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    weights = load_file(folder / "bf16" / ADAPTER)
    assert {t.dtype for t in weights.values()} == {torch.float32}  # the optimizer stepped fp32 weights
    gap = adapter_gap(folder / "fp32", folder / "bf16")
    assert 0 < gap < 0.05  # bf16 was on (the weights differ), and differs from fp32 only by rounding


# ---------------------------------------------------------------------------------- checkpoint and exact resume
def test_a_run_stopped_mid_epoch_and_resumed_ends_like_one_never_stopped(tiny):
    """20 micro-batches per epoch in windows of 3 (7 steps), 2 epochs, dropout on, a checkpoint every 4 steps.
    Stopped after step 10 (mid-way through epoch 2), resumed from step 8: the same adapter, bit for bit."""
    folder, flags = tiny
    example = load_example("checkpoint_resume")
    common = ("--num_epochs", "2", "--gradient_accumulation_steps", "3", "--warmup_ratio", "0.2",
              "--checkpoint_every", "4")
    example.main(flags("whole", *common))
    minimal_loop.main(flags("plain", *common[:6]))
    assert adapter_gap(folder / "whole", folder / "plain") == 0  # checkpoints change nothing that is trained
    assert example.main(flags("stopped", *common), stop_after=10) == {"stopped_at": 10}
    saved = sorted(p.name for p in (folder / "stopped" / "checkpoints").iterdir())
    assert saved == ["step_4", "step_7", "step_8"]  # every 4 steps, and the end of epoch 1 (step 7)
    checkpoint = folder / "stopped" / "checkpoints" / "step_8"
    assert json.loads((checkpoint / "state.json").read_text())["position"] == {"epoch": 1, "step": 8, "batches": 3}
    example.main(flags("stopped", *common, "--resume_from_checkpoint", str(checkpoint)))
    assert adapter_gap(folder / "whole", folder / "stopped") == 0


def test_resuming_without_the_random_state_is_not_exact(tiny, monkeypatch):
    """The test above can fail: forget one part of the state (here the RNG, i.e. the next dropout masks) and
    the resumed run ends elsewhere."""
    folder, flags = tiny
    example = load_example("checkpoint_resume")
    monkeypatch.setattr(example.torch, "set_rng_state", lambda state: None)
    checkpoint = folder / "stopped" / "checkpoints" / "step_8"
    if not checkpoint.exists():
        pytest.skip("needs the run of the test above")
    common = ("--num_epochs", "2", "--gradient_accumulation_steps", "3", "--warmup_ratio", "0.2")
    example.main(flags("no_rng", *common, "--resume_from_checkpoint", str(checkpoint)))
    assert adapter_gap(folder / "whole", folder / "no_rng") > 1e-6


# ------------------------------------------------------------------------ early stopping and the best adapter
def test_early_stopping_stops_after_patience_and_keeps_the_best_epochs_adapter(tiny, monkeypatch):
    """Scores are scripted (0.6, 0.8, 0.7, 0.75, 0.9 ...) so the test knows the answer: best after epoch 2,
    two evaluations without gain, stop after epoch 4 of 6, and the saved adapter is epoch 2's, which a
    2-epoch run of the minimal loop (constant learning rate, so the schedule does not depend on the length)
    ends with."""
    folder, flags = tiny
    example = load_example("early_stopping")
    real = example.evaluation.evaluate
    scores = iter([0.5, 0.6, 0.8, 0.7, 0.75, 0.9, 0.9])  # the first is the baseline, before training

    def scripted(*args, **kwargs):
        metrics = real(*args, **kwargs)
        return {**metrics, "accuracy": next(scores)}

    monkeypatch.setattr(example.evaluation, "evaluate", scripted)
    common = ("--lr_scheduler", "constant", "--warmup_ratio", "0")
    result = example.main(flags("early", "--num_epochs", "6", "--early_stopping_patience", "2", *common))
    assert result["epochs"] == 4 and result["best"] == 0.8
    monkeypatch.undo()  # eval.evaluate is shared with the minimal loop: real scores again
    minimal_loop.main(flags("two_epochs", "--num_epochs", "2", *common))
    assert adapter_gap(folder / "early", folder / "two_epochs") == 0
