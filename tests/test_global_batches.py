"""Length grouping must not depend on the process count (issue #10, part A).

Accelerate shards a prepared DataLoader's batch sampler with ``BatchSamplerShard``: batch i goes to
process i % N. One optimizer step therefore trains on the rows of N consecutive batches: the *global*
batch. These tests deal our batches out exactly as Accelerate does, for 1, 2 and 4 processes at the
same global batch size, and check that every step sees the same set of rows whatever the process count,
including the partial last global batch (never topped up with repeated rows) and the epoch order.
"""

import pytest
import torch
from accelerate.data_loader import BatchSamplerShard, prepare_data_loader, skip_first_batches
from conftest import make_tokenizer, sentiment_rows

import data

GLOBAL = 16


def make_lengths(n: int, seed: int = 0) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, 60, (n,), generator=generator).tolist()


def global_batches(lengths, world: int, *, epoch: int = 0, group: bool = True, seed: int = 3, factor: int = 4):
    """The row sets of every optimizer step when ``world`` processes each take GLOBAL // world rows,
    sharded exactly like ``accelerate.prepare`` does; ignored rows (``~i``) are left out."""
    sampler = data.LengthGroupedSampler(lengths, GLOBAL // world, seed=seed, group_by_length=group,
                                        mega_batch_factor=factor, num_processes=world)
    batch_sampler = data.GlobalBatchSampler(sampler)
    batch_sampler.set_epoch(epoch)
    shards = [list(BatchSamplerShard(batch_sampler, num_processes=world, process_index=rank)) for rank in range(world)]
    assert len({len(s) for s in shards}) == 1, "every process must run the same number of steps"
    assert all(len(b) > 0 for s in shards for b in s), "an empty batch crashes the forward pass"
    return [frozenset(i for piece in step for i in piece if i >= 0) for step in zip(*shards)]


@pytest.mark.parametrize("n", [96, 100, 98, 97, 7])
@pytest.mark.parametrize("group", [True, False])
def test_global_batches_are_identical_for_1_2_and_4_processes(n, group):
    lengths = make_lengths(n)
    for epoch in (0, 1):
        reference = global_batches(lengths, 1, epoch=epoch, group=group)
        for world in (2, 4):
            assert global_batches(lengths, world, epoch=epoch, group=group) == reference, (n, world, epoch)
        # Every row exactly once per epoch: no row dropped, none repeated to top up the last batch.
        assert sorted(i for b in reference for i in b) == list(range(n))
        # Full global batches, the single partial one last.
        sizes = [len(b) for b in reference]
        assert sizes[:-1] == [GLOBAL] * (len(sizes) - 1) and 0 < sizes[-1] <= GLOBAL
    if n > GLOBAL:  # a new epoch, a new order
        assert global_batches(lengths, 2, epoch=1, group=group) != global_batches(lengths, 2, epoch=0, group=group)


def test_global_batches_are_grouped_by_length():
    """Grouping is done on the global batch: each one is a run of similar lengths (the sampler's point)."""
    lengths = make_lengths(2000)
    spread = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in global_batches(lengths, 4, factor=50)]
    assert sum(spread) / len(spread) < 3  # a random batch of 16 of these spans ~50 length units


def test_a_partial_global_batch_is_shared_evenly_and_never_leaves_a_process_without_rows():
    # Dealt in turn: a global batch sorted longest first gives every process rows of the same lengths.
    assert data.split_global_batch(list(range(16)), 2) == [list(range(0, 16, 2)), list(range(1, 16, 2))]
    assert data.split_global_batch([5, 6, 7, 8, 9], 2) == [[5, 7, 9], [6, 8]]
    # Fewer rows than processes: the rest get an ignored copy (~index) of a real row.
    assert data.split_global_batch([5, 6], 4) == [[5], [6], [~5], [~5]]


def test_ignored_rows_carry_the_ignored_label_and_add_no_loss(tokenized_rows):
    rows = data.TrainRows(tokenized_rows)
    real, ignored = rows.__getitems__([3, ~3])
    assert ignored["input_ids"] == real["input_ids"] and real["labels"] in (0, 1)
    assert ignored["labels"] == data.IGNORED_LABEL
    batch = data.collate([real, ignored], 0)
    logits = torch.randn(2, 2, requires_grad=True)
    loss = torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum")
    loss.backward()
    assert torch.equal(logits.grad[1], torch.zeros(2))  # the ignored row: no gradient at all
    assert int((batch["labels"] != data.IGNORED_LABEL).sum()) == 1


