"""``HardBatchSampler``: fixed mini-batches; after the first epoch, only the highest-loss ones.

The batches are cut once from a seeded permutation and never change. Epoch 0 yields all of them;
every later epoch yields the ``⌊fraction · b⌋`` batches whose recorded loss is highest (ties by
batch id), in a seeded order. The losses are recorded by the
:class:`~lightning_select.policies.hard_batches.HardBatches` callback (or by hand, :meth:`update`).
Under DDP a batch is global (one optimizer step of all ranks together); each rank yields its slice.

Example::

    >>> s = HardBatchSampler(6, batch_size=2, fraction=0.5, seed=0)
    >>> [len(b) for b in s.batches], all(s.batch_of_index[i] == b for b, m in enumerate(s.batches) for i in m)
    ([2, 2, 2], True)
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Optional

import torch
from torch import Tensor
from torch.utils.data import Sampler

from lightning_select.samplers.epoch import _EpochHook, check_replicas, epoch_generator, shard
from lightning_select.samplers.rs2 import check_sampler_options


class HardBatchSampler(Sampler[list[int]]):
    """Batches of fixed membership; epochs after the first train only the ``⌊fraction · b⌋`` hardest.

    The ``b`` batches are cut once, in order, from ``randperm(N)`` drawn from
    :func:`~lightning_select.samplers.epoch.epoch_generator` ``(seed, 0)``, ``batch_size ·
    num_replicas`` samples each (the last one smaller unless ``drop_last``). ``losses`` (``[b]`` float32, ``+inf`` until recorded, so an unseen batch
    counts as hardest) holds each batch's most recent recorded loss. Epoch 0 yields every batch;
    epoch ``e ≥ 1`` yields the top ``k = ⌊fraction · b⌋`` batches by recorded loss (a stable
    descending sort: ties go to the lower batch id). Either set is shuffled by
    ``epoch_generator(seed, e)``.

    An epoch's batches are computed on first use (``len()`` or iteration) and cached; the cache is
    dropped by :meth:`set_epoch` to another epoch and by :meth:`load_state_dict`. ``len()`` depends
    only on the epoch (``b``, then ``k``). :meth:`state_dict` holds the losses (and the options, to
    check a resume); with them the batches of any epoch are reproduced exactly. :meth:`skip_batches`
    serves :class:`~lightning_select.samplers.resumable.ResumableDataLoader` on mid-epoch resume.
    :meth:`batches_in_epoch` and :meth:`total_batches` give the true per-epoch and total batch
    counts, which Lightning's ``estimated_stepping_batches`` (sized from epoch 0) over-counts by
    ``(E − 1) · (b − k)``: size step-based schedules with
    :func:`~lightning_select.core.schedule.stepping_batches`.

    **DDP: a batch is one optimizer step of all ranks.** With ``num_replicas=W`` and ``rank=r``
    (default: one process) the batches above are *global*: every rank cuts the same ``b`` batches
    of ``batch_size · W`` samples from the same seed, goes through the same batch ids in the same
    order, and trains, at each step, its slice of the global batch: the batch padded by wrapping
    around to a multiple of ``W``, positions ``r::W`` (:func:`~lightning_select.samplers.epoch.shard`,
    as ``DistributedSampler`` cuts a dataset), so ``batch_size`` samples per rank (``⌈g / W⌉``
    for a last batch of ``g < batch_size · W``). So every rank yields the same number of batches;
    :class:`~lightning_select.policies.hard_batches.HardBatches` records one loss per global batch
    from the rows of every rank (``ctx.gathered``), so every rank holds the same losses and picks
    the same hard batches. The batches depend on ``W``, so a state saved with another world size is
    refused. ``batch_of_index`` and ``batches`` are global; ``len()`` and iteration are this rank's.
    The batch sampler declares itself sharded through its ``.sampler`` (a
    :class:`~lightning_select.samplers.epoch.SelfShardingSampler`); inside a
    :class:`~lightning_select.samplers.resumable.ResumableDataLoader` Lightning then leaves it as it
    is (a plain ``DataLoader`` under DDP needs ``Trainer(use_distributed_sampler=False)``).

    Args:
        num_samples: ``N``, the size of the training set.
        batch_size: samples per batch and rank (a global batch holds ``batch_size · num_replicas``).
        fraction: ``δ`` in ``(0, 1]``, the share of batches kept after the first epoch (paper: 0.5).
        seed: seed of the membership and of the per-epoch order.
        drop_last: drop the last global batch if it is smaller than ``batch_size · num_replicas``.
        num_replicas: number of DDP ranks (``trainer.world_size``).
        rank: this process's rank (``trainer.global_rank``).

    Example::

        >>> s = HardBatchSampler(8, batch_size=2, fraction=0.5, seed=0)
        >>> len(s), len(list(s))
        (4, 4)
        >>> for batch_id, loss in enumerate([0.1, 0.9, 0.5, 0.2]):
        ...     s.update(batch_id, loss)
        >>> s.set_epoch(1)
        >>> sorted(s.batch_ids(1)), len(s), s.total_batches(max_epochs=3)
        ([1, 2], 2, 8)
        >>> ranks = [HardBatchSampler(8, batch_size=2, fraction=0.5, num_replicas=2, rank=r) for r in (0, 1)]
        >>> ranks[0].batches, ranks[0].batch_ids(0)  # two global batches of 2 · 2 samples, in this order
        ([[4, 0, 7, 3], [2, 5, 1, 6]], [0, 1])
        >>> [list(r) for r in ranks]  # rank 0 and rank 1: each one's slice of global batch 0, then of 1
        [[[4, 7], [2, 1]], [[0, 3], [5, 6]]]
    """

    def __init__(self, num_samples: int, batch_size: int, fraction: float = 0.5, seed: int = 0,
                 drop_last: bool = False, num_replicas: int = 1, rank: int = 0) -> None:
        if isinstance(num_samples, Sampler):
            raise ValueError("HardBatchSampler: got a sampler as `num_samples`: Lightning is re-building the batch "
                             "sampler to inject its DistributedSampler. Build the loader as a ResumableDataLoader "
                             "(which declares the batch sampler as sharded) and pass `num_replicas` and `rank`, or "
                             "create the Trainer with `use_distributed_sampler=False`.")
        check_sampler_options("HardBatchSampler", {"num_samples": num_samples, "batch_size": batch_size}, fraction,
                              seed, "the paper's δ is 0.5")
        check_replicas("HardBatchSampler", num_replicas, rank)
        self.num_samples, self.batch_size, self.fraction = num_samples, batch_size, float(fraction)
        self.seed, self.drop_last, self.epoch = seed, bool(drop_last), 0
        self.num_replicas, self.rank = num_replicas, rank
        #: samples per global batch (one optimizer step of all ranks)
        self.global_batch_size = size = batch_size * num_replicas
        order = torch.randperm(num_samples, generator=epoch_generator(seed, 0)).tolist()
        batches = [order[a:a + size] for a in range(0, num_samples, size)]
        if self.drop_last and len(batches[-1]) < size:
            batches.pop()
        if not batches:
            raise ValueError(f"HardBatchSampler: {num_samples} samples make no full batch of {batch_size}·{num_replicas}"
                             " with `drop_last=True`; lower `batch_size` or set `drop_last=False`.")
        self.batches: list[list[int]] = batches
        self.num_batches = len(batches)
        self.num_hard = math.floor(round(self.fraction * self.num_batches, 9))
        if self.num_hard < 1:
            raise ValueError(f"HardBatchSampler: `fraction`={fraction} keeps ⌊{fraction}·{self.num_batches}⌋ = 0 "
                             "batches after the first epoch; raise `fraction` or lower `batch_size`.")
        #: ``[N]`` long: the (global) batch id of each sample (−1 for samples dropped by ``drop_last``).
        self.batch_of_index = torch.full((num_samples,), -1, dtype=torch.long)
        for b, members in enumerate(batches):
            self.batch_of_index[torch.tensor(members)] = b
        #: ``[b]`` float32: each batch's most recently recorded loss (``+inf`` until recorded).
        self.losses = torch.full((self.num_batches,), float("inf"), dtype=torch.float32)
        self.sampler = _EpochHook(self, self.epoch_batches)
        self._cache: Optional[tuple[int, list[int]]] = None
        self._skip = 0

    # ------------------------------------------------------------------ epochs
    def set_epoch(self, epoch: int) -> None:
        """Select the batches of ``epoch`` (forwarded by Lightning through ``self.sampler``)."""
        if epoch != self.epoch:
            self._cache = None
        self.epoch = epoch

    def hard_batch_ids(self) -> Tensor:
        """``[k]`` long: the ``k`` batch ids with the highest recorded loss (ties by lower id), by rank."""
        order = torch.sort(self.losses, descending=True, stable=True).indices
        return order[: self.num_hard]

    def batch_ids(self, epoch: int) -> list[int]:
        """The batch ids ``epoch`` yields, in order (from the losses recorded so far)."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        ids = torch.arange(self.num_batches) if epoch == 0 else self.hard_batch_ids()
        perm = torch.randperm(ids.numel(), generator=epoch_generator(self.seed, epoch))
        out = ids[perm].tolist()
        self._cache = (epoch, out)
        return out

    def rank_slice(self, batch_id: int) -> list[int]:
        """This rank's samples of global batch ``batch_id`` (the whole batch in one process)."""
        return shard(self.batches[batch_id], self.num_replicas, self.rank)

    def epoch_batches(self) -> list[list[int]]:
        """This rank's batches (sample indices) of the current epoch."""
        return [self.rank_slice(b) for b in self.batch_ids(self.epoch)]

    def batches_in_epoch(self, epoch: int) -> int:
        """Batches (= optimizer steps) of ``epoch``: ``b`` for epoch 0, then ``k``; the same on every rank."""
        return self.num_batches if epoch == 0 else self.num_hard

    def total_batches(self, max_epochs: int) -> int:
        """Batches of a run of ``max_epochs`` epochs: ``b + (max_epochs − 1) · k``.

        Lightning's ``estimated_stepping_batches`` is ``max_epochs · b`` (it sizes every epoch
        from epoch 0), ``(max_epochs − 1) · (b − k)`` too many.
        """
        return sum(self.batches_in_epoch(e) for e in range(max(int(max_epochs), 0)))

    # ------------------------------------------------------------------ losses
    def update(self, batch_id: int, loss: Any) -> None:
        """Record ``loss`` (a float or a 0-d tensor) as the current loss of batch ``batch_id``."""
        b = int(batch_id)
        if not 0 <= b < self.num_batches:
            raise IndexError(f"HardBatchSampler: batch id {b} is out of range for {self.num_batches} batches.")
        self.losses[b] = float(loss)

    # ------------------------------------------------------------------ loader protocol
    def skip_batches(self, count: int) -> None:
        """Leave out the first ``count`` batches of the next iteration (mid-epoch resume)."""
        self._skip = int(count)

    def __iter__(self) -> Iterator[list[int]]:
        skip, self._skip = self._skip, 0
        return iter([list(b) for b in self.epoch_batches()[skip:]])

    def __len__(self) -> int:
        return self.batches_in_epoch(self.epoch)

    # ------------------------------------------------------------------ state
    def _options(self) -> dict[str, Any]:
        return {"num_samples": self.num_samples, "batch_size": self.batch_size, "fraction": self.fraction,
                "seed": self.seed, "drop_last": self.drop_last, "num_replicas": self.num_replicas}

    def state_dict(self) -> dict[str, Any]:
        """The recorded losses and the options they belong to."""
        return {"losses": self.losses.clone(), **self._options()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the recorded losses; refuses a state saved with other options (other batches)."""
        saved = {k: state.get(k, 1 if k == "num_replicas" else None) for k in self._options()}  # 1: older states
        if saved != self._options():
            raise ValueError(f"HardBatchSampler: the saved state belongs to a sampler with {saved}, but this one has "
                             f"{self._options()}; resume with the same data, batch size, fraction, seed and number "
                             "of processes.")
        self.losses = state["losses"].detach().to(torch.float32).cpu().clone()
        self._cache = None
