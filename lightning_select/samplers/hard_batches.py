"""``HardBatchSampler``: fixed mini-batches; after the first epoch, only the highest-loss ones.

The batches are cut once from a seeded permutation and never change. Epoch 0 yields all of them;
every later epoch yields the ``⌊fraction · b⌋`` batches whose recorded loss is highest (ties by
batch id), in a seeded order. The losses are recorded by the
:class:`~lightning_select.policies.hard_batches.HardBatches` callback (or by hand, :meth:`update`).

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

from lightning_select.samplers.epoch import epoch_generator
from lightning_select.samplers.rs2 import check_sampler_options


class _EpochHook(Sampler[int]):
    """``batch_sampler.sampler``: Lightning calls ``set_epoch`` on ``loader.sampler`` and on
    ``loader.batch_sampler.sampler`` only, so this forwards it to the batch sampler. Iterating it
    yields the indices of the owner's current epoch, flattened."""

    def __init__(self, owner: "HardBatchSampler") -> None:
        self.owner = owner

    def set_epoch(self, epoch: int) -> None:
        self.owner.set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        return iter([i for b in self.owner.epoch_batches() for i in b])

    def __len__(self) -> int:
        return sum(len(b) for b in self.owner.epoch_batches())


class HardBatchSampler(Sampler[list[int]]):
    """Batches of fixed membership; epochs after the first train only the ``⌊fraction · b⌋`` hardest.

    The ``b`` batches are cut once, in order, from ``randperm(N)`` drawn from
    :func:`~lightning_select.samplers.epoch.epoch_generator` ``(seed, 0)`` (the last one smaller
    unless ``drop_last``). ``losses`` (``[b]`` float32, ``+inf`` until recorded, so an unseen batch
    counts as hardest) holds each batch's most recent recorded loss. Epoch 0 yields every batch;
    epoch ``e ≥ 1`` yields the top ``k = ⌊fraction · b⌋`` batches by recorded loss (a stable
    descending sort: ties go to the lower batch id). Either set is shuffled by
    ``epoch_generator(seed, e)``.

    An epoch's batches are computed on first use (``len()`` or iteration) and cached; the cache is
    dropped by :meth:`set_epoch` to another epoch and by :meth:`load_state_dict`. ``len()`` depends
    only on the epoch (``b``, then ``k``). :meth:`state_dict` holds the losses (and the options, to
    check a resume); with them the batches of any epoch are reproduced exactly. :meth:`skip_batches`
    serves :class:`~lightning_select.samplers.resumable.ResumableDataLoader` on mid-epoch resume.
    Single process only (not sharded across DDP ranks).

    Args:
        num_samples: ``N``, the size of the training set.
        batch_size: samples per batch.
        fraction: ``δ`` in ``(0, 1]``, the share of batches kept after the first epoch (paper: 0.5).
        seed: seed of the membership and of the per-epoch order.
        drop_last: drop the last batch if it is smaller than ``batch_size``.

    Example::

        >>> s = HardBatchSampler(8, batch_size=2, fraction=0.5, seed=0)
        >>> len(s), len(list(s))
        (4, 4)
        >>> for batch_id, loss in enumerate([0.1, 0.9, 0.5, 0.2]):
        ...     s.update(batch_id, loss)
        >>> s.set_epoch(1)
        >>> sorted(s.batch_ids(1)), len(s)
        ([1, 2], 2)
    """

    def __init__(self, num_samples: int, batch_size: int, fraction: float = 0.5, seed: int = 0,
                 drop_last: bool = False) -> None:
        check_sampler_options("HardBatchSampler", {"num_samples": num_samples, "batch_size": batch_size}, fraction,
                              seed, "the paper's δ is 0.5")
        self.num_samples, self.batch_size, self.fraction = num_samples, batch_size, float(fraction)
        self.seed, self.drop_last, self.epoch = seed, bool(drop_last), 0
        order = torch.randperm(num_samples, generator=epoch_generator(seed, 0)).tolist()
        batches = [order[a:a + batch_size] for a in range(0, num_samples, batch_size)]
        if self.drop_last and len(batches[-1]) < batch_size:
            batches.pop()
        if not batches:
            raise ValueError(f"HardBatchSampler: {num_samples} samples make no full batch of {batch_size} with "
                             "`drop_last=True`; lower `batch_size` or set `drop_last=False`.")
        self.batches: list[list[int]] = batches
        self.num_batches = len(batches)
        self.num_hard = math.floor(round(self.fraction * self.num_batches, 9))
        if self.num_hard < 1:
            raise ValueError(f"HardBatchSampler: `fraction`={fraction} keeps ⌊{fraction}·{self.num_batches}⌋ = 0 "
                             "batches after the first epoch; raise `fraction` or lower `batch_size`.")
        #: ``[N]`` long: the batch id of each sample (−1 for samples dropped by ``drop_last``).
        self.batch_of_index = torch.full((num_samples,), -1, dtype=torch.long)
        for b, members in enumerate(batches):
            self.batch_of_index[torch.tensor(members)] = b
        #: ``[b]`` float32: each batch's most recently recorded loss (``+inf`` until recorded).
        self.losses = torch.full((self.num_batches,), float("inf"), dtype=torch.float32)
        self.sampler = _EpochHook(self)
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

    def epoch_batches(self) -> list[list[int]]:
        """The batches (sample indices) of the current epoch."""
        return [self.batches[b] for b in self.batch_ids(self.epoch)]

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
        return self.num_batches if self.epoch == 0 else self.num_hard

    # ------------------------------------------------------------------ state
    def _options(self) -> dict[str, Any]:
        return {"num_samples": self.num_samples, "batch_size": self.batch_size, "fraction": self.fraction,
                "seed": self.seed, "drop_last": self.drop_last}

    def state_dict(self) -> dict[str, Any]:
        """The recorded losses and the options they belong to."""
        return {"losses": self.losses.clone(), **self._options()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the recorded losses; refuses a state saved with other options (other batches)."""
        saved = {k: state.get(k) for k in self._options()}
        if saved != self._options():
            raise ValueError(f"HardBatchSampler: the saved state belongs to a sampler with {saved}, but this one has "
                             f"{self._options()}; resume with the same data, batch size, fraction and seed.")
        self.losses = state["losses"].detach().to(torch.float32).cpu().clone()
        self._cache = None
