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
import torch
from conftest import sentiment_rows, tiny_args, write_csv
from safetensors.torch import load_file

import checkpointing
import eval as evaluation
import reporting
import train_loop

SEQUENCES = int(os.environ.get("INVARIANT_SEQUENCES", "16"))
OPERATIONS = ("fresh", "kill", "kill", "kill_in_final_saves", "resume_latest", "resume_path", "overwrite", "rescore",
              "report_fed_back")
SETTINGS = ["--num_epochs", "2", "--checkpoint_every", "2", "--keep_checkpoints", "3", "--eval_every", "3",
            "--max_length", "16", "--eval_size", "16"]


REAL_SAVE_PLOTS = reporting.save_plots


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


def kill_now(*args, **kwargs):
    raise SimulatedKill


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
                elif operation == "kill_in_final_saves":  # after the last checkpoint, before the report is written
                    patch.setattr(reporting, "write_report", kill_now)
                    args += ["--resume_from_checkpoint", "latest"]
                elif operation == "report_fed_back":  # the settings block report.md offers, used as --config
                    if not (out / "report.md").is_file():
                        continue
                    report = (out / "report.md").read_text()
                    block = report[report.index("```yaml\n") + 8:]
                    (tmp_path / "fed_back.yaml").write_text(block[:block.index("```")])
                    args = ["--config", str(tmp_path / "fed_back.yaml")]
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
            if (out / "mine.txt").exists() or operation == "report_fed_back":
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


# ----------------------------------------------------------------------------------------------
# The operations that broke the old guard machinery, one test each. Each states its invariant.
# ----------------------------------------------------------------------------------------------

FAST = ["--max_length", "16", "--eval_size", "16"]


def one_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def tree(folder) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def csv48(tmp_path):
    return write_csv(tmp_path / "reviews.csv", sentiment_rows(48))


def checkpointed(model, csv, out, *extra):
    args = tiny_args(model, str(csv), out, "--max_steps", "4", "--checkpoint_every", "2", *FAST, *extra)
    code, _, err = run(train_loop.main, args)
    assert code == 0, err
    return args


def test_two_starts_at_once_into_one_output_dir_one_is_refused(tiny_model_dir, csv48, tmp_path):
    """One run per output dir at a time: two processes started together, one trains, the other stops
    with one line and writes nothing; the folder holds one run's files only."""
    import subprocess
    import sys

    out = tmp_path / "run"
    code = ("import sys, train_loop; sys.exit(train_loop.main(sys.argv[1:]))")
    args = tiny_args(tiny_model_dir(), str(csv48), out, "--max_steps", "6", *FAST)
    env = {**os.environ, "PYTHONPATH": str(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))}
    processes = [subprocess.Popen([sys.executable, "-c", code, *args, "--seed", str(seed)], env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE) for seed in (1, 2)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in processes]
    assert sorted(code for code, _ in results) == [0, 2], results
    refused = next(err for code, err in results if code == 2)
    assert "in use by another run" in one_error(refused) or "already holds a run" in one_error(refused)
    winner = json.loads((out / "run_config.json").read_text())["seed"]
    assert json.loads((out / "metrics.json").read_text())["config"]["seed"] == winner


def test_the_lock_is_held_for_the_run_and_released_however_it_ends(tmp_path):
    import run_dir

    first = run_dir.RunDir(tmp_path / "run")
    first.check(overwrite=False, resuming=False)
    first.claim()
    second = run_dir.RunDir(tmp_path / "run")
    second.check(overwrite=False, resuming=False)  # only .lock inside: looks empty, the lock decides
    with pytest.raises(run_dir.OutputDirError, match="in use by another run"):
        second.claim()
    first.release()  # what the kernel does when the process ends, however it ends
    second.claim()


