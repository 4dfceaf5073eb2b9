"""One direct, fast test per step of the loop that a one-line slip breaks silently (the run still finishes,
with a wrong number): evaluation in eval mode, the direction of "best", the seeded sampler, the process-count
factor of the loss scale, and the duplicate-dropping gather of evaluation."""

import copy

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from conftest import sentiment_rows, train_step_gradients
from test_train_loop import make_lora_model, tiny_loader

import best_adapter
import data
import eval as evaluation
import train_loop


@pytest.fixture
def accelerator():
    return Accelerator(cpu=True)


def eval_loader(tokenizer, n: int, batch_size: int):
    import datasets

    rows = sentiment_rows(n, seed=5)
    ds = datasets.Dataset.from_dict({"text": [t for t, _ in rows], "label": [y for _, y in rows]})
    return data.build_dataloader(data.tokenize(ds, tokenizer, 32), tokenizer.pad_token_id, batch_size, train=False)


def reference_loss(model, loader) -> float:
    """The mean cross-entropy over every row of ``loader``, the model in eval mode (no dropout)."""
    model.eval()
    with torch.no_grad():
        losses = [F.cross_entropy(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                                  b["labels"], reduction="none") for b in loader]
    model.train()
    return torch.cat(losses).mean().item()


# --- (a) evaluation runs with dropout off, and hands the model back in training mode -----------------


def test_evaluate_turns_dropout_off_and_restores_training_mode(tiny_model_dir, accelerator):
    model, tokenizer = make_lora_model(tiny_model_dir("bert"), dropout=0.5)
    model.train()
    loader = eval_loader(tokenizer, 24, 8)
    batch = next(iter(loader))
    with torch.no_grad():  # the check can fail: in training mode, dropout changes every forward pass
        assert not torch.equal(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                               model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits)
    first = evaluation.evaluate(model, loader, accelerator, ["0", "1"])
    assert model.training and all(m.training for m in model.modules())  # back in training mode for the loop
    second = evaluation.evaluate(model, loader, accelerator, ["0", "1"])
    assert first == second  # no dropout: the same weights score the same, to the last bit
    assert first["loss"] == pytest.approx(reference_loss(model, loader), rel=1e-6)


# --- (b) the best adapter: higher accuracy is better, lower loss is better ---------------------------


def keeper_for(metric: str, **settings) -> best_adapter.BestAdapter:
    cfg = train_loop.TrainConfig(metric_for_best=metric, **settings)
    return best_adapter.BestAdapter(None, None, metric, best_adapter.greater_is_better(cfg, metric), 0, None)


@pytest.mark.parametrize("metric", ["accuracy", "f1", "f1_micro", "balanced_accuracy"])
def test_a_higher_score_is_better(metric):
    keeper = keeper_for(metric)
    assert keeper.improves(0.80, None)  # the first evaluation is the best so far
    assert keeper.improves(0.81, 0.80)
    assert not keeper.improves(0.79, 0.80)
    assert not keeper.improves(0.80, 0.80)  # a tie keeps the earlier adapter


@pytest.mark.parametrize("metric", ["loss", "hamming_loss"])
def test_a_lower_loss_is_better(metric):
    keeper = keeper_for(metric)
    assert keeper.improves(0.30, 0.40)
    assert not keeper.improves(0.50, 0.40)
    assert not keeper.improves(0.40, 0.40)


def test_greater_is_better_overrides_the_metric_s_direction():
    assert keeper_for("loss", greater_is_better=True).improves(0.5, 0.4)
    assert keeper_for("accuracy", greater_is_better=False).improves(0.7, 0.8)


# --- (c) the sampler: its order follows the seed and the epoch, and nothing else ----------------------


def train_order(lengths, seed: int, epoch: int = 0, group_by_length: bool = True) -> list[int]:
    tokenized = {"input_ids": [[1] * n for n in lengths], "labels": [0] * len(lengths)}
    loader = data.build_dataloader(tokenized, 0, 4, train=True, group_by_length=group_by_length, seed=seed,
                                   num_processes=1)
    loader.batch_sampler.set_epoch(epoch)
    return [i for batch in loader.batch_sampler for i in batch]


