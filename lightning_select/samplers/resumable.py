"""``ResumableDataLoader``: a DataLoader whose position inside an epoch survives a checkpoint.

Lightning saves ``state_dict()`` of every training DataLoader that has one into the checkpoint and
calls ``load_state_dict()`` on resume before iterating again. This loader records how many batches
of the current epoch it has handed out; after a mid-epoch resume (for example after a pre-emption,
see :class:`~lightning_select.core.preemption.PreemptionCheckpoint`) the first iteration skips
exactly those batches, *by index*, without loading their data. Together with a sampler whose order
depends only on ``(seed, epoch)`` (``EpochSeededSampler``, or the ``DistributedSampler`` Lightning
injects under DDP) the resumed run sees exactly the batches the uninterrupted run would have seen.

Skipping works with the default ``BatchSampler`` (the first ``k · batch_size`` indices of the
sampler are dropped, so ``drop_last`` is respected) and with batch samplers that implement
``skip_batches(k)`` (:class:`~lightning_select.samplers.no_duplicates.NoDuplicatesBatchSampler`).

A custom batch sampler that shards itself across DDP ranks declares it with a ``.sampler`` that is
a :class:`~lightning_select.samplers.epoch.SelfShardingSampler` (a ``DistributedSampler``, e.g.
:class:`~lightning_select.samplers.hard_batches.HardBatchSampler`). This loader then shows that
object as ``loader.sampler``: ``torch``'s ``DataLoader`` sets ``loader.sampler`` to a
``SequentialSampler`` whenever a ``batch_sampler`` is given (and never reads it then), while
Lightning (``use_distributed_sampler=True``, the default) decides from ``loader.sampler`` whether to
re-build the loader with a ``DistributedSampler`` injected into the batch sampler. So Lightning
leaves such a loader as it is, and ``set_epoch`` still reaches the batch sampler once.

Example::

    >>> import torch
    >>> loader = ResumableDataLoader(list(range(10)), batch_size=3)
    >>> it = iter(loader); _ = next(it); _ = next(it)
    >>> state = loader.state_dict()
    >>> state["batches_served"]
    2
    >>> fresh = ResumableDataLoader(list(range(10)), batch_size=3)
    >>> fresh.load_state_dict(state)
    >>> [b.tolist() for b in fresh]
    [[6, 7, 8], [9]]
"""

from __future__ import annotations

from typing import Any, Iterator, Optional

from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, Sampler


class SkipFirst(Sampler):
    """Yields the items of ``sampler`` after the first ``count`` (``len`` stays the full length)."""

    def __init__(self, sampler: Any, count: int) -> None:
        self.sampler, self.count = sampler, count

    def __iter__(self) -> Iterator[Any]:
        it = iter(self.sampler)
        for _ in range(self.count):
            if next(it, None) is None:
                return
        yield from it

    def __len__(self) -> int:
        return len(self.sampler)


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` with ``state_dict`` / ``load_state_dict``: exact mid-epoch resume (see module docs)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        declared = getattr(self.batch_sampler, "sampler", None)
        if type(self.batch_sampler) is not BatchSampler and isinstance(declared, DistributedSampler):
            # a self-sharding batch sampler (see the module docs); DataLoader forbids setting `sampler` once built
            object.__setattr__(self, "sampler", declared)
        self._served = 0
        self._skip = 0
        self._skip_epoch: Optional[int] = None

    def _epoch(self) -> Optional[int]:
        """The epoch the (batch) sampler was last set to, if it tracks one (``set_epoch``)."""
        for source in (self.batch_sampler, self.sampler):
            epoch = getattr(source, "epoch", None)
            if isinstance(epoch, int):
                return epoch
        return None

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        skip, self._skip = self._skip, 0
        if self._skip_epoch is not None and self._epoch() != self._skip_epoch:
            skip = 0  # the checkpoint was taken at the end of an epoch: the new epoch starts from its beginning
        self._served = skip
        restore = self._apply_skip(skip) if skip else None
        try:
            for batch in super().__iter__():
                self._served += 1
                yield batch
        finally:
            if restore is not None:
                restore()

    def _apply_skip(self, skip: int) -> Any:
        batch_sampler = self.batch_sampler
        if batch_sampler is None:  # no automatic batching: one item per "batch"
            raise NotImplementedError("ResumableDataLoader needs automatic batching (batch_size or batch_sampler).")
        if hasattr(batch_sampler, "skip_batches"):
            batch_sampler.skip_batches(skip)
            return None
        if type(batch_sampler) is not BatchSampler:
            raise TypeError(
                f"Cannot resume mid-epoch with a {type(batch_sampler).__name__}: give it a `skip_batches(k)` method, "
                "or resume from an end-of-epoch checkpoint."
            )
        original = batch_sampler.sampler
        batch_sampler.sampler = SkipFirst(original, skip * batch_sampler.batch_size)

        def restore() -> None:
            batch_sampler.sampler = original

        return restore

    def state_dict(self) -> dict[str, Any]:
        """Batches of the current epoch handed out so far (0 once the epoch is complete), and the epoch."""
        served = self._served if self._served < len(self) else 0
        return {"batches_served": served, "epoch": self._epoch()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Skip ``state["batches_served"]`` batches at the start of the next iteration of the same epoch.

        If the sampler tracks epochs and the next iteration belongs to a later epoch (the checkpoint
        was taken at an epoch boundary, e.g. with ``limit_train_batches``), nothing is skipped.
        """
        self._skip = int(state.get("batches_served", 0))
        self._skip_epoch = state.get("epoch")


def carry_state(sampler: Any, previous: Optional[Any], pending: Optional[dict[str, Any]]) -> None:
    """Give a (re)built loader's ``sampler`` the state a callback keeps for it.

    A callback that owns a sampler's state (``HardBatches``, ``InfoBatch``) finds the sampler when
    training starts and again whenever the loader may have been rebuilt. The new ``sampler`` gets
    ``pending`` (a state restored from a checkpoint before any sampler existed) or else the state of the
    ``previous`` sampler it replaces (a reloaded loader); with neither it keeps its own fresh state.
    """
    state = pending if pending is not None else (previous.state_dict() if previous is not None else None)
    if state is not None:
        sampler.load_state_dict(state)
