"""Data order, data position and bad samples."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset

from attn_training.data import (
    BadDataError,
    BadSampleBudget,
    BatchStream,
    EpochBatchSampler,
    SafeCollate,
    SafeDataset,
)


def _indices(batches):
    return [[i for i, _ in b] for b in batches]


def _global_batches(n, batch, world, *, epoch=0, position=0, seed=3):
    """Per step, the set of indices all ranks draw together."""
    per_rank = []
    for rank in range(world):
        sampler = EpochBatchSampler(n, batch, seed=seed, rank=rank, world_size=world)
        sampler.set_position(epoch, position)
        per_rank.append(_indices(sampler))
    return [sorted(i for rank_batch in step for i in rank_batch) for step in zip(*per_rank)]


def test_ranks_share_the_global_batches_of_one_process():
    one = _global_batches(37, 6, 1)
    two = _global_batches(37, 3, 2)
    three = _global_batches(37, 2, 3)
    assert len(one) == 6  # 37 // 6, the incomplete last global batch is dropped
    assert one == two == three
    flat = [i for batch in one for i in batch]
    assert len(set(flat)) == len(flat)


def test_resuming_from_a_position_gives_the_remaining_batches():
    full = _global_batches(40, 2, 2, epoch=4)
    assert _global_batches(40, 2, 2, epoch=4, position=12) == full[3:]
    # with another number of processes the same position still continues the order
    assert _global_batches(40, 8, 1, epoch=4, position=12) == [
        sorted(a + b) for a, b in zip(full[3::2], full[4::2])
    ]


def test_each_epoch_has_its_own_order_and_each_run_seed_too():
    s = EpochBatchSampler(50, 5, seed=1)
    assert not torch.equal(s.permutation(0), s.permutation(1))
    assert torch.equal(s.permutation(2), EpochBatchSampler(50, 5, seed=1).permutation(2))
    assert not torch.equal(s.permutation(0), EpochBatchSampler(50, 5, seed=2).permutation(0))
    assert torch.equal(
        EpochBatchSampler(9, 3, seed=1, shuffle=False).permutation(0), torch.arange(9)
    )


def test_too_small_dataset_is_refused():
    with pytest.raises(ValueError, match="fewer than one global batch"):
        EpochBatchSampler(7, 4, seed=0, world_size=2)


class Noisy(Dataset):
    """Each read returns its index and a fresh random number."""

    def __len__(self):
        return 20

    def __getitem__(self, i):
        return torch.tensor([float(i), torch.rand(()).item()])


def _drain(stream, steps):
    return [next(stream).data for _ in range(steps)]


def test_stream_tracks_the_position_and_epochs():
    sampler = EpochBatchSampler(20, 3, seed=0, world_size=2, rank=0)
    stream = BatchStream(Noisy(), sampler)
    _drain(stream, 2)
    assert (stream.epoch, stream.position) == (0, 12)
    _drain(stream, 1)  # the third global batch ends the epoch (20 // 6 = 3 batches)
    assert (stream.epoch, stream.position) == (1, 0)


def test_resumed_stream_and_worker_count_do_not_change_the_samples():
    """Per-sample seeds: augmentation depends on (seed, epoch, index) only."""
    reference = _drain(BatchStream(Noisy(), EpochBatchSampler(20, 4, seed=5)), 9)
    torch.manual_seed(99)  # the training stream's state must not matter
    resumed = BatchStream(Noisy(), EpochBatchSampler(20, 4, seed=5), epoch=1, position=8)
    assert all(torch.equal(a, b) for a, b in zip(_drain(resumed, 4), reference[7:11]))
    workers = BatchStream(Noisy(), EpochBatchSampler(20, 4, seed=5), num_workers=2)
    assert all(torch.equal(a, b) for a, b in zip(_drain(workers, 9), reference))
    workers.close()


def test_reading_samples_leaves_the_main_random_stream_alone():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    _drain(BatchStream(Noisy(), EpochBatchSampler(20, 4, seed=5)), 3)
    assert torch.equal(torch.rand(3), expected)


class Flaky(Dataset):
    def __len__(self):
        return 6

    def sample_path(self, i):
        return f"/data/{i}.wav"

    def __getitem__(self, i):
        if i % 3 == 0:
            raise OSError("bad header")
        return torch.tensor(float(i))


def test_failing_samples_are_dropped_and_described():
    safe, collate = SafeDataset(Flaky()), SafeCollate()
    batch = collate([safe[(i, 0)] for i in range(6)])
    assert torch.equal(batch.data, torch.tensor([1.0, 2.0, 4.0, 5.0]))
    assert batch.size == 4
    assert [(b.index, b.source, b.error) for b in batch.bad] == [
        (0, "/data/0.wav (index 0)", "OSError: bad header"),
        (3, "/data/3.wav (index 3)", "OSError: bad header"),
    ]
    assert collate([safe[(0, 0)]]).data is None


def test_bad_sample_budget():
    budget = BadSampleBudget(dataset_size=100, max_fraction=0.05)
    budget.add(drawn=10, failed=5)  # 5 <= 5% of the dataset size
    with pytest.raises(BadDataError, match=r"6 of 20 samples .* the last one: x.wav"):
        budget.add(drawn=10, failed=1, last_failure="x.wav")
    later = BadSampleBudget(dataset_size=100, max_fraction=0.05)
    later.add(drawn=1000, failed=50)  # a rate once more than the dataset was drawn
    with pytest.raises(BadDataError):
        later.add(drawn=0, failed=1)
