"""Randomized: sequences of what a tired user does -- fresh runs, runs killed at a random moment (mid-step
or mid-checkpoint), `resume latest`, resume by path, `--overwrite`, re-scoring with eval.py -- inside a
sandbox that also holds files the tool did not write (next to and inside output dirs, the dataset among
them). After every operation:

  * the files the tool did not write are byte-identical;
  * the exit code is 0, 1 or 2, and a non-zero one comes with exactly one `error:` line, no traceback;
  * every run that completes ends with the same adapter as one uninterrupted run (<= 1e-6) and the same
    final metrics, however many kills and resumes came before: `latest` continues the newest line;
  * `eval.py` re-scores a finished run to the accuracy it reported.

Seeded, so a failure replays; INVARIANT_SEQUENCES sets how many sequences run (default 16).
"""

import contextlib
import io
import json
import os
import random

import pytest
from conftest import sentiment_rows, tiny_args, write_csv
from safetensors.torch import load_file

import checkpointing
import eval as evaluation
import reporting
import train_loop

SEQUENCES = int(os.environ.get("INVARIANT_SEQUENCES", "16"))
OPERATIONS = ("fresh", "kill", "kill", "resume_latest", "resume_path", "overwrite", "rescore")
SETTINGS = ["--num_epochs", "2", "--checkpoint_every", "2", "--keep_checkpoints", "3", "--eval_every", "3",
            "--max_length", "16", "--eval_size", "16"]


class SimulatedKill(BaseException):
    """Stands for SIGKILL: nothing of ours catches a BaseException, so no cleanup runs."""


def kill_at(monkeypatch, rng):
    """Arm a kill at a random optimizer step, or in the middle of writing a random checkpoint."""
    target, calls = rng.randint(1, 8), []
    if rng.random() < 0.5:
        real = train_loop.train_step

        def step(*args, **kwargs):
            calls.append(1)
            if len(calls) == target:
                raise SimulatedKill
            return real(*args, **kwargs)

        monkeypatch.setattr(train_loop, "train_step", step)
    else:
        real = checkpointing.save_rng_state  # runs after the checkpoint's folder exists, before its rename

        def save(*args, **kwargs):
            calls.append(1)
            if len(calls) == (target + 1) // 2:
                raise SimulatedKill
            return real(*args, **kwargs)

        monkeypatch.setattr(checkpointing, "save_rng_state", save)


def run(main, args) -> tuple[int | str, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = main(args)
        except SimulatedKill:
            code = "killed"
    return code, out.getvalue(), err.getvalue()


def protected_files(sandbox):
    return {p: p.read_bytes() for p in sandbox.rglob("*") if p.is_file() and p.name in ("reviews.csv", "notes.txt",
                                                                                        "mine.txt")}


@pytest.fixture(autouse=True)
def no_plots(monkeypatch):
    monkeypatch.setattr(reporting, "save_plots", lambda *a, **k: [])  # PNGs are not what is tested here


def test_random_operation_sequences_keep_every_invariant(tiny_model_dir, tmp_path, monkeypatch):
    rng = random.Random(20261126)
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    dataset = write_csv(sandbox / "reviews.csv", sentiment_rows(48))
    (sandbox / "notes.txt").write_text("the user's own notes")
    model = tiny_model_dir("bert")

    def args_for(out):
        return tiny_args(model, str(dataset), out, *SETTINGS)

    reference_dir = tmp_path / "reference"
    assert train_loop.main(args_for(reference_dir)) == 0
    reference = load_file(reference_dir / "adapter_model.safetensors")
    reference_final = json.loads((reference_dir / "metrics.json").read_text())["final"]

    counts = {op: 0 for op in OPERATIONS} | {"completed": 0, "refused": 0}
    for sequence in range(SEQUENCES):
        out = sandbox / f"run{sequence}"
        if rng.random() < 0.2:  # a folder of the user's own: every operation on it must be refused
            out.mkdir()
            (out / "mine.txt").write_text("not the tool's")
        before = protected_files(sandbox)
        for _ in range(rng.randint(2, 5)):
            operation = rng.choice(OPERATIONS)
            counts[operation] += 1
            args = args_for(out)
            with monkeypatch.context() as patch:
                if operation == "kill":
                    kill_at(patch, rng)
                    args += ["--resume_from_checkpoint", "latest"]
                elif operation == "resume_latest":
                    args += ["--resume_from_checkpoint", "latest"]
                elif operation == "resume_path":
                    checkpoints = checkpointing.list_checkpoints(out / "checkpoints")
                    if not checkpoints:
                        continue
                    args += ["--resume_from_checkpoint", str(rng.choice(checkpoints))]
                elif operation == "overwrite":
                    args += ["--overwrite"]
                if operation == "rescore":
                    if not (out / "metrics.json").is_file():
                        continue
                    code, printed, err = run(evaluation.main, ["--adapter_dir", str(out)])
                else:
                    code, printed, err = run(train_loop.main, args)
            context = f"sequence {sequence}, {operation}: exit {code}\n{err[-2000:]}"
            assert protected_files(sandbox) == before, context
            assert code in (0, 1, 2, "killed"), context
            if code in (1, 2):
                errors = [line for line in err.splitlines() if line.startswith("error:")]
                assert len(errors) == 1 and "Traceback" not in err, context
                counts["refused"] += 1
            if (out / "mine.txt").exists():
                assert code == 2, context
            if code == 0 and operation == "rescore":
                reported = json.loads((out / "metrics.json").read_text())["final"]["accuracy"]
                assert json.loads(printed[printed.index("{"):])["accuracy"] == pytest.approx(reported), context
            elif code == 0:
                counts["completed"] += 1
                trained = load_file(out / "adapter_model.safetensors")
                assert trained.keys() == reference.keys(), context
                assert max((trained[k] - reference[k]).abs().max().item() for k in trained) <= 1e-6, context
                final = json.loads((out / "metrics.json").read_text())["final"]
                assert final["confusion_matrix"] == reference_final["confusion_matrix"], context
                assert final["loss"] == pytest.approx(reference_final["loss"], abs=1e-6), context
    print(f"\n{SEQUENCES} sequences: {counts}")
    assert counts["completed"] >= SEQUENCES // 2 and counts["refused"] >= 1
