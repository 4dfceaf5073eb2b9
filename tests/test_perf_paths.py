"""The speed-related code paths, most of which only run on a GPU, checked on CPU.

On CUDA the loop pads widths to a multiple of 8, uses DataLoader workers and pinned memory, fused
AdamW, and logs MFU; everywhere it batches by length. None of that needs a GPU to be tested.
"""

import pytest
import torch
from accelerate.data_loader import BatchSamplerShard, prepare_data_loader
from conftest import sentiment_rows, tiny_args
from torch.utils.data import BatchSampler

import data
import lora_setup
import metering
import performance
import train_loop


def make_lengths(n: int, seed: int = 0) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, 200, (n,), generator=generator).tolist()


def batches_of(order: list[int], batch_size: int) -> list[list[int]]:
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def padded_share(batches: list[list[int]], lengths: list[int]) -> float:
    """Real tokens / padded token slots when each batch is padded to its longest row."""
    real = sum(lengths[i] for b in batches for i in b)
    return real / sum(len(b) * max(lengths[i] for i in b) for b in batches)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return lora_setup.load_tokenizer(tiny_model_dir("bert"))


@pytest.fixture(scope="module")
def tokenized(tokenizer):
    import datasets

    rows = sentiment_rows(60)
    ds = datasets.Dataset.from_dict({"text": [t for t, _ in rows], "label": [y for _, y in rows]})
    return data.tokenize(ds, tokenizer, 32)


# --- padding to a multiple of 8 (tensor-core shapes) ---------------------------------------------


def test_pad_to_multiple_of_8_gives_aligned_widths_and_a_mask_that_matches(tokenized, tokenizer):
    loader = data.build_dataloader(tokenized, tokenizer.pad_token_id, 7, train=True, pad_to_multiple_of=8)
    widths = set()
    for batch in loader:
        width = batch["input_ids"].shape[1]
        widths.add(width)
        assert width % 8 == 0
        longest = int(batch["attention_mask"].sum(1).max())
        assert width - 8 < longest <= width  # rounded up, never by a whole extra block
        assert torch.all((batch["input_ids"] == tokenizer.pad_token_id) == (batch["attention_mask"] == 0))
    assert widths  # the loader yielded something


def test_pad_to_multiple_keeps_a_width_that_is_already_a_multiple():
    rows = [{"input_ids": [5] * 16, "labels": 0}, {"input_ids": [5] * 3, "labels": 1}]
    assert data.collate(rows, 0, pad_to_multiple_of=8)["input_ids"].shape == (2, 16)
    assert data.collate(rows, 0)["input_ids"].shape == (2, 16)


def test_workers_and_pinned_memory_yield_the_same_batches_as_the_main_process(tokenized, tokenizer):
    """The GPU default (2 workers, persistent) must not change what is trained on; the Collator pickles."""
    plain = data.build_dataloader(tokenized, tokenizer.pad_token_id, 8, train=True, seed=3)
    workers = data.build_dataloader(tokenized, tokenizer.pad_token_id, 8, train=True, seed=3, num_workers=2)
    for a, b in zip(plain, workers, strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])


# --- LengthGroupedSampler -------------------------------------------------------------------------


def test_grouped_order_is_a_permutation_with_the_partial_batch_last():
    lengths = make_lengths(100)
    order = list(data.LengthGroupedSampler(lengths, 8, seed=1, mega_batch_factor=4))
    assert sorted(order) == list(range(100))
    assert [len(b) for b in batches_of(order, 8)] == [8] * 12 + [4]


def test_every_batch_is_a_run_of_similar_lengths():
    """With one mega-batch spanning the data, the batches are exactly consecutive slices of the rows
    sorted by length (the partial one holds the shortest rows); only their order is shuffled."""
    lengths = list(range(100, 0, -1))  # distinct lengths make the expected slices unique
    sampler = data.LengthGroupedSampler(lengths, 8, seed=1, mega_batch_factor=100)
    by_length = sorted(range(100), key=lengths.__getitem__, reverse=True)
    expected = {frozenset(b) for b in batches_of(by_length, 8)}
    got = batches_of(list(sampler), 8)
    assert {frozenset(b) for b in got} == expected
    assert set(got[-1]) == set(by_length[-4:])