@pytest.mark.parametrize("edit", ["append_rows", "labels_in_place_same_mtime"])
def test_an_input_edited_between_run_and_resume_is_refused(tiny_model_dir, csv48, tmp_path, edit):
    """A resume and a re-score only ever on the same data: compared by content, not by name or time."""
    out = tmp_path / "run"
    args = checkpointed(tiny_model_dir(), csv48, out)
    stamp = os.stat(csv48)
    if edit == "append_rows":
        write_csv(csv48, sentiment_rows(60))
    else:  # the same texts, every label flipped, the time stamp put back: the datasets cache would read it stale
        write_csv(csv48, [(text, 1 - label) for text, label in sentiment_rows(48)])
        os.utime(csv48, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    before = tree(out)
    code, _, err = run(train_loop.main, args + ["--resume_from_checkpoint", "latest"])
    assert code == 2 and "other inputs" in one_error(err) and "split" in one_error(err), err
    code, _, err = run(evaluation.main, ["--adapter_dir", str(out)])
    assert code == 2 and "not the one it was scored on" in one_error(err), err
    assert tree(out) == before


def test_a_replaced_model_file_is_refused_on_resume_and_rescore(tiny_model_dir, csv48, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir(), model)
    out = tmp_path / "run"
    args = checkpointed(str(model), csv48, out)
    from transformers import AutoModel

    weights = AutoModel.from_pretrained(model)
    with torch.no_grad():
        next(weights.parameters()).add_(0.01)
    weights.save_pretrained(model)
    code, _, err = run(train_loop.main, args + ["--resume_from_checkpoint", "latest"])
    assert code == 2 and "the model's files changed" in one_error(err), err
    code, _, err = run(evaluation.main, ["--adapter_dir", str(out)])
    assert code == 2 and "not the one this adapter was trained on" in one_error(err), err


@pytest.mark.parametrize("where", ["dataset", "model"])
def test_an_input_inside_the_output_dir_or_around_it_is_refused(tiny_model_dir, tmp_path, where):
    """A run never writes over what it reads: no input inside the output dir, no output dir inside an input."""
    import shutil

    out = tmp_path / "run"
    out.mkdir()
    if where == "dataset":
        csv, model, output = write_csv(out / "reviews.csv", sentiment_rows(48)), tiny_model_dir(), out
    else:  # an earlier run's folder used as --model, the new run's output dir inside it
        csv, model = write_csv(tmp_path / "reviews.csv", sentiment_rows(48)), out / "merged"
        shutil.copytree(tiny_model_dir(), model)
        output = out / "merged" / "again"
    before = tree(out)
    code, _, err = run(train_loop.main, tiny_args(str(model), str(csv), output, "--max_steps", "1", *FAST))
    assert code == 2 and "overlap" in one_error(err), err
    assert tree(out) == before


def test_an_interruption_during_the_final_saves_resumes_to_the_same_result(tiny_model_dir, csv48, tmp_path,
                                                                           monkeypatch):
    """Resumable after an interruption at any point, the final saves included."""
    reference = tmp_path / "reference"
    checkpointed(tiny_model_dir(), csv48, reference)
    out = tmp_path / "run"
    args = tiny_args(tiny_model_dir(), str(csv48), out, "--max_steps", "4", "--checkpoint_every", "2", *FAST)
    with monkeypatch.context() as patch:
        def killed(*a, **k):
            raise SimulatedKill

        patch.setattr(reporting, "write_report", killed)
        code, _, _ = run(train_loop.main, args)
    assert code == "killed" and not (out / "report.md").exists()
    code, _, err = run(train_loop.main, args + ["--resume_from_checkpoint", "latest"])
    assert code == 0, err
    trained, expected = load_file(out / "adapter_model.safetensors"), load_file(reference / "adapter_model.safetensors")
    assert max((trained[k] - expected[k]).abs().max().item() for k in trained) <= 1e-6
    assert (out / "report.md").is_file()


def test_plots_never_fail_a_finished_run(tiny_model_dir, tmp_path, monkeypatch):
    """A class name with '$' (mathtext in matplotlib) and a plot that raises: the run still finishes."""
    pytest.importorskip("matplotlib")
    monkeypatch.setattr(reporting, "save_plots", REAL_SAVE_PLOTS)  # the autouse fixture stubbed it
    rows = [(text, ["$cheap", "$$pricey"][label]) for text, label in sentiment_rows(48)]
    csv = write_csv(tmp_path / "reviews.csv", rows)
    code, _, err = run(train_loop.main, tiny_args(tiny_model_dir(), str(csv), tmp_path / "run", "--max_steps", "2",
                                                  *FAST))
    assert code == 0, err
    assert (tmp_path / "run" / "confusion_matrices.png").is_file()
    monkeypatch.setattr(reporting, "plot_curves", lambda results: 1 / 0)
    assert [p.name for p in reporting.save_plots(tmp_path / "run", json.loads(
        (tmp_path / "run" / "metrics.json").read_text()))] == ["confusion_matrices.png"]


def test_the_reports_settings_block_fed_back_never_touches_the_run(tiny_model_dir, csv48, tmp_path):
    import yaml

    out = tmp_path / "run"
    checkpointed(tiny_model_dir(), csv48, out, "--overwrite")
    report = (out / "report.md").read_text()
    block = report[report.index("```yaml\n") + 8:]
    block = block[:block.index("```")]
    assert "overwrite" not in yaml.safe_load(block)
    (tmp_path / "again.yaml").write_text(block)
    before = tree(out)
    code, _, err = run(train_loop.main, ["--config", str(tmp_path / "again.yaml")])
    assert code == 2 and "already holds a run" in one_error(err), err
    assert tree(out) == before


@pytest.mark.parametrize("tamper", ["run_config", "checkpoint_identity", "best_adapter"])
def test_tampered_state_files_never_widen_what_is_touched(tiny_model_dir, csv48, tmp_path, tamper):
    """No file a user can edit decides what is removed: with any of them edited, a resume or --overwrite
    removes nothing that is not a checkpoint this very process wrote, and refuses a checkpoint it cannot trust."""
    out = tmp_path / "run"
    args = checkpointed(tiny_model_dir(), csv48, out, "--eval_every", "2")
    latest = out / "checkpoints" / "step_00000004"
    if tamper == "run_config":
        (out / "run_config.json").write_text(json.dumps({"files": ["../reviews.csv", str(csv48)]}))
    elif tamper == "checkpoint_identity":
        state = json.loads((latest / "trainer_state.json").read_text())
        state["identity"]["inputs"]["train"] = "0" * 64
        (latest / "trainer_state.json").write_text(json.dumps(state))
    else:
        (latest / "best" / "adapter_model.safetensors").write_bytes(b"not safetensors")
    code, _, err = run(train_loop.main, args + ["--resume_from_checkpoint", str(latest)])
    if tamper == "run_config":  # read by nothing that decides: the resume goes on, from the checkpoint's own record
        assert code == 0, err
    else:
        assert code == 2 and ("damaged" if tamper == "best_adapter" else "other inputs") in one_error(err), err
    assert csv48.exists()
    code, _, err = run(train_loop.main, args + ["--overwrite"])
    assert code == 0, err
    [aside] = tmp_path.glob("run.previous-*")
    assert (aside / "checkpoints" / "step_00000004").is_dir() and csv48.exists()


def test_an_early_stopped_run_stays_stopped_after_a_resume(tiny_model_dir, csv48, tmp_path):
    out = tmp_path / "run"
    args = tiny_args(tiny_model_dir(), str(csv48), out, "--num_epochs", "4", "--eval_every", "1",
                     "--early_stopping_patience", "1", "--learning_rate", "1e-9", *FAST)
    code, printed, err = run(train_loop.main, args)
    assert code == 0 and "early stopping" in printed, err
    steps = json.loads((out / "metrics.json").read_text())["optimizer_steps"]
    code, printed, err = run(train_loop.main, args + ["--resume_from_checkpoint", "latest"])
    assert code == 0, err
    assert json.loads((out / "metrics.json").read_text())["optimizer_steps"] <= steps


def test_eval_on_another_file_scores_every_row_and_says_so(tiny_model_dir, csv48, tmp_path):
    out = tmp_path / "run"
    checkpointed(tiny_model_dir(), csv48, out)
    other = write_csv(tmp_path / "other.csv", sentiment_rows(30, seed=7))
    code, printed, err = run(evaluation.main, ["--adapter_dir", str(out), "--dataset", str(other)])
    assert code == 0, err
    assert json.loads(printed)["num_samples"] == 30
    assert "scored every row of" in err
    code, printed, err = run(evaluation.main, ["--adapter_dir", str(out)])
    assert code == 0 and "the run's held-out split: 16 rows" in err, err


def test_eval_never_overwrites_an_output_file_and_keeps_line_numbers(tiny_model_dir, csv48, tmp_path):
    out = tmp_path / "run"
    checkpointed(tiny_model_dir(), csv48, out)
    texts = tmp_path / "texts.txt"
    texts.write_text("good film\n\n   \ndull plot\n")
    target = tmp_path / "predictions.jsonl"
    code, _, err = run(evaluation.main, ["--adapter_dir", str(out), "--predict_file", str(texts), "--output",
                                         str(target)])
    assert code == 0, err
    assert [json.loads(line)["line"] for line in target.read_text().splitlines()] == [1, 4]
    before = target.read_bytes()
    code, _, err = run(evaluation.main, ["--adapter_dir", str(out), "--predict", "good", "--output", str(target)])
    assert code == 2 and "never overwritten" in one_error(err)
    assert target.read_bytes() == before


def test_the_embedded_model_is_recorded_by_its_hub_id_and_found_again():
    import lora_setup

    folder = lora_setup.resolve_model("embedded:minilm")[0]
    assert lora_setup.portable_base_name(folder) == "sentence-transformers/all-MiniLM-L6-v2"
    assert lora_setup.embedded_folder("sentence-transformers/all-MiniLM-L6-v2") == folder
    assert lora_setup.portable_base_name("/some/local/model") == "/some/local/model"
    assert lora_setup.embedded_folder("bert-base-uncased") is None


def test_pruning_removes_only_what_this_process_wrote(tmp_path):
    """--keep_checkpoints: the list of what may go lives in memory; a file added by hand stays, and so
    does its folder."""
    written = []
    for step in (2, 4, 6):
        folder = tmp_path / f"step_{step:08d}"
        (folder / "best").mkdir(parents=True)
        for name in ("a.safetensors", "best/b.json"):
            (folder / name).write_text("ours")
        written.append((folder, ["a.safetensors", "best/b.json"]))
    (tmp_path / "step_00000004" / "mine.txt").write_text("by hand")
    resumed_from = tmp_path / "step_00000000"
    resumed_from.mkdir()
    checkpointing.prune(written, keep=1, log=lambda message: None)
    assert not (tmp_path / "step_00000002").exists()
    assert sorted(p.name for p in (tmp_path / "step_00000004").rglob("*")) == ["mine.txt"]
    assert (tmp_path / "step_00000006" / "a.safetensors").exists() and resumed_from.is_dir()


def test_a_local_file_changed_in_place_with_its_time_stamp_kept_is_read_anew(tmp_path):
    """The datasets cache knows a local file by path and modification time: the loader must not."""
    import data

    csv = write_csv(tmp_path / "reviews.csv", sentiment_rows(48))
    stamp = os.stat(csv)
    first = data.load_splits(str(csv), eval_size=8)
    write_csv(csv, [(text, 1 - label) for text, label in sentiment_rows(48)])
    os.utime(csv, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    second = data.load_splits(str(csv), eval_size=8)
    assert data.fingerprint(first.train) != data.fingerprint(second.train)
    flipped = {text: 1 - label for text, label in zip(first.train["text"], first.train["label"])}
    assert all(flipped[text] == label for text, label in zip(second.train["text"], second.train["label"])
               if text in flipped)
