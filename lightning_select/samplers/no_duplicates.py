"""``NoDuplicatesBatchSampler``: batches in which no two samples share a key, sharded across DDP ranks.

Example::

    >>> sampler = NoDuplicatesBatchSampler([(0, 0), (0, 0), (1, 1), (2, 2)], batch_size=2, seed=0)
    >>> any({0, 1} <= set(b) for b in sampler), sorted(i for b in sampler for i in b)
    (False, [0, 1, 2, 3])
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Sequence
from typing import Optional

import torch
from torch.utils.data import Sampler

from lightning_select.samplers.epoch import EpochForwarder, epoch_generator
from lightning_select.samplers.greedy import greedy_batches


class NoDuplicatesBatchSampler(Sampler[list[int]]):
    """Batches in which no two samples share a key (e.g. a Quora cluster or an exact sentence).

    Each epoch starts from a permutation seeded by ``(seed, epoch)``. Batches are then filled
    greedily in that order; a sample that shares a key with a sample already in the batch is
    deferred and tried again, first, for the next batch. A batch is closed once it holds
    ``batch_size`` samples or when no remaining sample fits, so towards the end of an epoch (when
    the remaining samples collide) batches can be smaller. A sample's own keys may repeat (e.g.
    anchor and positive in the same cluster).

    With ``drop_last=False`` every sample appears exactly once per epoch. With ``drop_last=True``
    every batch smaller than ``batch_size`` is dropped, so the samples of such batches are skipped
    for that epoch.

    The batches of an epoch are computed on first use (``len()`` or iteration) and cached, so
    ``len()`` is exactly the number of batches that the next iteration yields. Lightning calls
    :meth:`set_epoch` at the start of every epoch.

    Under DDP every rank builds the same global list of batches (same seed and epoch) and takes every
    ``num_replicas``-th one, starting at ``rank``; the list is padded with its first batches so that
    every rank gets the same number. Lightning cannot inject a DistributedSampler into a custom batch
    sampler, so run such trainers with ``Trainer(use_distributed_sampler=False)``.

    Args:
        keys: per sample, the keys it must not share with any other sample of its batch.
        batch_size: maximum batch size.
        seed: seed of the per-epoch permutation.
        drop_last: drop batches smaller than ``batch_size``.
        num_replicas: number of DDP ranks sharing the epoch.
        rank: this process's rank.

    Example::

        >>> s = NoDuplicatesBatchSampler([("a", "b"), ("b", "c"), ("d", "e"), ("f", "g")], batch_size=2)
        >>> batches = list(s)
        >>> len(batches) == len(s), sorted(i for b in batches for i in b)
        (True, [0, 1, 2, 3])
    """

    def __init__(
        self,
        keys: Sequence[Sequence[Hashable]],
        batch_size: int,
        seed: int = 0,
        drop_last: bool = False,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"Expected `batch_size` to be a positive int, but got {batch_size!r}.")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"Expected 0 <= rank < num_replicas, but got rank={rank}, num_replicas={num_replicas}.")
        self.num_replicas, self.rank = num_replicas, rank
        self.keys = [frozenset(k) for k in keys]
        self.batch_size = batch_size
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self._cache: Optional[tuple[int, list[list[int]]]] = None
        #: Lightning's ``set_epoch`` reaches this batch sampler through ``loader.batch_sampler.sampler``.
        self.sampler = EpochForwarder(self.set_epoch, self._batches)

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of ``epoch`` (called by Lightning at the start of every epoch)."""
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        if self._cache is not None and self._cache[0] == self.epoch:
            return self._cache[1]
        g = epoch_generator(self.seed, self.epoch)
        order = torch.randperm(len(self.keys), generator=g).tolist()
        batches = greedy_batches(order, self.batch_size, self.keys, drop_last=self.drop_last)
        if self.num_replicas > 1 and batches:
            padded = batches + batches[: (-len(batches)) % self.num_replicas]
            batches = padded[self.rank :: self.num_replicas]
        self._cache = (self.epoch, batches)
        return batches

    def skip_batches(self, count: int) -> None:
        """Leave out the first ``count`` batches of the next iteration (mid-epoch resume)."""
        self._skip = count

    def __iter__(self) -> Iterator[list[int]]:
        skip, self._skip = getattr(self, "_skip", 0), 0
        return iter([list(b) for b in self._batches()[skip:]])

    def __len__(self) -> int:
        return len(self._batches())
