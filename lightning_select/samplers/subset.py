"""``SubsetSampler``: train every epoch on a fixed subset of the training set (an offline selection).

Example::

    >>> s = SubsetSampler([3, 7, 8, 11], seed=0)
    >>> s.set_epoch(1)
    >>> sorted(s), len(s), list(s) == list(s)
    ([3, 7, 8, 11], 4, True)
"""

from __future__ import annotations

from typing import Any, Iterator, Optional

import torch
from torch import Tensor

from lightning_select.samplers.epoch import SelfShardingSampler, check_replicas, epoch_generator, shard


class SubsetSampler(SelfShardingSampler):
    """Each epoch, the kept samples of an offline selection (CoLoR-Filter's subset file) in a seeded order.

    - **What it changes**: which samples are trained: only ``indices``, every epoch; ``len()`` is the
      subset size, so Lightning's ``estimated_stepping_batches`` (and a step-based LR schedule) sees
      the reduced step count.
    - **Order**: unweighted, a permutation of the subset drawn from
      :func:`~lightning_select.samplers.epoch.epoch_generator` ``(seed, epoch)``: each kept sample once
      per epoch. Weighted (``weights``), ``len(indices)`` draws *with replacement*, with probability
      proportional to the weights, from the same generator (a kept sample may then appear several times
      per epoch, or not at all, as with ``WeightedRandomSampler``).
    - **Resume**: the epoch's order is a pure function of ``(indices, weights, seed, epoch)``, so
      :class:`~lightning_select.samplers.resumable.ResumableDataLoader` resumes mid-epoch exactly (it
      skips the first positions of this index sampler).
    - **DDP**: with ``num_replicas=W`` and ``rank=r`` the epoch's order (the same on every rank) is
      sharded as ``DistributedSampler`` shards a dataset (:func:`~lightning_select.samplers.epoch.shard`):
      padded by wrapping around to a multiple of ``W`` (or cut with ``drop_last``), rank ``r`` takes
      positions ``r::W``, so every rank has the same length ``⌈m / W⌉``. It is a
      :class:`~lightning_select.samplers.epoch.SelfShardingSampler`, so Lightning leaves it in place.
    - **Extra cost**: one ``randperm(m)`` (or ``multinomial``) per epoch.

    Args:
        indices: the kept sample indices (distinct, non-negative; any order: they are sorted).
        seed: seed of the per-epoch orders.
        weights: optional non-negative sampling weights of ``indices`` (same length, positive sum).
        num_replicas: number of DDP ranks sharing each epoch (``trainer.world_size``).
        rank: this process's rank (``trainer.global_rank``).
        drop_last: under DDP, cut the epoch's tail to a multiple of ``num_replicas`` instead of padding.

    Example::

        >>> s = SubsetSampler([5, 1, 9], seed=2, weights=[0.0, 1.0, 0.0])
        >>> list(s)
        [1, 1, 1]
        >>> full = list(SubsetSampler([5, 1, 9], seed=2))
        >>> shares = [list(SubsetSampler([5, 1, 9], seed=2, num_replicas=2, rank=r)) for r in (0, 1)]
        >>> shares == [full[0::2], full[1::2] + full[:1]]   # padded like DistributedSampler
        True
    """

    def __init__(self, indices: Any, seed: int = 0, weights: Any = None, num_replicas: int = 1, rank: int = 0,
                 drop_last: bool = False) -> None:
        idx = torch.as_tensor(indices)
        if idx.dim() != 1 or idx.numel() == 0 or idx.is_floating_point() or idx.dtype == torch.bool:
            raise ValueError(f"SubsetSampler: expected a non-empty 1-d sequence of integer sample indices, but got "
                             f"{idx.dtype} {tuple(idx.shape)}.")
        idx = idx.long()
        if int(idx.min()) < 0 or idx.unique().numel() != idx.numel():
            raise ValueError("SubsetSampler: expected distinct, non-negative sample indices.")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"SubsetSampler: expected `seed` to be an int, but got {seed!r}.")
        order = idx.argsort()
        self.indices: Tensor = idx[order]
        self.weights: Optional[Tensor] = None
        if weights is not None:
            w = torch.as_tensor(weights, dtype=torch.float64)
            if w.shape != idx.shape or not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or float(w.sum()) <= 0:
                raise ValueError(f"SubsetSampler: expected {idx.numel()} finite, non-negative weights with a positive "
                                 f"sum, but got shape {tuple(w.shape)}.")
            self.weights = w[order]
        check_replicas("SubsetSampler", num_replicas, rank)
        if drop_last and idx.numel() < num_replicas:
            raise ValueError(f"SubsetSampler: `drop_last=True` leaves no sample per rank ({idx.numel()} kept samples, "
                             f"{num_replicas} ranks); set `drop_last=False`.")
        self.num_replicas, self.rank, self.drop_last = num_replicas, rank, bool(drop_last)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Select the order of ``epoch`` (Lightning calls this at the start of every epoch)."""
        self.epoch = epoch

    def order(self, epoch: int) -> list[int]:
        """The sample indices of ``epoch``, in training order, over all ranks."""
        g = epoch_generator(self.seed, epoch)
        m = self.indices.numel()
        if self.weights is None:
            positions = torch.randperm(m, generator=g)
        else:
            positions = torch.multinomial(self.weights, m, replacement=True, generator=g)
        return self.indices[positions].tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(shard(self.order(self.epoch), self.num_replicas, self.rank, self.drop_last))

    def __len__(self) -> int:
        """Samples per rank and epoch: ``m``, ``⌈m / W⌉`` under DDP, ``⌊m / W⌋`` with ``drop_last``."""
        m, w = int(self.indices.numel()), self.num_replicas
        return m // w if self.drop_last else -(-m // w)
