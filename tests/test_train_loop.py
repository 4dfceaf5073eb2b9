"""train_loop.py's steps on tiny models: optimizer, schedule, accumulation, one train step, config."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from conftest import sentiment_rows, tiny_args

import data
import lora_setup
import settings
import train_loop


@pytest.fixture(scope="module")
def accelerator():
    return Accelerator(cpu=True)


def make_lora_model(model_dir: str, seed: int = 0, dropout: float = 0.0):
    """A tiny BERT + LoRA in eval mode (no dropout), so runs that batch differently can be compared."""
    tokenizer = lora_setup.load_tokenizer(model_dir)
    torch.manual_seed(seed)
    model, heads = lora_setup.load_base_model(model_dir, ["0", "1"], tokenizer.pad_token_id)
    config = lora_setup.build_lora_config(model, heads, r=4, alpha=8, dropout=dropout)
    return lora_setup.apply_lora(model, config).eval(), tokenizer


def tiny_loader(tokenizer, n: int, batch_size: int, seed: int = 0):
    import datasets

    rows = sentiment_rows(n, seed=seed)
    ds = datasets.Dataset.from_dict({"text": [t for t, _ in rows], "label": [y for _, y in rows]})
    return data.build_dataloader(data.tokenize(ds, tokenizer, 32), tokenizer.pad_token_id, batch_size,
                                 train=True, group_by_length=False, seed=seed)


def trainable_state(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def run_epochs(model, loader, accelerator, accumulation: int, epochs: int, lr: float = 1e-2, class_weights=None):
    optimizer = train_loop.build_optimizer(model, lr, 0.01)
    total = epochs * -(-len(loader) // accumulation)
    scheduler = train_loop.build_scheduler(optimizer, "linear", 2, total)
    losses = []
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        for window in train_loop.accumulation_windows(loader, accumulation):
            losses.append(train_loop.train_step(model, optimizer, scheduler, window, accelerator, 1.0,
                                                class_weights)["loss"])
    return losses


# --- accumulation ------------------------------------------------------------------------------


def test_accumulation_windows_include_the_partial_last_window():
    assert [len(w) for w in train_loop.accumulation_windows(range(11), 4)] == [4, 4, 3]
    assert [len(w) for w in train_loop.accumulation_windows(range(8), 4)] == [4, 4]


@pytest.mark.parametrize("class_weights", [None, [0.3, 2.5]], ids=["unweighted", "class_weights"])
def test_batch_8_x_accumulation_4_equals_batch_32(tiny_model_dir, accelerator, class_weights):
    """84 rows: windows of 32, 32 and a partial 20, for 3 epochs. Both runs must train identically,
    with class weights too: the weighted mean is taken over the whole window, not per micro-batch."""
    model_dir = tiny_model_dir("bert")
    small, tokenizer = make_lora_model(model_dir)
    big = copy.deepcopy(small)
    weights = None if class_weights is None else torch.tensor(class_weights)
    losses_small = run_epochs(small, tiny_loader(tokenizer, 84, 8), accelerator, accumulation=4, epochs=3,
                              class_weights=weights)
    losses_big = run_epochs(big, tiny_loader(tokenizer, 84, 32), accelerator, accumulation=1, epochs=3,
                            class_weights=weights)
    assert len(losses_small) == len(losses_big) == 9  # the partial window still produces a step
    assert losses_small == pytest.approx(losses_big, abs=1e-5)
    a, b = trainable_state(small), trainable_state(big)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    assert max((a[k] - trainable_state(make_lora_model(model_dir)[0])[k]).abs().max().item() for k in a) > 1e-3


def test_logged_loss_is_the_true_window_mean_and_no_gradient_is_left(tiny_model_dir, accelerator):
    model, tokenizer = make_lora_model(tiny_model_dir("bert"))
    window = list(tiny_loader(tokenizer, 20, 8))  # micro-batches of 8, 8 and 4
    with torch.no_grad():
        logits = torch.cat([model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits for b in window])
        expected = F.cross_entropy(logits, torch.cat([b["labels"] for b in window])).item()
    optimizer = train_loop.build_optimizer(model, 1e-3, 0.0)
    scheduler = train_loop.build_scheduler(optimizer, "constant", 0, 10)
    stats = train_loop.train_step(model, optimizer, scheduler, window, accelerator, 1.0)
    assert stats["loss"] == pytest.approx(expected, rel=1e-6)
    assert stats["samples"] == 20
    assert stats["tokens"] == sum(int(b["attention_mask"].sum()) for b in window)
    assert all(p.grad is None for p in model.parameters())  # nothing leaks into the next window


def test_optimizer_steps_on_the_last_micro_batch_of_each_window(tiny_model_dir, accelerator, monkeypatch):
    model, tokenizer = make_lora_model(tiny_model_dir("bert"))
    loader = tiny_loader(tokenizer, 88, 8)  # 11 micro-batches
    optimizer = train_loop.build_optimizer(model, 1e-3, 0.0)
    scheduler = train_loop.build_scheduler(optimizer, "constant", 0, 10)
    backward_calls, steps_after = [], []
    real_backward = accelerator.backward
    monkeypatch.setattr(accelerator, "backward", lambda loss: (backward_calls.append(1), real_backward(loss)))
    real_step = optimizer.step
    monkeypatch.setattr(optimizer, "step", lambda: (steps_after.append(len(backward_calls)), real_step()))
    for window in train_loop.accumulation_windows(loader, 4):
        train_loop.train_step(model, optimizer, scheduler, window, accelerator, 1.0)
    assert steps_after == [4, 8, 11]


# --- one step: what changes, what does not -----------------------------------------------------


def test_train_step_changes_only_lora_and_head(tiny_model_dir, accelerator):
    model, tokenizer = make_lora_model(tiny_model_dir("bert"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = train_loop.build_optimizer(model, 1e-2, 0.01)
    scheduler = train_loop.build_scheduler(optimizer, "constant", 0, 10)
    # two steps: LoRA's B starts at zero, so A only moves from the second step on
    for window in list(train_loop.accumulation_windows(tiny_loader(tokenizer, 32, 16), 1)):
        train_loop.train_step(model, optimizer, scheduler, window, accelerator, 1.0)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed == trainable
    assert any("lora_A" in n for n in changed) and any("lora_B" in n for n in changed)
    assert any("classifier" in n for n in changed)


def test_non_finite_loss_stops_before_the_optimizer_step(tiny_model_dir, accelerator):
    model, tokenizer = make_lora_model(tiny_model_dir("bert"))
    optimizer = train_loop.build_optimizer(model, 1e-2, 0.0)
    scheduler = train_loop.build_scheduler(optimizer, "constant", 0, 10)
    poisoned = next(p for n, p in model.named_parameters() if "lora_B" in n)
    with torch.no_grad():
        poisoned.fill_(float("nan"))
    before = trainable_state(model)
    window = [next(iter(tiny_loader(tokenizer, 16, 16)))]
    with pytest.raises(train_loop.NonFiniteLossError, match="nan"):
        train_loop.train_step(model, optimizer, scheduler, window, accelerator, 1.0)
    after = trainable_state(model)
    assert all(torch.equal(before[k], after[k]) or before[k].isnan().all() for k in before)
    assert scheduler.last_epoch == 0 and not optimizer.state  # neither stepped


def fp16_style_step(model_dir: str, poison_gradient: bool) -> tuple:
    """One train_step under a real gradient scaler (CPU has no fp16 autocast, but GradScaler's skip logic
    is the same on every device): with ``poison_gradient`` a LoRA gradient is inf, as when fp16 overflows."""
    from accelerate.optimizer import AcceleratedOptimizer

    model, tokenizer = make_lora_model(model_dir)
    local = Accelerator(cpu=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    # What prepare() sets up under --mixed_precision fp16 on a GPU: the scaler in the accelerator (it scales
    # the loss in backward) and in the wrapped optimizer (it unscales, and skips a step with inf gradients).
    optimizer = AcceleratedOptimizer(train_loop.build_optimizer(model, 1e-2, 0.0), scaler=scaler)
    local.scaler, local._optimizers = scaler, [optimizer]
    scheduler = train_loop.build_scheduler(optimizer, "linear", 2, 10)
    if poison_gradient:
        lora_b = next(p for n, p in model.named_parameters() if "lora_B" in n)
        lora_b.register_hook(lambda grad: torch.full_like(grad, float("inf")))
    before = trainable_state(model)
    train_loop.train_step(model, optimizer, scheduler, [next(iter(tiny_loader(tokenizer, 16, 16)))], local, 1.0)
    changed = any(not torch.equal(before[k], v) for k, v in trainable_state(model).items())
    return local.optimizer_step_was_skipped, changed, scheduler.last_epoch, scaler.get_scale()


def test_a_step_the_fp16_grad_scaler_skips_does_not_advance_the_schedule(tiny_model_dir):
    """An overflowing fp16 step is skipped by the scaler (weights unchanged, scale halved): the LR schedule,
    which counts optimizer steps, must not move either, or every skip shortens warmup and decay."""
    skipped, changed, schedule_step, scale = fp16_style_step(tiny_model_dir("bert"), poison_gradient=True)
    assert skipped and not changed and scale == 2.0**7
    assert schedule_step == 0
    # The same step with finite gradients is applied, and the schedule moves on.
    assert fp16_style_step(tiny_model_dir("bert"), poison_gradient=False) == (False, True, 1, 2.0**8)


# --- optimizer and schedule ----------------------------------------------------------------------


def test_weight_decay_only_on_matrices(tiny_model_dir):
    model, _ = make_lora_model(tiny_model_dir("bert"))
    decayed, plain = train_loop.build_optimizer(model, 1e-3, 0.1).param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.ndim == 2 for p in decayed["params"]) and all(p.ndim == 1 for p in plain["params"])
    assert len(decayed["params"]) + len(plain["params"]) == sum(p.requires_grad for p in model.parameters())


def lr_curve(kind: str, warmup: int, total: int) -> list[float]:
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = train_loop.build_scheduler(optimizer, kind, warmup, total)
    curve = []
    for _ in range(total):
        curve.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return curve


def test_linear_schedule_shape():
    curve = lr_curve("linear", 4, 20)
    assert curve[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])  # warmup to the peak
    assert all(a > b for a, b in zip(curve[4:], curve[5:]))  # then strictly down
    assert curve[-1] == pytest.approx(1 / 16)  # reaching zero after the last step


def test_cosine_and_constant_schedules():
    cosine = lr_curve("cosine", 2, 12)
    assert cosine[2] == pytest.approx(1.0) and cosine[7] == pytest.approx(0.5) and cosine[-1] < 0.03
    assert lr_curve("constant", 3, 10)[3:] == [1.0] * 7


# --- configuration --------------------------------------------------------------------------------


def test_every_field_is_a_flag_with_help():
    parser = settings.build_arg_parser()
    flags = {a.dest: a for a in parser._actions}
    for field in train_loop.dataclasses.fields(train_loop.TrainConfig):
        assert field.name in flags and flags[field.name].help


def test_config_file_then_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("learning_rate: 0.002\nlora_r: 4\ntarget_modules: [query, value]\n")
    cfg = train_loop.parse_config(["--config", str(path), "--lora_r", "8", "--no-group_by_length"])
    assert (cfg.learning_rate, cfg.lora_r, cfg.target_modules, cfg.group_by_length) == (0.002, 8, ["query", "value"], False)
    path.write_text(json.dumps({"learning_rat": 1}))
    with pytest.raises(train_loop.ConfigError, match="unknown settings \\['learning_rat'\\]"):
        train_loop.parse_config(["--config", str(path)])


@pytest.mark.parametrize("flags, message", [
    (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps must be a positive integer"),
    (["--learning_rate=-1e-3"], "--learning_rate must be > 0"),
    (["--batch_size", "0"], "--batch_size must be a positive integer"),
    (["--warmup_ratio", "1.5"], "--warmup_ratio must be in"),
    (["--lr_scheduler", "exp"], "--lr_scheduler must be linear, cosine or constant"),
    (["--mixed_precision", "fp8"], "--mixed_precision must be"),
])
def test_bad_flags_are_refused_with_one_line(flags, message, capsys):
    assert train_loop.main(flags + ["--output_dir", "/nonexistent/never-created"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1


def test_unknown_flag_is_one_error_line(capsys):
    assert train_loop.main(["--learning-rate", "1"]) == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: --learning-rate 1" in err and err.count("\n") == 1


# --- the whole job on a tiny model ------------------------------------------------------------


def test_tiny_job_learns_and_saves_everything(tiny_model_dir, tiny_csv, tmp_path):
    out = tmp_path / "run"
    assert train_loop.main(tiny_args(tiny_model_dir("bert"), tiny_csv, out, "--num_epochs", "8")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    train_losses = [h["train/loss"] for h in metrics["history"] if "train/loss" in h]
    assert train_losses[-1] < train_losses[0] * 0.7
    assert metrics["final"]["accuracy"] >= 0.9 > metrics["baseline"]["accuracy"]
    assert metrics["optimizer_steps"] == 8 * 20  # 160 train rows / batch 8, per epoch
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "config.json", "run_config.json"):
        assert (out / name).is_file()
    assert 0 < metrics["trainable_share"] < 1 and metrics["train_samples_per_s"] > 0


@pytest.mark.parametrize("flags, message", [
    (["--target_modules", "q_proj"], r"match no layer of this bert model.*\['dense', 'key', 'query', 'value'\]"),
    (["--model", "/nonexistent/model"], "could not load model '/nonexistent/model'.*embedded:minilm"),
    (["--text_column", "review"], "no text column 'review'"),
])
def test_bad_model_and_data_inputs_via_cli(tiny_model_dir, tiny_csv, tmp_path, flags, message, capsys):
    args = tiny_args(tiny_model_dir("bert"), tiny_csv, tmp_path / "run") + flags
    assert train_loop.main(args) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in err
    import re

    assert re.search(message, err), err


def test_output_dir_holding_a_run_is_protected(tiny_model_dir, tiny_csv, tmp_path, capsys):
    out = tmp_path / "run"
    args = tiny_args(tiny_model_dir("bert"), tiny_csv, out, "--max_steps", "2")
    assert train_loop.main(args) == 0
    saved = (out / "adapter_model.safetensors").read_bytes()
    assert train_loop.main(args) == 2
    assert "already holds a run (with the same settings)" in capsys.readouterr().err
    assert train_loop.main(args + ["--lora_r", "8"]) == 2
    assert "already holds a run (with lora_r=4 there vs 8 now)" in capsys.readouterr().err
    assert (out / "adapter_model.safetensors").read_bytes() == saved  # nothing lost
    assert train_loop.main(args + ["--lora_r", "8", "--overwrite"]) == 0
    assert json.loads((out / "run_config.json").read_text())["lora_r"] == 8
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert train_loop.main(tiny_args(tiny_model_dir("bert"), tiny_csv, foreign)) == 2
    assert "holds no run of this tool" in capsys.readouterr().err and (foreign / "notes.txt").exists()


def test_early_stopping_keeps_the_best_adapter(tiny_model_dir, tiny_csv, tmp_path):
    out = tmp_path / "run"
    args = tiny_args(tiny_model_dir("bert"), tiny_csv, out, "--learning_rate", "1e-9", "--eval_every", "2",
                     "--early_stopping_patience", "1", "--lr_scheduler", "constant", "--warmup_ratio", "0")
    assert train_loop.main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    evals = [h for h in metrics["history"] if "eval/accuracy" in h]
    assert metrics["optimizer_steps"] == 4 and [e["step"] for e in evals] == [2, 4]
    best = (out / "best_adapter" / "adapter_model.safetensors").read_bytes()
    assert (out / "adapter_model.safetensors").read_bytes() == best


def test_tensorboard_tracking_logs_train_and_eval_scalars(tiny_model_dir, tiny_csv, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert train_loop.main(tiny_args(tiny_model_dir("bert"), tiny_csv, out, "--max_steps", "4",
                                     "--log_every", "2", "--report_to", "tensorboard")) == 0
    events = sorted(out.rglob("events.out.tfevents*"))
    assert events, "no tensorboard event file written"
    scalars = set()
    for event_file in events:
        accumulator = EventAccumulator(str(event_file))
        accumulator.Reload()
        scalars |= set(accumulator.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/samples_per_s", "eval/accuracy"} <= scalars


@pytest.mark.parametrize("entry", ["train_loop.py", "eval.py"])
def test_help_of_every_entry_point_runs(entry):
    """The first command the README shows. argparse %-formats help texts: one stray '%' made it a traceback."""
    import subprocess
    import sys
    from pathlib import Path

    result = subprocess.run([sys.executable, entry, "--help"], capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).resolve().parent.parent)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "--output_dir" in result.stdout or "--adapter_dir" in result.stdout
    if entry == "train_loop.py":  # the settings come in the groups users know from the transformers examples
        for group in ("data:", "model and LoRA:", "optimisation:", "evaluation and checkpoints:",
                      "output and logging:", "performance:"):
            assert f"\n{group}" in result.stdout, group