def test_grouping_removes_most_padding_with_default_mega_batches():
    lengths = make_lengths(2000)
    grouped = batches_of(list(data.LengthGroupedSampler(lengths, 16, seed=0)), 16)
    random = batches_of(list(data.LengthGroupedSampler(lengths, 16, seed=0, group_by_length=False)), 16)
    assert padded_share(grouped, lengths) > 0.95
    assert padded_share(random, lengths) < 0.7


def test_batch_order_is_shuffled_not_long_to_short():
    lengths = make_lengths(400)
    batches = batches_of(list(data.LengthGroupedSampler(lengths, 8, seed=0, mega_batch_factor=50)), 8)[:-1]
    longest = [max(lengths[i] for i in b) for b in batches]
    assert longest != sorted(longest, reverse=True) and longest != sorted(longest)


def test_order_depends_only_on_seed_and_epoch():
    lengths = make_lengths(300)

    def order(seed, epoch):
        sampler = data.LengthGroupedSampler(lengths, 8, seed=seed, mega_batch_factor=5)
        sampler.set_epoch(epoch)
        return list(sampler)

    torch.manual_seed(123)  # the global RNG must not matter
    first = order(7, 0)
    torch.manual_seed(999)
    assert order(7, 0) == first
    assert order(7, 1) != first
    assert order(8, 0) != first


def test_unshuffled_sampler_sorts_by_length_for_fast_evaluation():
    lengths = make_lengths(50)
    order = list(data.LengthGroupedSampler(lengths, 8, shuffle=False))
    assert [lengths[i] for i in order] == sorted(lengths)
    assert list(data.LengthGroupedSampler(lengths, 8, shuffle=False, group_by_length=False)) == list(range(50))


def test_two_processes_each_get_whole_grouped_batches_and_cover_the_data():
    """accelerate's BatchSamplerShard deals our batches out in turn: rank 0 gets batches 0, 2, 4 ...,
    rank 1 gets 1, 3, 5 ... (never a batch cut in two); the odd, partial last batch is topped up with
    rows from the start so both ranks run the same number of steps (else DDP would hang)."""
    lengths = make_lengths(100)
    sampler = data.LengthGroupedSampler(lengths, 8, seed=5, mega_batch_factor=4)
    batches = batches_of(list(sampler), 8)  # 12 full batches + 1 of 4
    shards = [list(BatchSamplerShard(BatchSampler(sampler, 8, drop_last=False), num_processes=2, process_index=rank))
              for rank in (0, 1)]
    assert shards[0][:-1] == batches[0:12:2] and shards[1][:-1] == batches[1:12:2]
    assert shards[0][-1][:4] == batches[-1]
    assert len(shards[0]) == len(shards[1])
    assert set().union(*(set(b) for shard in shards for b in shard)) == set(range(100))


def test_prepared_loaders_on_two_processes_follow_set_epoch_together(tokenized, tokenizer):
    """Through accelerate's prepare_data_loader, as in a 2-process launch: set_epoch reaches our sampler,
    both ranks see disjoint whole batches of the same epoch order, and every row is trained on."""
    base = data.build_dataloader(tokenized, tokenizer.pad_token_id, 4, train=True, seed=0)
    n = len(tokenized)

    def rank_rows(rank: int, epoch: int) -> list[list[tuple]]:
        loader = prepare_data_loader(base, num_processes=2, process_index=rank, put_on_device=False)
        loader.set_epoch(epoch)
        return [[tuple(row[row != tokenizer.pad_token_id].tolist()) for row in batch["input_ids"]]
                for batch in loader]

    all_rows = {tuple(ids) for ids in tokenized["input_ids"]}
    for epoch in (0, 1):
        ranks = [rank_rows(0, epoch), rank_rows(1, epoch)]
        seen = {row for batches in ranks for batch in batches for row in batch}
        assert seen == all_rows and len(all_rows) == n
        for batches in ranks:  # each rank's batches are length-grouped: every row within 3 tokens of the next
            for batch in batches[:-1]:
                sizes = sorted(len(r) for r in batch)
                assert sizes[-1] - sizes[0] <= 3
    assert rank_rows(0, 0) == rank_rows(0, 0) and rank_rows(0, 0) != rank_rows(0, 1)