@pytest.mark.parametrize("group_by_length", [True, False])
def test_the_train_order_follows_seed_and_epoch(group_by_length):
    lengths = [(7 * i) % 23 + 1 for i in range(64)]
    order = train_order(lengths, seed=1, group_by_length=group_by_length)
    assert sorted(order) == list(range(64))  # every row once
    assert train_order(lengths, seed=1, group_by_length=group_by_length) == order  # same seed: same order
    assert train_order(lengths, seed=2, group_by_length=group_by_length) != order  # another seed: another order
    assert train_order(lengths, seed=1, epoch=1, group_by_length=group_by_length) != order  # each epoch reshuffles
    assert order != list(range(64)) and order != sorted(range(64), key=lengths.__getitem__)  # shuffled at all


# --- (d) the loss scale's process-count factor -----------------------------------------------------


class TwoIdenticalProcesses:
    """What ``train_step`` sees on each of 2 processes holding the same micro-batch: ``reduce`` sums over
    both (twice the local value), and DDP *averages* the two (identical) gradients, which leaves the local
    gradient as it is. The step's gradient must then be the mean gradient over the 2 x N rows, which is
    the one-batch mean gradient."""

    num_processes = 2
    optimizer_step_was_skipped = False

    def __init__(self):
        self.real = Accelerator(cpu=True)
        self.device, self.gradient_state, self.distributed_type = self.real.device, self.real.gradient_state, \
            self.real.distributed_type

    def reduce(self, tensor, reduction="sum"):
        assert reduction == "sum"
        return tensor * 2

    def no_sync(self, model):
        return self.real.no_sync(model)

    def backward(self, loss, **kwargs):
        loss.backward()  # the average of two identical gradients is that gradient

    def clip_grad_norm_(self, parameters, max_norm):
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)


def test_the_loss_scale_undoes_ddp_s_average_over_processes(tiny_model_dir):
    model, tokenizer = make_lora_model(tiny_model_dir("bert"))
    reference = copy.deepcopy(model)
    batch = next(iter(tiny_loader(tokenizer, 8, 8, seed=2)))
    logits = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = F.cross_entropy(logits, batch["labels"])  # the mean over the batch
    expected.backward()
    stats, grads = train_step_gradients(model, [batch], TwoIdenticalProcesses())
    assert stats["samples"] == 16  # both processes' rows
    assert stats["loss"] == pytest.approx(expected.item(), rel=1e-6)
    reference_grads = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    assert grads.keys() == reference_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference_grads[name], rtol=1e-5, atol=1e-7)


# --- (e) evaluation counts each eval row once, however the last batch was padded ----------------------


class PaddedLastBatch:
    """Evaluation as Accelerate runs it on several processes: the last batch is topped up with copies of
    rows already seen so that every process holds a full batch; ``gather`` returns those copies with the
    rest, ``gather_for_metrics`` drops them (here for one process, which holds the copies itself)."""

    def __init__(self, copies: int):
        self.copies, self.on_last_batch = copies, False

    def batches(self, loader):
        batches = list(loader)
        for i, batch in enumerate(batches):
            self.on_last_batch = i == len(batches) - 1
            yield ({k: torch.cat([v, v[:self.copies]]) for k, v in batch.items()} if self.on_last_batch else batch)

    def gather(self, tensors):
        return tensors

    def gather_for_metrics(self, tensors):
        return tuple(t[:len(t) - self.copies] for t in tensors) if self.on_last_batch else tensors


def test_evaluate_drops_the_rows_padded_onto_the_last_batch(tiny_model_dir, accelerator):
    model, tokenizer = make_lora_model(tiny_model_dir("bert"))
    loader = eval_loader(tokenizer, 21, 8)  # batches of 8, 8 and 5 rows; the last one topped up with 3 copies
    exact = evaluation.evaluate(model, loader, accelerator, ["0", "1"])
    fake = PaddedLastBatch(copies=3)
    padded = evaluation.evaluate(model, fake.batches(loader), fake, ["0", "1"])
    assert exact["num_samples"] == padded["num_samples"] == 21
    assert padded["loss"] == pytest.approx(exact["loss"], rel=1e-6)
    assert padded["confusion_matrix"] == exact["confusion_matrix"]
