"""Resumable, sharded data order and bad-sample skipping.

Order: epoch ``e`` uses one global permutation drawn from ``(seed, e)``. A global batch
is ``world_size * batch_size`` consecutive entries of it, dealt to the ranks round-robin,
so a run on N processes sees the same global batches as one process with an N-times
larger batch. The data position is the number of permutation entries consumed in the
current epoch; resuming from ``(epoch, position)`` continues with exactly the next batch,
even with a different number of processes. The incomplete last global batch of an
epoch is dropped so that every rank takes the same number of steps.

Randomness inside ``dataset[i]`` (augmentation) is seeded per sample from
``(seed, epoch, i)``; it therefore does not depend on the number of workers or
processes, nor on where a run was resumed.

Bad samples: an exception raised by ``dataset[i]`` is caught, and the sample is dropped
from its batch and reported (:class:`BadSample`) instead of ending the run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info
from torch.utils.data._utils.collate import default_collate

from attn_training.rng import derive_seed, isolated_rng


class BadDataError(RuntimeError):
    """Too many samples failed to load."""


@dataclass(frozen=True)
class BadSample:
    """A sample whose loading raised: where it is and what went wrong."""

    index: int
    source: str
    error: str


@dataclass
class LoadedBatch:
    """What the data loader yields: the collated good samples and the failures."""

    data: Any
    """The collated batch, or ``None`` when every sample of the batch failed."""
    size: int
    bad: list[BadSample] = field(default_factory=list)


def describe_sample(dataset: Any, index: int) -> str:
    """Where sample ``index`` comes from: ``dataset.sample_path(index)`` if it exists."""
    sample_path = getattr(dataset, "sample_path", None)
    if callable(sample_path):
        try:
            return f"{sample_path(index)} (index {index})"
        except Exception:  # the description must never hide the original failure
            pass
    return f"index {index}"


class SafeDataset(Dataset):
    """A map-style dataset read with ``(index, seed)`` draws; failures become :class:`BadSample`."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, draw: tuple[int, int]) -> Any:
        index, seed = draw
        # In a worker the generators belong to us; in the main process they are the
        # training stream's and must come back unchanged.
        try:
            with isolated_rng(seed, restore=get_worker_info() is None, cuda=False):
                return self.dataset[index]
        except Exception as exc:
            return BadSample(index, describe_sample(self.dataset, index), _one_line(exc))


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class SafeCollate:
    """Collates the good samples of a batch and carries the bad ones alongside."""

    def __init__(self, collate_fn: Callable[[list[Any]], Any] | None = None) -> None:
        self.collate_fn = collate_fn or default_collate

    def __call__(self, items: list[Any]) -> LoadedBatch:
        bad = [x for x in items if isinstance(x, BadSample)]
        good = [x for x in items if not isinstance(x, BadSample)]
        data = self.collate_fn(good) if good else None
        return LoadedBatch(data=data, size=len(good), bad=bad)


class EpochBatchSampler(Sampler[list[tuple[int, int]]]):
    """This rank's batches of one epoch, from a data position on (see the module doc)."""

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        seed: int,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if num_samples < batch_size * world_size:
            raise ValueError(
                f"the dataset has {num_samples} samples, fewer than one global batch "
                f"({world_size} process(es) x batch size {batch_size})"
            )
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.position = 0

    @property
    def global_batch(self) -> int:
        """Samples consumed per batch over all ranks."""
        return self.batch_size * self.world_size

    def set_position(self, epoch: int, position: int) -> None:
        """Start the next iteration in ``epoch`` after ``position`` consumed samples."""
        self.epoch, self.position = epoch, position

    def batches_left(self, position: int) -> int:
        """Full global batches after ``position`` in an epoch."""
        return max(0, (self.num_samples - position) // self.global_batch)

    def permutation(self, epoch: int) -> torch.Tensor:
        """The global order of epoch ``epoch``."""
        if not self.shuffle:
            return torch.arange(self.num_samples)
        generator = torch.Generator().manual_seed(derive_seed(self.seed, epoch))
        return torch.randperm(self.num_samples, generator=generator)

    def __len__(self) -> int:
        return self.batches_left(self.position)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, start = self.epoch, self.position
        end = start + self.batches_left(start) * self.global_batch
        mine = self.permutation(epoch)[start + self.rank : end : self.world_size].tolist()
        for i in range(0, len(mine), self.batch_size):
            yield [
                (index, derive_seed(self.seed, epoch, index))
                for index in mine[i : i + self.batch_size]
            ]


class BatchStream:
    """An endless stream of this rank's batches that knows its data position.

    ``epoch`` and ``position`` always describe the next batch to come, so saving them
    after a training step and building a new stream from them resumes exactly there.
    """

    def __init__(
        self,
        dataset: Dataset,
        sampler: EpochBatchSampler,
        *,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        epoch: int = 0,
        position: int = 0,
        loader_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.sampler = sampler
        self.epoch, self.position = epoch, position
        self._loader_args = {
            "dataset": SafeDataset(dataset),
            "batch_sampler": sampler,
            "collate_fn": SafeCollate(collate_fn),
            "num_workers": num_workers,
            "pin_memory": pin_memory,
            **(loader_kwargs or {}),
        }
        self._iterator: Iterator[LoadedBatch] | None = None
        self._normalise()

    def _normalise(self) -> None:
        if self.sampler.batches_left(self.position) == 0:
            self.epoch, self.position = self.epoch + 1, 0
            self._iterator = None

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> LoadedBatch:
        if self._iterator is None:
            self.sampler.set_position(self.epoch, self.position)
            # A private generator: the loader's base seed must not consume the training
            # stream's random numbers (per-sample seeds make the worker seeds irrelevant).
            generator = torch.Generator().manual_seed(derive_seed(self.sampler.seed, self.epoch))
            loader = DataLoader(generator=generator, **self._loader_args)
            self._iterator = iter(loader)
        batch = next(self._iterator)
        self.position += self.sampler.global_batch
        self._normalise()
        return batch

    def close(self) -> None:
        """Stop the workers of the current epoch, if any."""
        self._iterator = None


class BadSampleBudget:
    """Counts failed samples and stops the run when there are too many.

    The run stops once the failures exceed ``max_fraction`` of the samples drawn so far,
    but never before they exceed ``max_fraction`` of the dataset: during the first epoch
    the allowance is a share of the dataset, afterwards a rate.
    """

    def __init__(self, dataset_size: int, max_fraction: float) -> None:
        self.dataset_size = dataset_size
        self.max_fraction = max_fraction
        self.drawn = 0
        self.failed = 0

    def add(self, drawn: int, failed: int, last_failure: str | None = None) -> None:
        """Account for ``drawn`` samples of which ``failed`` failed; raise when over budget."""
        self.drawn += drawn
        self.failed += failed
        allowed = self.max_fraction * max(self.drawn, self.dataset_size)
        if self.failed > allowed:
            detail = f"; the last one: {last_failure}" if last_failure else ""
            raise BadDataError(
                f"{self.failed} of {self.drawn} samples drawn so far failed to load, more than "
                f"--max-bad-fraction {self.max_fraction:g} of max(drawn, dataset size "
                f"{self.dataset_size}){detail}. Fix or remove the bad files, or raise "
                "--max-bad-fraction."
            )