# --- throughput helpers and the optimizer ---------------------------------------------------------


@pytest.mark.parametrize("fused", [False, True])
def test_optimizer_decays_matrices_only_and_steps_fused(tiny_model_dir, fused):
    model_dir = tiny_model_dir("bert")
    tokenizer = lora_setup.load_tokenizer(model_dir)
    model, heads = lora_setup.load_base_model(model_dir, ["0", "1"], tokenizer.pad_token_id)
    model = lora_setup.apply_lora(model, lora_setup.build_lora_config(model, heads, r=4, alpha=8, dropout=0.0))
    optimizer = train_loop.build_optimizer(model, 1e-3, 0.05, fused=fused)
    decay, no_decay = optimizer.param_groups
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim < 2 for p in no_decay["params"])
    assert no_decay["params"]  # the head's bias at least
    assert {id(p) for p in decay["params"] + no_decay["params"]} == {id(p) for p in trainable}
    assert bool(optimizer.defaults["fused"]) is fused
    for p in trainable:  # a step runs (fused AdamW has a CPU kernel too) and moves only trainable weights
        p.grad = torch.ones_like(p)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer.step()
    for name, p in model.named_parameters():
        assert torch.equal(before[name], p) != p.requires_grad, name


def test_training_log_reports_throughput_and_no_gpu_figures_on_cpu(tiny_model_dir, tiny_csv, tmp_path):
    import json

    out = tmp_path / "run"
    assert train_loop.main(tiny_args(tiny_model_dir("bert"), tiny_csv, out, "--max_steps", "4", "--log_every", "2")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    logs = [h for h in metrics["history"] if "train/samples_per_s" in h]
    assert [h["step"] for h in logs] == [2, 4]
    assert all(h["train/samples_per_s"] > 0 and h["train/tokens_per_s"] > 0 for h in logs)
    assert not any("train/mfu" in h or "train/peak_memory_gb" in h for h in logs)
    assert metrics["train_samples_per_s"] > 0 and metrics["train_tokens_per_s"] > 0


# ------------------------------------------------------------------------------------------------
# FastDropout: the same dropout as nn.Dropout, with a cheaper mask on CPU
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_fast_dropout_drops_a_share_p_and_keeps_the_expected_value(p):
    torch.manual_seed(0)
    n = 2_000_000
    out = performance.FastDropout(p)(torch.ones(n))
    dropped = (out == 0).float().mean().item()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(dropped - p) < 5 * sigma
    values = out.unique().tolist()
    assert len(values) == 2 and values[0] == 0.0 and values[1] == pytest.approx(1 / (1 - p), rel=1e-4)
    assert abs(out.mean().item() - 1) < 5 * sigma / (1 - p)  # unbiased, like nn.Dropout
    # Elements are independent: a mask drawn in 16-bit slices of 64-bit words shows no pattern by position.
    by_slot = (out.view(-1, 4) == 0).float().mean(dim=0)
    assert (by_slot - p).abs().max() < 5 * sigma * 2


def test_fast_dropout_gradient_flows_through_the_kept_elements_only():
    torch.manual_seed(1)
    x = torch.randn(8, 5, 16, requires_grad=True)
    out = performance.FastDropout(0.3)(x)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    kept = out != 0
    scale = out.detach()[kept] / x.detach()[kept]
    assert torch.allclose(scale, torch.full_like(scale, scale[0].item())) and scale[0] == pytest.approx(1 / 0.7, rel=1e-4)
    assert torch.equal(x.grad, torch.where(kept, grad_out * scale[0], 0.0))


def test_fast_dropout_is_reproducible_from_the_seed_and_fresh_on_each_call():
    layer = performance.FastDropout(0.2)
    x = torch.ones(3, 7, 11)  # a size that is not a multiple of 4: the last 64-bit word is only partly used
    torch.manual_seed(5)
    first, second = layer(x), layer(x)
    torch.manual_seed(5)
    assert torch.equal(layer(x), first) and not torch.equal(first, second)


def test_fast_dropout_is_the_identity_in_eval_and_at_p_0_and_zeros_at_p_1():
    x = torch.randn(4, 9, dtype=torch.bfloat16)
    assert performance.FastDropout(0.5).eval()(x) is x and performance.FastDropout(0.0)(x) is x
    assert torch.equal(performance.FastDropout(1.0)(x), torch.zeros_like(x))
    assert performance.FastDropout(0.5)(x).dtype == torch.bfloat16


def test_use_fast_dropout_swaps_every_dropout_on_cpu_only(tiny_model_dir):
    model_dir = tiny_model_dir("bert")
    tokenizer = lora_setup.load_tokenizer(model_dir)
    model, heads = lora_setup.load_base_model(model_dir, ["0", "1"], tokenizer.pad_token_id)
    model = lora_setup.apply_lora(model, lora_setup.build_lora_config(model, heads, r=4, alpha=8, dropout=0.2))
    dropouts = {name: m.p for name, m in model.named_modules() if isinstance(m, torch.nn.Dropout)}
    assert any("lora_dropout" in name for name in dropouts)  # LoRA's own dropout is covered too
    keys = set(model.state_dict())
    batch = tokenizer(["a fine film", "dull"], padding=True, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        before = model(**batch).logits
    assert performance.use_fast_dropout(model, torch.device("cuda")) == 0  # a GPU keeps PyTorch's fused kernel
    assert performance.use_fast_dropout(model, torch.device("cpu")) == len(dropouts)
    swapped = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Dropout)}
    assert all(type(m) is performance.FastDropout for m in swapped.values())
    assert {name: m.p for name, m in swapped.items()} == dropouts
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, before)  # eval: no dropout either way
    model.train()
    torch.manual_seed(0)
    assert not torch.equal(model(**batch).logits, before)  # training: the masks are drawn
    assert set(model.state_dict()) == keys  # no weights added: saved adapters are unchanged
    assert train_loop.parse_config(["--no-fast_dropout"]).fast_dropout is False
    assert train_loop.parse_config([]).fast_dropout is True


