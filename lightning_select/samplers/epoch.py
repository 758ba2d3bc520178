"""Seeded per-epoch orders: the one seed formula every sampler uses, and the shuffling sampler.

Samplers import no Lightning: they are plain ``torch.utils.data`` objects usable with any DataLoader.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence, TypeVar

import torch
from torch.utils.data import DistributedSampler, Sampler

T = TypeVar("T")


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The CPU generator of ``(seed, epoch)``: every lightning_select sampler draws its epoch from it.

    Example::

        >>> torch.randperm(4, generator=epoch_generator(0, 1)).tolist() == \\
        ...     torch.randperm(4, generator=epoch_generator(0, 1)).tolist()
        True
    """
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


def check_replicas(owner: str, num_replicas: Any, rank: Any) -> None:
    """Raise a ``ValueError`` naming the option unless ``num_replicas >= 1`` and ``0 <= rank < num_replicas``."""
    if isinstance(num_replicas, bool) or not isinstance(num_replicas, int) or num_replicas < 1:
        raise ValueError(f"{owner}: expected `num_replicas` to be a positive int (the DDP world size), but got "
                         f"{num_replicas!r}.")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < num_replicas:
        raise ValueError(f"{owner}: expected `rank` in [0, {num_replicas}) (this process's global rank), but got "
                         f"{rank!r}; pass trainer.global_rank with num_replicas=trainer.world_size.")


def shard(items: Sequence[T], num_replicas: int, rank: int, drop_last: bool = False) -> list[T]:
    """Rank ``rank``'s share of ``items``, as ``torch.utils.data.DistributedSampler`` cuts it.

    ``items`` is padded by wrapping around to a multiple of ``num_replicas`` (or, with ``drop_last``,
    its tail is cut to one), then rank ``r`` takes the positions ``r, r + W, r + 2W, …``. Every rank
    gets the same number of items; without padding the shares are disjoint and their union is ``items``.

    Example::

        >>> [shard(list("abcde"), 2, r) for r in (0, 1)]
        [['a', 'c', 'e'], ['b', 'd', 'a']]
        >>> [shard(list("abcde"), 2, r, drop_last=True) for r in (0, 1)]
        [['a', 'c'], ['b', 'd']]
        >>> shard([7], 3, 2)
        [7]
    """
    items = list(items)
    if num_replicas == 1:
        return items
    if drop_last:
        items = items[: len(items) - len(items) % num_replicas]
    elif items and len(items) % num_replicas:
        padding = num_replicas - len(items) % num_replicas
        items = items + (items * (padding // len(items) + 1))[:padding]
    return items[rank::num_replicas]


class SelfShardingSampler(DistributedSampler):
    """Base of the samplers that cut their own per-rank share: a ``DistributedSampler`` by type only.

    Under DDP with ``Trainer(use_distributed_sampler=True)`` (the default) Lightning replaces the
    sampler of every training DataLoader with its own ``DistributedSampler`` (or wraps it in a
    ``DistributedSamplerWrapper``) unless ``loader.sampler`` already is a ``DistributedSampler``
    (``_DataConnector._requires_distributed_sampler``). A sampler that shards itself (it takes
    ``num_replicas`` and ``rank``, like ``DistributedSampler``) subclasses this class to declare it, so
    Lightning leaves the loader as it is and no ``use_distributed_sampler=False`` is needed. A batch
    sampler declares it through its ``.sampler`` (see
    :class:`~lightning_select.samplers.resumable.ResumableDataLoader`).

    ``DistributedSampler.__init__`` is not called (it needs a dataset, and a process group unless
    ``num_replicas`` and ``rank`` are given); subclasses set ``num_replicas``, ``rank``, ``seed``,
    ``epoch`` and ``drop_last`` and define ``__iter__``, ``__len__`` and ``set_epoch``. Other
    ``DistributedSampler`` attributes (``num_samples``, ``total_size``, ``dataset``) are not set
    or keep the subclass's own meaning.
    """

    def __init__(self) -> None:  # no DistributedSampler.__init__: see the class docs
        pass


class _EpochHook(SelfShardingSampler):
    """``batch_sampler.sampler`` of a self-sharding batch sampler (``owner``): forwards Lightning's
    ``set_epoch`` and declares the owner sharded.

    Lightning calls ``set_epoch`` on ``loader.sampler`` and ``loader.batch_sampler.sampler`` only, so this
    forwards it to the owner. Iterating yields this rank's indices of the owner's current epoch
    (``rank_batches()``), flattened. As a
    :class:`SelfShardingSampler` it tells Lightning (through
    :class:`~lightning_select.samplers.resumable.ResumableDataLoader`) to leave the loader as it is.
    """

    def __init__(self, owner: Any, rank_batches: Callable[[], list[list[int]]]) -> None:
        self.owner, self._rank_batches = owner, rank_batches
        self.num_replicas, self.rank, self.seed, self.drop_last = owner.num_replicas, owner.rank, owner.seed, False

    @property
    def epoch(self) -> int:  # type: ignore[override]
        return self.owner.epoch

    @epoch.setter
    def epoch(self, value: int) -> None:
        self.owner.set_epoch(value)

    def set_epoch(self, epoch: int) -> None:
        self.owner.set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        return iter([i for b in self._rank_batches() for i in b])

    def __len__(self) -> int:
        return sum(len(b) for b in self._rank_batches())


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

