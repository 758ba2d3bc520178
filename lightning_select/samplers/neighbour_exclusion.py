"""``NeighbourExclusionBatchSampler``: no two guide neighbours in one batch.

Example::

    >>> import torch
    >>> emb = torch.tensor([[1.0, 0.0], [1.0, 0.01], [0.0, 1.0], [-1.0, 0.0]])
    >>> s = NeighbourExclusionBatchSampler(num_samples=4, batch_size=2, threshold=0.9)
    >>> s.set_embeddings(emb)
    >>> s.pairs.tolist(), any({0, 1} <= set(b) for b in s), sorted(i for b in s for i in b)
    ([[0, 1]], False, [0, 1, 2, 3])
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_select.samplers.composed import ComposedBatchSampler
from lightning_select.samplers.epoch import epoch_generator
from lightning_select.samplers.greedy import greedy_batches
from lightning_select.samplers.search import METHODS, check_pairs, neighbour_lists, neighbour_pairs


class NeighbourExclusionBatchSampler(ComposedBatchSampler):
    """Batches in which no two samples are guide neighbours (cosine above ``threshold``).

    The duplicate-free sampler (:class:`~lightning_select.samplers.NoDuplicatesBatchSampler`)
    generalised from exact keys to neighbourhoods of an embedding, usually the guide's: two samples
    whose embeddings are closer than ``threshold`` are likely paraphrases, and as in-batch negatives
    of one another they would be false negatives. Keeping them apart removes those false negatives
    before the loss sees them, where GIST masks them after.

    :meth:`set_embeddings` finds the neighbour pairs with
    :func:`~lightning_select.samplers.search.neighbour_pairs` (each sample's ``max_neighbours``
    nearest others, kept when the cosine exceeds ``threshold``). Each epoch starts from a permutation
    seeded by ``(seed, epoch)`` and fills batches greedily in that order; a sample with a neighbour
    already in the batch is deferred and tried again, first, for the next batch (the same fill as the
    duplicate-free sampler, :func:`~lightning_select.samplers.greedy.greedy_batches`).

    **A fixed number of batches.** Lightning reads a loader's length once, before training (and
    before the embeddings exist), so every epoch has exactly ``ceil(N / batch_size)`` global batches
    (``floor`` with ``drop_last``), as a plain loader would. The duplicate-free sampler instead opens
    extra, small batches for the samples that collide at the end of an epoch; here such a sample
    (one that every batch already holds a neighbour of) goes to the batch with room where it has the
    fewest neighbours, and is swapped with a sample of another batch when that separates both from
    their neighbours. A sample is left next to a neighbour only when neighbourhoods are dense (about
    as many neighbours as there are batches): :meth:`collisions` counts those. Without ``drop_last``
    every sample appears once per epoch; with it, the samples left over once every batch is full are
    skipped.

    DDP sharding, epochs and mid-epoch resume come from
    :class:`~lightning_select.samplers.composed.ComposedBatchSampler`. The state holds the pair list,
    so a resumed run rebuilds the same batches without the embeddings.

    Args:
        num_samples, batch_size, seed, drop_last, num_replicas, rank: see ``ComposedBatchSampler``.
        threshold: cosine above which two samples are neighbours, in ``[-1, 1]``.
        max_neighbours: nearest other samples searched per sample.
        method: ``"exact"`` or ``"hnsw"`` (approximate, needs faiss) neighbour search.

    Example::

        >>> from functools import partial
        >>> factory = partial(NeighbourExclusionBatchSampler, threshold=0.8)
        >>> s = factory(num_samples=4, batch_size=2, seed=0, num_replicas=1, rank=0)
        >>> s.set_embeddings(torch.tensor([[1.0, 0.0], [0.99, 0.1], [0.0, 1.0], [-1.0, 0.0]]))
        >>> [len(b) for b in s], s.stats()["num_pairs"], s.collisions()
        ([2, 2], 1.0, 0)
    """

    kind = "neighbour_exclusion"

    def __init__(self, num_samples: int, batch_size: int, *, threshold: float, max_neighbours: int = 32,
                 method: str = "exact", seed: int = 0, drop_last: bool = False, num_replicas: int = 1,
                 rank: int = 0) -> None:
        super().__init__(num_samples, batch_size, seed=seed, drop_last=drop_last, num_replicas=num_replicas, rank=rank)
        who = type(self).__name__
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not -1.0 <= threshold <= 1.0:
            raise ValueError(f"{who}: expected `threshold` to be a cosine in [-1, 1], but got {threshold!r}; pick "
                             "e.g. the guide's paraphrase level (0.8 for all-MiniLM-L6-v2).")
        if isinstance(max_neighbours, bool) or not isinstance(max_neighbours, int) or max_neighbours < 1:
            raise ValueError(f"{who}: expected `max_neighbours` to be a positive int, but got {max_neighbours!r}.")
        if method not in METHODS:
            raise ValueError(f"{who}: expected `method` in {METHODS}, but got {method!r}.")
        self.threshold, self.max_neighbours, self.method = float(threshold), max_neighbours, method
        self.pairs: Tensor | None = None
        self._blocked: list[frozenset[int]] = []
        self._marks = [frozenset((i,)) for i in range(num_samples)]

    # ------------------------------------------------------------------ structure
    @property
    def ready(self) -> bool:
        return self.pairs is not None

    def set_embeddings(self, embeddings: Tensor) -> None:
        """Find the neighbour pairs of ``[N, D]`` embeddings (row ``i`` = sample ``i``)."""
        x = self.check_embeddings(embeddings)
        self._set_pairs(neighbour_pairs(x, self.threshold, self.max_neighbours, self.method))

    def set_pairs(self, pairs: Any) -> None:
        """Use given neighbour pairs ``[P, 2]`` (``i < j``) instead of searching embeddings."""
        self._set_pairs(check_pairs(pairs, self.num_samples, type(self).__name__,
                                    "pass pairs from `neighbour_pairs` of this training set"))

    def _set_pairs(self, pairs: Tensor) -> None:
        self.pairs = pairs.clone()
        self._blocked = [frozenset(v) for v in neighbour_lists(self.pairs, self.num_samples)]
        self.invalidate()

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        order = torch.randperm(self.num_samples, generator=epoch_generator(self.seed, epoch)).tolist()
        return greedy_batches(order, self.batch_size, self._blocked, self._marks, drop_last=self.drop_last,
                              num_batches=self.num_global_batches)

    def collisions(self, epoch: int | None = None) -> int:
        """Samples that share a batch with one of their neighbours in ``epoch`` (default: the current one)."""
        batches = self._global() if epoch is None or epoch == self.epoch else self.epoch_batches(epoch)
        count = 0
        for batch in batches:
            members = set(batch)
            count += sum(1 for i in batch if not self._blocked[i].isdisjoint(members))
        return count

    def stats(self) -> dict[str, float]:
        """``num_pairs``, ``with_neighbour`` (share of samples with a neighbour) and ``collided`` (share of
        samples next to a neighbour in the current epoch's batches: 0 unless neighbourhoods are dense)."""
        if self.pairs is None:
            return {}
        with_neighbour = sum(1 for b in self._blocked if b) / self.num_samples
        return {"num_pairs": float(self.pairs.shape[0]), "with_neighbour": with_neighbour,
                "collided": self.collisions() / self.num_samples}

    def _options(self) -> dict[str, Any]:
        return {**super()._options(), "threshold": self.threshold, "max_neighbours": self.max_neighbours,
                "method": self.method}

    def _structure_state(self) -> dict[str, Any]:
        assert self.pairs is not None
        return {"pairs": self.pairs.clone()}

    def _load_structure(self, state: dict[str, Any]) -> None:
        self._set_pairs(check_pairs(state["pairs"], self.num_samples, type(self).__name__,
                                    "the checkpoint does not belong to this training set"))
