"""``RS2Sampler``: Repeated Sampling of Random Subsets without replacement (an epoch-level baseline).

Each epoch trains on a fresh ``⌈fraction · N⌉``-sample chunk of a stream of seeded permutations of
all ``N`` samples, so the whole set is walked once every ``1 / fraction`` epochs and a learning-rate
schedule sized by ``len(loader)`` runs over the reduced step count. Under DDP the epoch's chunk is
sharded across the ranks as ``DistributedSampler`` shards a dataset.

Example::

    >>> s = RS2Sampler(10, fraction=0.5, seed=0)
    >>> s.set_epoch(0); first = list(s)
    >>> s.set_epoch(1); second = list(s)
    >>> len(s), sorted(first + second) == list(range(10))
    (5, True)
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Optional

import torch

from lightning_select.samplers.epoch import SelfShardingSampler, check_replicas, epoch_generator, shard


def subset_size(num_samples: int, fraction: float) -> int:
    """``⌈fraction · N⌉``, robust to float rounding (``0.3 · 10`` is 3, not 4).

    Example::

        >>> subset_size(10, 0.3), subset_size(1149, 0.1), subset_size(7, 1.0)
        (3, 115, 7)
    """
    return max(1, math.ceil(round(fraction * num_samples, 9)))


def check_sampler_options(owner: str, counts: dict[str, Any], fraction: Any, seed: Any, hint: str) -> None:
    """Raise a ``ValueError`` naming the option unless ``counts`` are positive ints, ``fraction`` is in
    ``(0, 1]`` and ``seed`` is an int."""
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{owner}: expected `{name}` to be a positive int, but got {value!r}.")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction <= 1.0:
        raise ValueError(f"{owner}: expected `fraction` in (0, 1], but got {fraction!r}; {hint}.")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"{owner}: expected `seed` to be an int, but got {seed!r}.")


class RS2Sampler(SelfShardingSampler):
    """Repeated Sampling of Random Subsets (RS2) without replacement: a per-epoch random subset.

    - **What it changes**: which samples an epoch visits: ``m = ⌈fraction · N⌉`` of them, so each
      epoch has ``⌈m / B⌉`` steps (``len(sampler) == m`` in one process, and Lightning's
      ``estimated_stepping_batches``, hence any step-based LR schedule, sees the reduced count).
    - **Unbiased**: yes, in the sense that every sample is visited equally often: epochs take
      consecutive chunks of the stream ``perm_0 ‖ perm_1 ‖ …`` of seeded permutations of all ``N``
      samples, so each sample is seen exactly once per ``N`` positions (once per ``1 / fraction``
      epochs). Within one permutation the chunks are disjoint. An epoch that straddles two
      permutations takes the tail of one and the head of the next; the reference's
      reshuffle-when-exhausted loop can then hold a sample twice (about ``t · (m − t) / N`` of them
      for a tail of ``t``), sometimes in one batch. Here the next permutation moves that tail's
      samples to its end, so an epoch never repeats a sample, and each permutation still visits
      every sample once.
    - **Extra cost**: none (one ``randperm(N)`` per epoch, two at a permutation boundary).
    - **Reference**: Okanovic et al., "Repeated Random Sampling for Minimizing the Time-to-Accuracy
      of Learning" (ICLR 2024), RS2 without replacement; checked against its description (take the
      next ``r · N`` chunk of a permutation, reshuffle when it runs out), not against its code.
    - **Defaults**: no published default ratio; the paper's headline uses ``fraction=0.1``.

    The epoch's subset is a pure function of ``(seed, fraction, N, epoch)``: epoch ``e`` holds the
    stream positions ``[e·m, (e+1)·m)``, and permutation ``k`` is ``randperm(N)`` drawn from
    :func:`~lightning_select.samplers.epoch.epoch_generator` ``(seed, k)`` (with the previous
    permutation's straddling tail moved to its end). There is no hidden state (only a memo of the
    last permutation), so resuming at any epoch is exact; mid-epoch resume needs nothing here either, since
    :class:`~lightning_select.samplers.resumable.ResumableDataLoader` skips the first indices of
    this (index) sampler. With ``fraction=1`` it equals
    :class:`~lightning_select.samplers.epoch.EpochSeededSampler`.

    **DDP.** With ``num_replicas=W`` and ``rank=r`` (default: one process) the epoch's subset
    (the same on every rank) is sharded as ``torch.utils.data.DistributedSampler`` shards a dataset
    (:func:`~lightning_select.samplers.epoch.shard`): padded by wrapping around to a multiple of
    ``W`` (or cut to one with ``drop_last``), rank ``r`` takes the positions ``r::W``. Every rank
    gets ``len(self)`` samples, so the same number of batches; the union over ranks is the epoch's
    subset, and without padding the shares are disjoint. It is a
    :class:`~lightning_select.samplers.epoch.SelfShardingSampler`, so Lightning does not replace it
    with its own ``DistributedSampler`` (no ``use_distributed_sampler=False`` needed).
    :class:`~lightning_select.data.noisy_labels.NoisyDigitsDataModule` passes
    ``trainer.world_size`` and ``trainer.global_rank``.

    Args:
        num_samples: ``N``, the size of the training set.
        fraction: share of the training set visited per epoch, in ``(0, 1]``.
        seed: seed of the permutations.
        num_replicas: number of DDP ranks sharing each epoch's subset (``trainer.world_size``).
        rank: this process's rank (``trainer.global_rank``).
        drop_last: under DDP, cut the subset's tail to a multiple of ``num_replicas`` instead of
            padding it with repeated samples.

    Example::

        >>> s = RS2Sampler(7, fraction=0.3, seed=1)
        >>> epochs = []
        >>> for e in range(3):
        ...     s.set_epoch(e)
        ...     epochs.append(list(s))
        >>> [len(x) for x in epochs], len(set(epochs[0] + epochs[1])), sorted(set(sum(epochs, []))) == list(range(7))
        ([3, 3, 3], 6, True)
        >>> ranks = [RS2Sampler(7, fraction=0.3, seed=1, num_replicas=2, rank=r) for r in range(2)]
        >>> [list(r) for r in ranks], epochs[0]  # 3 samples on 2 ranks: the first is repeated as padding
        ([[5, 0], [4, 5]], [5, 4, 0])
    """

    def __init__(self, num_samples: int, fraction: float, seed: int = 0, num_replicas: int = 1, rank: int = 0,
                 drop_last: bool = False) -> None:
        check_sampler_options("RS2Sampler", {"num_samples": num_samples}, fraction, seed,
                              "use e.g. 0.1 to visit 10% of the training set per epoch")
        check_replicas("RS2Sampler", num_replicas, rank)
        self.num_samples, self.fraction, self.seed, self.epoch = num_samples, float(fraction), seed, 0
        self.num_replicas, self.rank, self.drop_last = num_replicas, rank, bool(drop_last)
        self.subset_size = subset_size(num_samples, self.fraction)
        self._cache: Optional[tuple[int, list[int]]] = None  # (k, permutation k): the last one computed
        if self.drop_last and self.subset_size < num_replicas:
            raise ValueError(f"RS2Sampler: `drop_last=True` leaves no sample per rank: the subset of "
                             f"⌈{fraction}·{num_samples}⌉ = {self.subset_size} samples is smaller than "
                             f"`num_replicas`={num_replicas}; raise `fraction` or set `drop_last=False`.")

    def set_epoch(self, epoch: int) -> None:
        """Select the subset of ``epoch`` (Lightning calls this at the start of every epoch)."""
        self.epoch = epoch

    def _permutation(self, k: int) -> list[int]:
        """Permutation ``k`` of the stream: ``randperm(N)`` from ``epoch_generator(seed, k)``, except that
        when an epoch straddles permutations ``k − 1`` and ``k``, the samples of ``k − 1``'s tail in that
        epoch are moved (in order) to the end of permutation ``k``, so the epoch never holds a sample twice.
        It is still a permutation, so every sample stays once per ``N`` stream positions. Computed
        iteratively from the last cached permutation (sequential epochs cost one ``randperm``)."""
        cached_k, cached = self._cache if self._cache is not None and self._cache[0] <= k else (-1, [])
        n, m = self.num_samples, self.subset_size
        perm = cached
        for j in range(cached_k + 1, k + 1):
            fresh = torch.randperm(n, generator=epoch_generator(self.seed, j))
            first_epoch_start = (j * n // m) * m  # the epoch holding stream position j·N starts here
            if j > 0 and first_epoch_start < j * n:
                tail = torch.tensor(perm[first_epoch_start - (j - 1) * n:], dtype=torch.long)
                in_tail = torch.isin(fresh, tail)
                fresh = torch.cat([fresh[~in_tail], fresh[in_tail]])
            perm = fresh.tolist()
        self._cache = (k, perm)
        return perm

    def indices(self, epoch: int) -> list[int]:
        """The subset of ``epoch``, in order: stream positions ``[epoch·m, (epoch+1)·m)``."""
        n, m = self.num_samples, self.subset_size
        start, stop = epoch * m, (epoch + 1) * m
        out: list[int] = []
        for k in range(start // n, (stop - 1) // n + 1):
            lo, hi = max(start - k * n, 0), min(stop - k * n, n)
            out.extend(self._permutation(k)[lo:hi])
        return out

    def rank_indices(self, epoch: int) -> list[int]:
        """This rank's share of the subset of ``epoch``, in order (the whole subset in one process)."""
        return shard(self.indices(epoch), self.num_replicas, self.rank, self.drop_last)

    def __iter__(self) -> Iterator[int]:
        return iter(self.rank_indices(self.epoch))

    def __len__(self) -> int:
        """Samples per rank and epoch: ``m``, ``⌈m / W⌉`` under DDP, ``⌊m / W⌋`` with ``drop_last``."""
        m, w = self.subset_size, self.num_replicas
        return m // w if self.drop_last else -(-m // w)
