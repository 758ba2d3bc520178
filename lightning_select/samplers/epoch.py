"""Seeded per-epoch orders: the one seed formula every sampler uses, and the shuffling sampler.

Samplers import no Lightning: they are plain ``torch.utils.data`` objects usable with any DataLoader.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import torch
from torch.utils.data import Sampler


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The CPU generator of ``(seed, epoch)``: every lightning_select sampler draws its epoch from it.

    Example::

        >>> torch.randperm(4, generator=epoch_generator(0, 1)).tolist() == \\
        ...     torch.randperm(4, generator=epoch_generator(0, 1)).tolist()
        True
    """
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


class EpochSeededSampler(Sampler[int]):
    """Random permutation seeded by ``(seed, epoch)``; Lightning calls :meth:`set_epoch` every epoch.

    Unlike ``RandomSampler`` it does not draw from the global RNG, so the data order after a resume
    equals the uninterrupted run's.

    Example::

        >>> s = EpochSeededSampler(5, seed=0)
        >>> s.set_epoch(3)
        >>> sorted(s) == list(range(5)) and list(s) == list(s)
        True
    """

    def __init__(self, num_samples: int, seed: int = 0) -> None:
        self.num_samples, self.seed, self.epoch = num_samples, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        return iter(torch.randperm(self.num_samples, generator=epoch_generator(self.seed, self.epoch)).tolist())

    def __len__(self) -> int:
        return self.num_samples


def shuffled_loader_kwargs(num_samples: int, seed: int, world_size: int) -> dict[str, Any]:
    """``DataLoader`` keyword arguments for a shuffled training set, single process or DDP.

    In one process: an :class:`EpochSeededSampler`. Under DDP: ``shuffle=True``, which Lightning
    replaces with a seeded, ``set_epoch``-ed ``DistributedSampler``.

    Example::

        >>> shuffled_loader_kwargs(10, 0, world_size=2)
        {'shuffle': True, 'sampler': None}
    """
    if world_size > 1:
        return {"shuffle": True, "sampler": None}
    return {"shuffle": False, "sampler": EpochSeededSampler(num_samples, seed)}


class EpochForwarder(Sampler[int]):
    """The ``.sampler`` of a batch sampler, so that Lightning's ``set_epoch`` reaches the batch sampler.

    Lightning calls ``set_epoch`` only on ``loader.sampler`` and ``loader.batch_sampler.sampler``, so a
    custom batch sampler without a ``.sampler`` would repeat its first epoch's order forever.
    Iterating yields the current epoch's indices, flattened.

    Example::

        >>> class Owner:
        ...     epoch = 0
        ...     def set_epoch(self, e): self.epoch = e
        ...     def batches(self): return [[self.epoch, 9]]
        >>> owner = Owner(); forwarder = EpochForwarder(owner.set_epoch, owner.batches)
        >>> forwarder.set_epoch(4); list(forwarder), len(forwarder)
        ([4, 9], 2)
    """

    def __init__(self, set_epoch: Callable[[int], None], batches: Callable[[], list[list[int]]]) -> None:
        self._set_epoch, self._batches = set_epoch, batches

    def set_epoch(self, epoch: int) -> None:
        self._set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        return iter([i for batch in self._batches() for i in batch])

    def __len__(self) -> int:
        return sum(len(batch) for batch in self._batches())