@pytest.fixture
def tokenized_rows():
    import datasets

    rows = sentiment_rows(70)
    ds = datasets.Dataset.from_dict({"text": [t for t, _ in rows], "label": [y for _, y in rows]})
    return data.tokenize(ds, make_tokenizer(), 32)


def prepared_steps(tokenized, world: int, epoch: int, skip: int = 0) -> list[set]:
    """Rows per optimizer step through ``accelerate.prepare_data_loader``, as in a real launch."""
    loaders = []
    for rank in range(world):
        base = data.build_dataloader(tokenized, 0, GLOBAL // world, train=True, seed=1, num_processes=world)
        loader = prepare_data_loader(base, num_processes=world, process_index=rank, put_on_device=False)
        loader.set_epoch(epoch)  # as the training loop does: must reach our sampler through the wrappers
        loaders.append(skip_first_batches(loader, skip) if skip else loader)
        assert len(loader) == -(-len(tokenized) // GLOBAL)  # per process: one micro-batch per global batch
    steps = []
    for batches in zip(*loaders, strict=True):
        rows = set()
        for batch in batches:
            for ids, label in zip(batch["input_ids"], batch["labels"]):
                if label != data.IGNORED_LABEL:
                    rows.add(tuple(ids[ids != 0].tolist()))
        steps.append(rows)
    return steps


def test_prepared_loaders_give_the_same_steps_on_1_and_2_processes_and_resume_alike(tokenized_rows):
    """70 rows, global batch 16: 4 full steps and a partial one of 6 rows, on 1 and on 2 processes;
    skipping k micro-batches per process (the resume path) skips the same k global batches."""
    for epoch in (0, 1):
        one = prepared_steps(tokenized_rows, 1, epoch)
        assert [len(s) for s in one] == [16, 16, 16, 16, 6]
        assert prepared_steps(tokenized_rows, 2, epoch) == one
        assert prepared_steps(tokenized_rows, 4, epoch) == one
        assert prepared_steps(tokenized_rows, 2, epoch, skip=2) == one[2:]
        assert prepared_steps(tokenized_rows, 1, epoch, skip=3) == one[3:]
    assert prepared_steps(tokenized_rows, 2, 0) != prepared_steps(tokenized_rows, 2, 1)


def test_one_process_keeps_the_previous_batches():
    """num_processes=1 is the sampler the project always had: same order, same batches (no behaviour
    change for single-process runs, the bench and earlier results)."""
    lengths = make_lengths(100)
    order = list(data.LengthGroupedSampler(lengths, 8, seed=1, mega_batch_factor=4))
    batches = list(data.GlobalBatchSampler(data.LengthGroupedSampler(lengths, 8, seed=1, mega_batch_factor=4)))
    assert [i for b in batches for i in b] == order
    assert [len(b) for b in batches] == [8] * 12 + [4]


def test_train_loader_reports_its_per_process_batch_size(tokenized_rows):
    """Accelerate's DeepSpeed setup fills train_micro_batch_size_per_gpu="auto" from loader.batch_size."""
    loader = data.build_dataloader(tokenized_rows, 0, 8, train=True, num_processes=2)
    assert loader.batch_size == 8 and loader.batch_sampler.num_processes == 2
    assert loader.sampler is loader.batch_sampler.sampler  # loader.sampler.set_epoch reaches our sampler
    assert [len(b["labels"]) for b in loader][:2] == [8, 8]


def test_process_count_defaults_to_the_launchers_world_size(tokenized_rows, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert data.build_dataloader(tokenized_rows, 0, 4, train=True).batch_sampler.num_processes == 4
    monkeypatch.delenv("WORLD_SIZE")
    assert data.build_dataloader(tokenized_rows, 0, 4, train=True).batch_sampler.num_processes == 1
    assert data.build_dataloader(tokenized_rows, 0, 4, train=True, num_processes=2).batch_sampler.num_processes == 2
