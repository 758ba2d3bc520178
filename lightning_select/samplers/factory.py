"""The one constructor contract of lightning_select's batch samplers, so a datamodule can take any of them.

A datamodule that accepts ``batch_sampler=`` (``DigitsPairsDataModule``, ``QuoraDuplicatesDataModule``,
``SickDataModule``) is given a *factory*: a callable, usually a class or a ``functools.partial`` of
one (Hydra: ``_partial_: true``), that it calls once per ``train_dataloader()`` as

    factory(num_samples=N, batch_size=b, seed=s, num_replicas=W, rank=r)

with the training-set size, the per-process batch size, the datamodule's seed and this process's
place in DDP. The batch sampler it returns shards itself like ``DistributedSampler`` (every rank the
same number of batches, seeded per epoch), declares that through a ``.sampler`` that is a
:class:`~lightning_select.samplers.epoch.SelfShardingSampler` (so Lightning leaves the loader alone),
and implements ``set_epoch`` and ``skip_batches`` (exact mid-epoch resume through
:class:`~lightning_select.samplers.resumable.ResumableDataLoader`).

Example::

    >>> from functools import partial
    >>> from lightning_select.samplers import HardBatchSampler
    >>> loader = batch_sampler_loader(list(range(8)), partial(HardBatchSampler, fraction=0.5), 2, 0, 1, 0)
    >>> len(loader), sorted(i for b in loader for i in b.tolist())
    (4, [0, 1, 2, 3, 4, 5, 6, 7])
"""

from __future__ import annotations

from typing import Any, Callable

from torch.utils.data import DistributedSampler, Sampler

from lightning_select.samplers.resumable import ResumableDataLoader

BatchSamplerFactory = Callable[..., Sampler]


def build_batch_sampler(factory: BatchSamplerFactory, num_samples: int, batch_size: int, seed: int,
                        num_replicas: int, rank: int) -> Sampler:
    """Call ``factory`` with the contract's keywords and check that what it made shards itself."""
    if not callable(factory):
        raise TypeError(f"Expected `batch_sampler` to be a callable that builds a batch sampler (a class or a "
                        f"functools.partial; in Hydra `_partial_: true`), but got {type(factory).__name__}.")
    sampler = factory(num_samples=num_samples, batch_size=batch_size, seed=seed, num_replicas=num_replicas, rank=rank)
    declared = getattr(sampler, "sampler", None)
    if not isinstance(declared, DistributedSampler) or not hasattr(sampler, "skip_batches"):
        raise TypeError(
            f"`batch_sampler` built a {type(sampler).__name__}, which does not follow the batch-sampler contract of "
            "lightning_select.samplers.factory: it needs a `.sampler` that is a SelfShardingSampler (it shards "
            "itself across DDP ranks) and a `skip_batches(k)` method (mid-epoch resume).")
    return sampler


def batch_sampler_loader(dataset: Any, factory: BatchSamplerFactory, batch_size: int, seed: int, num_replicas: int,
                         rank: int, **loader_kwargs: Any) -> ResumableDataLoader:
    """A :class:`ResumableDataLoader` over ``dataset`` batched by ``factory``'s sampler (see the module docs)."""
    sampler = build_batch_sampler(factory, len(dataset), batch_size, seed, num_replicas, rank)
    return ResumableDataLoader(dataset, batch_sampler=sampler, **loader_kwargs)
