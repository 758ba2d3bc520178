"""``GuideLookup``: a frozen guide, the batch columns it reads, and its embedding cache.

The policy asks for "guide embeddings of these rows"; the lookup answers from the cache or runs the
guide (frozen, eval mode, no grad, autocast off) and checks what the guide returned. Under DDP the
cache is shared: see :class:`GuideLookup`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal, Optional, Union

import torch
from torch import Tensor, nn

from lightning_select.core.batch import select_batch
from lightning_select.core.context import SelectionError
from lightning_select.guides.cache import GuideEmbeddingCache
from lightning_select.guides.encoders import load_guide, module_fingerprint

if TYPE_CHECKING:  # pragma: no cover
    import lightning.pytorch as pl

Guide = Union[nn.Module, Callable[[Any], Tensor]]

#: Rows per rank exchanged in one all_gather round when a sharded memory cache is assembled.
EXCHANGE_CHUNK_ROWS = 8192


def shard_rows(rows: Tensor, rank: int, world_size: int) -> Tensor:
    """The rows rank ``rank`` of ``world_size`` embeds: ``rows[rank::world_size]``.

    Shards are disjoint, their union is ``rows``, and their sizes differ by at most one (the
    largest is ``ceil(len(rows) / world_size)``, the padded size of the exchange).

    Example::

        >>> [shard_rows(torch.arange(5), r, 2).tolist() for r in range(2)]
        [[0, 2, 4], [1, 3]]
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"Expected 0 <= rank < world_size, but got rank={rank}, world_size={world_size}.")
    return rows[rank::world_size]


