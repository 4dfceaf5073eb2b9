"""Gradient accumulation under DeepSpeed's rules, on CPU (DeepSpeed itself needs a GPU).

Under DeepSpeed, ``accelerator.backward`` hands the loss to the engine, which divides it by the
accumulation steps of its config and *steps the optimizer itself* whenever Accelerate's
``sync_gradients`` flag is true (accelerate/utils/deepspeed.py, DeepSpeedEngineWrapper.backward). A loop
that accumulates on its own without telling the engine steps on every micro-batch. ``FakeDeepSpeed``
below follows those two rules exactly; ``train_step`` must give the engine the same gradient, once per
window, as it gives the optimizer without DeepSpeed -- the short last window of an epoch included --
and must stop a NaN before the engine's step.
"""

import math

import pytest
from accelerate import Accelerator
from accelerate.utils import DistributedType
from test_train_loop import make_lora_model, tiny_loader

import train_loop


class FakeDeepSpeed:
    """The Accelerate + DeepSpeed contract train_step relies on, for one process."""

    distributed_type = DistributedType.DEEPSPEED
    optimizer_step_was_skipped = False  # the engine skips a step only on an fp16 overflow

    def __init__(self, engine_accumulation: int):
        self.real = Accelerator(cpu=True)
        self.device, self.num_processes = self.real.device, 1
        self.deepspeed_config = {"gradient_accumulation_steps": engine_accumulation}
        self.gradient_state = self.real.gradient_state
        self.engine_steps = []  # the gradient the engine stepped with, one entry per step

    def reduce(self, tensor, reduction="sum"):
        return tensor

    def no_sync(self, model):
        return self.real.no_sync(model)

    def backward(self, loss, model=None):
        (loss / self.deepspeed_config["gradient_accumulation_steps"]).backward()  # the engine's scaling
        if self.gradient_state.sync_gradients:  # ... and its step
            self.engine_steps.append({n: p.grad.clone() for n, p in self.model.named_parameters() if p.grad is not None})

    def clip_grad_norm_(self, parameters, max_norm):
        return None  # the engine clips inside its step


def run_windows(model, accelerator, windows):
    optimizer = train_loop.build_optimizer(model, 1e-3, 0.0)
    scheduler = train_loop.build_scheduler(optimizer, "constant", 0, 10)
    grads = []
    real_step = optimizer.step

    def recording_step(*args, **kwargs):
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        return real_step(*args, **kwargs)

    optimizer.step = recording_step
    for window in windows:
        train_loop.train_step(model, optimizer, scheduler, window, accelerator, 0.0)
    return grads


@pytest.mark.parametrize("engine_accumulation", [1, 4])
def test_the_engine_steps_once_per_window_with_the_exact_gradient(tiny_model_dir, engine_accumulation):
    model, tokenizer = make_lora_model(tiny_model_dir("bert"))
    batches = list(tiny_loader(tokenizer, 44, 4))  # 11 micro-batches: windows of 4, 4 and a short 3
    windows = [batches[0:4], batches[4:8], batches[8:11]]
    reference = run_windows(model, Accelerator(cpu=True), windows)

    model, _ = make_lora_model(tiny_model_dir("bert"))
    fake = FakeDeepSpeed(engine_accumulation)
    fake.model = model
    run_windows(model, fake, windows)
    assert len(fake.engine_steps) == len(windows) == len(reference)  # not one step per micro-batch
    for engine, plain in zip(fake.engine_steps, reference):
        assert max((engine[k] - plain[k]).abs().max().item() for k in plain) <= 1e-7


def test_a_nan_stops_before_the_engine_steps(tiny_model_dir, monkeypatch):
    model, tokenizer = make_lora_model(tiny_model_dir("bert"))
    fake = FakeDeepSpeed(4)
    fake.model = model
    window = list(tiny_loader(tokenizer, 16, 4))
    real_cross_entropy = train_loop.F.cross_entropy
    calls = []

    def nan_on_the_last(*args, **kwargs):
        calls.append(1)
        loss = real_cross_entropy(*args, **kwargs)
        return loss * math.nan if len(calls) == len(window) else loss

    monkeypatch.setattr(train_loop.F, "cross_entropy", nan_on_the_last)
    with pytest.raises(train_loop.NonFiniteLossError):
        run_windows(model, fake, [window])
    assert fake.engine_steps == []  # the engine never stepped on the bad window
