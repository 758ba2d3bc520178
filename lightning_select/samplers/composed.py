"""``ComposedBatchSampler``: the base of the batch samplers that compose batches from embeddings.

Clustered batches, cluster-reweighted epochs and guide-neighbourhood exclusion all follow one
pattern: a *structure* is derived from an ``[N, D]`` embedding of the training set (cluster ids,
neighbour pairs), and each epoch's batches are a pure function of ``(structure, seed, epoch)``.
This base owns everything else, once:

- **the factory contract** of :mod:`lightning_select.samplers.factory` (constructor keywords
  ``num_samples, batch_size, seed, num_replicas, rank``; a ``.sampler`` that is a
  :class:`~lightning_select.samplers.epoch.SelfShardingSampler`, so Lightning leaves the loader
  alone and ``set_epoch`` reaches it);
- **DDP**: every rank builds the same *global* list of batches (``batch_size`` samples each, a
  per-rank batch) and takes every ``W``-th one starting at its rank; the list is padded by wrapping
  so that every rank yields the same number of batches, as ``DistributedSampler`` pads samples;
- **exact resume**: an epoch's batches are cached on first use, :meth:`skip_batches` drops the
  first ``k`` of the next iteration, and :meth:`state_dict` holds the structure and the options.

Subclasses implement :meth:`set_embeddings` (derive and store the structure), :meth:`epoch_batches`
(the global batch list of an epoch, :attr:`num_global_batches` long) and :meth:`_structure_state` /
:meth:`_load_structure`. ``len()`` needs no structure, since Lightning sizes the loader before any
callback can set one.
Until a structure is set, iterating raises a :class:`RuntimeError` that says how to set one.

The callback :class:`~lightning_select.policies.batch_composition.BatchComposition` feeds the
embeddings (guide cache or student) under Lightning; without Lightning call
:meth:`set_embeddings` yourself before iterating.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional

import torch
from torch import Tensor
from torch.utils.data import Sampler

from lightning_select.samplers.epoch import _EpochHook, check_replicas


class ComposedBatchSampler(Sampler[list[int]]):
    """Base class: DDP sharding, epochs, resume and state for embedding-composed batch samplers.

    Args:
        num_samples: ``N``, the size of the training set.
        batch_size: samples per batch and rank.
        seed: seed of every random choice (with the epoch, through ``epoch_generator``).
        drop_last: drop batches smaller than ``batch_size``.
        num_replicas: number of DDP ranks (``trainer.world_size``).
        rank: this process's rank (``trainer.global_rank``).
    """

    #: short name used in error messages and logged metric names
    kind = "composed"

    def __init__(self, num_samples: int, batch_size: int, *, seed: int = 0, drop_last: bool = False,
                 num_replicas: int = 1, rank: int = 0) -> None:
        owner = type(self).__name__
        if isinstance(num_samples, Sampler):
            raise ValueError(f"{owner}: got a sampler as `num_samples`: Lightning is re-building the batch sampler "
                             "to inject its DistributedSampler. Build the loader as a ResumableDataLoader (as the "
                             "datamodules' `batch_sampler=` option does), or create the Trainer with "
                             "`use_distributed_sampler=False`.")
        for name, value in (("num_samples", num_samples), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{owner}: expected `{name}` to be a positive int, but got {value!r}.")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"{owner}: expected `seed` to be an int, but got {seed!r}.")
        check_replicas(owner, num_replicas, rank)
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.drop_last, self.num_replicas, self.rank = bool(drop_last), num_replicas, rank
        self.epoch = 0
        self.sampler = _EpochHook(self, self.rank_batches)
        self._cache: Optional[tuple[int, list[list[int]]]] = None
        self._skip = 0

    # ------------------------------------------------------------------ the structure (subclasses)
    @property
    def ready(self) -> bool:
        """Whether a structure (clusters, neighbour pairs, …) is set, so epochs can be planned."""
        raise NotImplementedError

    def set_embeddings(self, embeddings: Tensor) -> None:
        """Derive the structure from ``[N, D]`` embeddings of the training set (row ``i`` = sample ``i``)."""
        raise NotImplementedError

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The *global* batches of ``epoch`` (every rank computes the same list)."""
        raise NotImplementedError

    def _structure_state(self) -> dict[str, Any]:
        raise NotImplementedError

    def _load_structure(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def _options(self) -> dict[str, Any]:
        """Options that a saved state must share (subclasses extend)."""
        return {"num_samples": self.num_samples, "batch_size": self.batch_size, "seed": self.seed,
                "drop_last": self.drop_last, "num_replicas": self.num_replicas}

    # ------------------------------------------------------------------ helpers for subclasses
    def check_embeddings(self, embeddings: Any) -> Tensor:
        """``embeddings`` as a finite ``[N, D]`` float32 CPU tensor, or a ``ValueError`` that says what is wrong."""
        x = torch.as_tensor(embeddings)
        if x.dim() != 2 or x.shape[0] != self.num_samples:
            raise ValueError(f"{type(self).__name__}: expected embeddings of shape [{self.num_samples}, D] (one row "
                             f"per training sample), but got {tuple(x.shape)}; embed the training set in index order.")
        x = x.detach().to("cpu", torch.float32)
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{type(self).__name__}: the embeddings hold NaN or inf values; check the encoder that "
                             "produced them.")
        return x

    def cut(self, order: list[int]) -> list[list[int]]:
        """Cut ``order`` into consecutive batches of ``batch_size`` (the last one dropped if short and ``drop_last``)."""
        batches = [order[a:a + self.batch_size] for a in range(0, len(order), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        return batches

    def invalidate(self) -> None:
        """Forget the cached epoch plan (call after changing the structure)."""
        self._cache = None

    # ------------------------------------------------------------------ epochs and ranks
    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self._cache = None
        self.epoch = epoch

    def _global(self) -> list[list[int]]:
        if not self.ready:
            raise RuntimeError(
                f"{type(self).__name__} has no embedding structure yet: call `set_embeddings(embeddings)` before "
                "iterating, or add the BatchComposition callback to the Trainer (it sets them from the guide cache "
                "or the student at the start of training).")
        if self._cache is None or self._cache[0] != self.epoch:
            self._cache = (self.epoch, self.epoch_batches(self.epoch))
        return self._cache[1]

    def rank_batches(self) -> list[list[int]]:
        """This rank's batches of the current epoch: every ``W``-th global batch from ``rank`` (padded by wrapping)."""
        batches = self._global()
        if self.num_replicas > 1 and batches:
            padding = (-len(batches)) % self.num_replicas
            batches = (batches + (batches * (padding // len(batches) + 1))[:padding])[self.rank::self.num_replicas]
        return batches

    def skip_batches(self, count: int) -> None:
        """Leave out the first ``count`` batches of the next iteration (mid-epoch resume)."""
        self._skip = int(count)

    def __iter__(self) -> Iterator[list[int]]:
        skip, self._skip = self._skip, 0
        return iter([list(b) for b in self.rank_batches()[skip:]])

    @property
    def num_global_batches(self) -> int:
        """Global batches per epoch, known before the structure is (Lightning sizes the loader before training
        starts): ``ceil(N / batch_size)``, ``floor`` with ``drop_last``. ``epoch_batches`` must return this many;
        a subclass that trains another number of samples per epoch overrides it (see :meth:`batches_of`)."""
        return self.batches_of(self.num_samples)

    def batches_of(self, count: int) -> int:
        """Batches of ``batch_size`` that ``count`` samples make (a short last one unless ``drop_last``)."""
        full, rest = divmod(count, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def __len__(self) -> int:
        """This rank's batches per epoch: the global ones shared out as :meth:`rank_batches` does (padded)."""
        return -(-self.num_global_batches // self.num_replicas)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The structure (so every epoch's batches are reproduced exactly) and the options it belongs to."""
        return {"options": self._options(), "structure": self._structure_state() if self.ready else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the structure; refuses a state saved with other options (other batches)."""
        if state.get("options") != self._options():
            raise ValueError(f"{type(self).__name__}: the saved state belongs to a sampler with {state.get('options')}, "
                             f"but this one has {self._options()}; resume with the same data, batch size, seed, "
                             "options and number of processes.")
        if state.get("structure") is not None:
            self._load_structure(state["structure"])
        self._cache = None