class GuideLookup:
    """Guide embeddings ``[b, G]`` of the batch columns ``columns`` for given rows, cached by sample index.

    Args:
        guide: a frozen ``nn.Module`` or callable mapping a column's raw inputs to ``[b, G]``
            embeddings, or a model id/path for :func:`~lightning_select.guides.encoders.load_guide`.
        columns: batch keys read by each role (roles reading the same key share one guide pass).
        cache: ``"memory"``, ``"disk"`` (needs ``cache_dir``) or ``None``.
        cache_dtype: ``"float32"`` (exact) or ``"float16"``.
        cache_dir: directory of the disk cache, shared by every rank of a node (below).
        precompute: fill the cache for the whole training set before training (progress bar); None
            means True whenever a cache is used (see ``GuidedNegatives``);
            under DDP the work is sharded across ranks.
        fingerprint: identifies a non-``nn.Module`` guide for disk-cache invalidation.
        owner: the policy's name, for error messages.

    **Under DDP** (``world_size > 1``) each sample is embedded by the guide once per node, not once
    per rank:

    * ``cache="disk"``: one cache in ``cache_dir`` that every rank of the node maps (with several
      nodes, ``cache_dir/node{node_rank}``, so nodes sharing a file system never write the same
      files). Local rank 0 alone validates it (fingerprint, shape, dtype; a mismatch discards it;
      damaged files or rows are repaired or rebuilt with a warning, see
      :class:`~lightning_select.guides.cache.GuideEmbeddingCache`) and creates it, embedding its
      first batch to learn the embedding size; the other ranks wait at a barrier, then open it (a
      rank that then finds the files damaged makes every rank raise, after one ``all_gather``). With ``precompute`` local rank ``r`` of ``W`` embeds
      ``shard_rows(missing, r, W)`` of the rows still missing, writing disjoint rows in place;
      after a barrier every rank re-maps the complete cache. During training a rank that misses a
      row (no ``precompute``, or a row that was not filled) runs the guide itself and writes the row
      to the shared files (values flushed before the ``filled`` flag), so every rank, later epochs
      and later runs reuse it; two ranks missing the same row at once both write the same output,
      which is harmless.
    * ``cache="memory"`` with ``precompute``: each rank embeds its shard of all rows, then the
      shards are exchanged with ``all_gather`` (padded to equal size, in chunks) so every rank holds
      the full cache. Without ``precompute`` each rank fills its own memory cache from its batches.
    """

    def __init__(self, guide: Union[Guide, str], columns: Sequence[str],
                 cache: Optional[Literal["memory", "disk"]] = "memory",
                 cache_dtype: Literal["float32", "float16"] = "float32", cache_dir: Optional[str] = None,
                 precompute: Optional[bool] = None, fingerprint: Optional[str] = None,
                 owner: str = "GuidedNegatives") -> None:
        if cache not in (None, "memory", "disk"):
            raise ValueError(f"Expected `cache` to be 'memory', 'disk' or None, but got {cache!r}.")
        if cache == "disk" and not cache_dir:
            raise ValueError("`cache='disk'` needs `cache_dir=` (a directory for the memory-mapped store).")
        if cache_dtype not in ("float32", "float16"):
            raise ValueError(f"Expected `cache_dtype` 'float32' or 'float16', but got {cache_dtype!r}.")
        if precompute and cache is None:
            raise ValueError("`precompute=True` fills the cache; set `cache='memory'` or `'disk'`.")
        self.guide: Guide = load_guide(guide) if isinstance(guide, str) else guide
        if not callable(self.guide):
            raise TypeError(f"Expected the guide to be an nn.Module, a callable or a model id, but got {guide!r}.")
        self.columns = list(columns)
        #: Distinct batch keys; roles that read the same key (e.g. "image" for both) share one guide pass.
        self.input_columns = list(dict.fromkeys(self.columns))
        self.cache_mode, self.cache_dir = cache, cache_dir
        self.precompute = (cache is not None) if precompute is None else bool(precompute)
        self.cache_dtype = torch.float16 if cache_dtype == "float16" else torch.float32
        self.fingerprint, self.owner = fingerprint, owner
        self.cache: Optional[GuideEmbeddingCache] = None
        self._epoch_hits = self._epoch_misses = 0

    # ------------------------------------------------------------------ lifecycle
    def attach(self, pl_module: "pl.LightningModule") -> None:
        """Freeze the guide; refuse a guide that is part of the trained module."""
        if isinstance(self.guide, nn.Module):
            own = {id(p) for p in pl_module.parameters()}
            if any(id(p) in own for p in self.guide.parameters()):
                raise SelectionError(
                    "The guide is a submodule of the LightningModule, so Lightning would train it, put it in the "
                    f"optimizer, the checkpoint and DDP. Keep it out of the module: pass it only to {self.owner}."
                )
            self.guide.requires_grad_(False).eval()

    def to(self, device: torch.device) -> None:
        if isinstance(self.guide, nn.Module):
            self.guide.to(device)

    def open_cache(self, trainer: "pl.Trainer", dataset: Any, device: torch.device) -> None:
        """Create the cache for ``len(dataset)`` samples (and fill it if ``precompute``)."""
        if self.cache_mode is None or self.cache is not None:
            return
        try:
            n = len(dataset)
        except TypeError as err:
            raise SelectionError(f"{self.owner}'s cache needs a sized training dataset (len(dataset)).") from err
        fp = self.fingerprint or (module_fingerprint(self.guide) if isinstance(self.guide, nn.Module)
                                  else getattr(self.guide, "__qualname__", type(self.guide).__qualname__))
        if trainer.world_size > 1 and self.cache_mode == "disk":
            self._open_shared_disk_cache(trainer, dataset, device, n, fp)
            return
        directory = None
        if self.cache_mode == "disk":
            assert self.cache_dir is not None
            directory = Path(self.cache_dir)
        self.cache = GuideEmbeddingCache(n, len(self.input_columns), self.cache_dtype, directory, fp)
        if self.precompute and trainer.world_size > 1:
            self._fill_memory_cache_sharded(trainer, dataset, device)
        elif self.precompute:
            self.fill_cache(dataset, device, show_progress=trainer.is_global_zero)

    def fill_cache(self, dataset: Any, device: torch.device, batch_size: int = 256, show_progress: bool = True) -> None:
        """Embed every (sample, column) not yet cached, with a progress bar (this process alone)."""
        assert self.cache is not None
        todo = self.cache.missing_rows()
        if todo.numel() == 0:
            return
        self._embed_rows(dataset, todo, device, batch_size, show_progress)
        self.cache.flush()

    def check_columns(self, batch: Any) -> None:
        """Raise a clear error unless ``batch`` is a dict holding every column the guide reads."""
        if not isinstance(batch, Mapping):
            raise SelectionError(f"{self.owner} reads raw inputs by column name, so batches must be dicts.")
        missing = [c for c in self.columns if c not in batch]
        if missing:
            raise SelectionError(
                f"{self.owner} needs the raw-input columns {missing} in the batch (present: {sorted(batch)}). "
                "Keep the guide's inputs (e.g. the raw text) in the batch, or set anchor_column/positive_column/"
                "negative_columns to the keys you use."
            )

    def _embed_rows(self, dataset: Any, rows: Tensor, device: torch.device, batch_size: int = 256,
                    show_progress: bool = False) -> None:
        """Run the guide on every column of the samples ``rows`` and store the results in the cache."""
        from torch.utils.data import DataLoader, Subset
        from tqdm.auto import tqdm

        assert self.cache is not None
        if rows.numel() == 0:
            return
        loader = DataLoader(Subset(dataset, rows.tolist()), batch_size=batch_size)
        start = 0
        for batch in tqdm(loader, desc="guide cache", disable=not show_progress, leave=False):
            self.check_columns(batch)
            b = len(batch[self.columns[0]])
            idx = rows[start:start + b]
            start += b
            for c, column in enumerate(self.input_columns):
                self.cache.store(c, idx, self.run_guide(batch[column], b, column, device))

    # ------------------------------------------------------------------ DDP: one cache for all ranks
    def _open_shared_disk_cache(self, trainer: "pl.Trainer", dataset: Any, device: torch.device, n: int,
                                fingerprint: str, batch_size: int = 256) -> None:
        """One disk cache per node: local rank 0 validates/creates it, every rank fills its shard.

        The sequence of barriers is the same on every rank whatever the state of the files (a
        node may find a complete cache while another builds one), so no rank can wait alone.
        """
        assert self.cache_dir is not None
        directory = Path(self.cache_dir)
        if trainer.num_nodes > 1:
            directory = directory / f"node{trainer.node_rank}"
        rank, world = trainer.local_rank, max(trainer.world_size // trainer.num_nodes, 1)
        creator, barrier = rank == 0, trainer.strategy.barrier

        def open_cache() -> GuideEmbeddingCache:
            return GuideEmbeddingCache(n, len(self.input_columns), self.cache_dtype, directory, fingerprint,
                                       shared=True, creator=creator)

        if creator:  # validate first: a stale cache is discarded before any other rank looks at it
            self.cache = open_cache()
        barrier("lightning_select.guide_cache.validated")
        if not creator:
            self.cache = open_cache()
        barrier("lightning_select.guide_cache.opened")  # all ranks saw the same files: the same `todo`
        cache = self.cache
        assert cache is not None
        # A rank that found the files damaged after local rank 0 checked them refuses them; one collective
        # tells every rank, so all raise now instead of some waiting alone at a later barrier.
        refused = trainer.strategy.all_gather(torch.tensor([int(cache.problem is not None)], device=device))
        if bool(refused.any()):
            if cache.problem is not None:
                raise cache.damage_error()
            raise SelectionError(
                f"Another rank found the shared guide-embedding cache in {directory} damaged after local rank 0 "
                "checked it (its error names the file and the cause): delete the directory or pass a fresh cache_dir."
            )
        todo = cache.missing_rows()
        shard = shard_rows(todo, rank, world) if self.precompute else todo[:0]
        done = 0
        if creator and cache.values is None and todo.numel():
            # The files' shape needs the embedding size: embed a first batch (of our own shard) to learn it.
            first = shard[:batch_size] if self.precompute else todo[:1]
            self._embed_rows(dataset, first, device, batch_size)  # creates values/filled, then meta.json
            cache.flush()
            done = first.numel() if self.precompute else 0
        barrier("lightning_select.guide_cache.created")
        if cache.values is None and todo.numel():
            cache.reopen()  # the files local rank 0 just created
        if not self.precompute:
            return
        self._embed_rows(dataset, shard[done:], device, batch_size, show_progress=trainer.is_global_zero)
        cache.flush()
        barrier("lightning_select.guide_cache.filled")
        if cache.values is not None:
            cache.reopen()  # read the complete cache, every rank's rows included

    def _fill_memory_cache_sharded(self, trainer: "pl.Trainer", dataset: Any, device: torch.device,
                                   batch_size: int = 256) -> None:
        """Each rank embeds ``shard_rows(all, rank, W)``; an all_gather gives every rank the full cache."""
        cache = self.cache
        assert cache is not None
        rank, world = trainer.global_rank, trainer.world_size
        shard = shard_rows(cache.missing_rows(), rank, world)
        self._embed_rows(dataset, shard, device, batch_size, show_progress=trainer.is_global_zero)
        gather = trainer.strategy.all_gather
        sizes = gather(torch.tensor([shard.numel(), cache.dim or 0], device=device)).reshape(world, 2).cpu()
        width, dim = int(sizes[:, 0].max()), int(sizes[:, 1].max())
        if width == 0:
            return
        for start in range(0, width, EXCHANGE_CHUNK_ROWS):  # bounded transient memory per round
            k = min(EXCHANGE_CHUNK_ROWS, width - start)
            mine = shard[start:start + k]
            idx = torch.full((k,), -1, dtype=torch.long)
            vals = torch.zeros(k, cache.num_columns, dim)
            idx[: mine.numel()] = mine
            if mine.numel():
                assert cache.values is not None
                vals[: mine.numel()] = cache.values[mine].float()  # fp16 -> fp32 -> fp16 is exact
            all_idx = gather(idx.to(device)).reshape(world, k).cpu()
            all_vals = gather(vals.to(device)).reshape(world, k, cache.num_columns, dim).cpu()
            for r in range(world):
                keep = all_idx[r] >= 0
                if r == rank or not bool(keep.any()):
                    continue
                for c in range(cache.num_columns):
                    cache.store(c, all_idx[r][keep], all_vals[r][keep, c])

    def flush(self) -> None:
        if self.cache is not None:
            self.cache.flush()

    # ------------------------------------------------------------------ lookups
    def run_guide(self, inputs: Any, expected: int, column: str, device: torch.device) -> Tensor:
        """The guide's fp32 ``[expected, G]`` embeddings of one column's raw inputs, checked."""
        if isinstance(self.guide, nn.Module) and self.guide.training:
            self.guide.eval()  # Lightning never reaches it, but a user might have called .train()
        if isinstance(inputs, Tensor):
            inputs = inputs.to(device)
        with torch.no_grad(), torch.autocast(device_type=device.type, enabled=False):
            out = self.guide(inputs)
        if not isinstance(out, Tensor) or out.dim() != 2:
            raise SelectionError(
                f"The guide must return a [batch, dim] tensor for column {column!r}, but returned "
                f"{type(out).__name__} with shape {tuple(getattr(out, 'shape', ()))}."
            )
        if out.shape[0] != expected:
            raise SelectionError(
                f"The guide returned {out.shape[0]} embeddings for column {column!r} but the student's batch has "
                f"{expected} rows: guide and student must see the same samples."
            )
        if not bool(torch.isfinite(out).all()):
            raise SelectionError(f"The guide returned non-finite embeddings for column {column!r}.")
        return out.float()

    def embeddings(self, batch: Any, indices: Tensor, device: torch.device) -> list[Tensor]:
        """Guide embeddings ``[b, G]`` of every role's column for the rows of ``batch`` (sample ``indices``)."""
        self.check_columns(batch)
        b = indices.numel()
        embedded: dict[str, Tensor] = {}
        for c, column in enumerate(self.input_columns):
            inputs = batch[column]
            size = inputs.shape[0] if isinstance(inputs, Tensor) else len(inputs)
            if size != b:
                raise SelectionError(f"Column {column!r} holds {size} rows but the batch has {b}.")
            if self.cache is None:
                embedded[column] = self.run_guide(inputs, b, column, device)
                continue
            hits_before = self.cache.hits
            compute = lambda rows, inputs=inputs, column=column: self.run_guide(  # noqa: E731
                select_batch(inputs, rows, b), rows.numel(), column, device)
            embedded[column] = self.cache.get_or_compute(c, indices, compute).to(device)
            self._epoch_hits += self.cache.hits - hits_before
            self._epoch_misses += b - (self.cache.hits - hits_before)
        out = [embedded[column] for column in self.columns]
        if len({t.shape[1] for t in out}) > 1:
            raise SelectionError(
                f"The guide embedded the columns {self.columns} to different dimensions {[t.shape[1] for t in out]}; "
                "one guide must map every column to the same space."
            )
        return out

    def epoch_hit_rate(self, reset: bool = False) -> Optional[float]:
        """Fraction of cache lookups answered from the cache since the last reset (None without a cache)."""
        if self.cache is None:
            return None
        total = self._epoch_hits + self._epoch_misses
        rate = self._epoch_hits / total if total else 0.0
        if reset:
            self._epoch_hits = self._epoch_misses = 0
        return rate