# Every way Python reads a tensor's value: on a GPU each one makes the CPU wait until the GPU has caught up.
HOST_READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__")
LOOP_CODE = {"train_loop.py": {"fit", "train_step", "accumulation_windows", "log_progress", "multi_label_loss"},
             "metering.py": {"add", "record", "paused"}}


def test_the_loop_reads_the_device_once_per_step_and_once_per_log_line(tiny_model_dir, tiny_csv, tmp_path,
                                                                       monkeypatch):
    """The training loop's own code (not evaluation or checkpoints, which are not training time) reads a
    device value once per optimizer step (the mean loss, for the NaN check) and once per log line (the
    summed counts), whatever the accumulation. Counted on CPU by watching every tensor read it makes."""
    import sys
    from pathlib import Path

    reads = []
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def spy(self, *args, _original=original, _name=name, **kwargs):
            caller = sys._getframe(1).f_code
            if caller.co_name in LOOP_CODE.get(Path(caller.co_filename).name, ()):
                reads.append((_name, caller.co_name))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    args = tiny_args(tiny_model_dir("bert"), tiny_csv, tmp_path / "out", "--max_steps", "6", "--log_every", "2",
                     "--gradient_accumulation_steps", "3")
    assert train_loop.main(args) == 0
    assert sorted(reads) == sorted([("item", "train_step")] * 6 + [("tolist", "record")] * 3)
