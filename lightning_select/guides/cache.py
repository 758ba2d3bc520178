"""The guide-embedding cache: each (sample, column) embedded once, reused every epoch."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor

from lightning_select.core.context import SelectionError

# ----------------------------------------------------------------------------------------------- cache
class GuideEmbeddingCache:
    """Guide embeddings keyed by (sample index, column), computed once and reused every epoch.

    In memory (``[N, C, G]`` in fp32 or fp16) or, with ``directory``, in numpy ``.npy`` memory maps
    (``values.npy``, ``filled.npy``, ``meta.json``) that outlive the run. ``meta.json`` records the
    shape, dtype and a fingerprint of the guide; a cache whose meta differs (the guide changed, or
    the dataset size, column count or dtype did) is discarded with a warning and rebuilt. ``meta.json``
    is written last and atomically (temporary file + ``os.replace``), so a reader never sees a
    half-written one.

    **Shared directory** (``shared=True``): under DDP every rank of a node opens the *same* directory
    (see :class:`~lightning_select.guides.lookup.GuideLookup`). Exactly one process per directory is
    the ``creator`` (local rank 0): only it validates, discards or creates the files; the others
    (``creator=False``) open what it made after a barrier and never create, discard or resize. All
    of them write rows in place (``r+`` memory maps). A row is always written whole (every value of
    one (sample, column)); its values are written and flushed *before* its ``filled`` flag is set, so
    a flag seen set (by another process, or in the files after a crash) always covers finished
    values. Two processes writing the same row both write the guide's output for it (equal up to the
    float noise a batch-dependent kernel may add), so even that race only ever stores a correct row.

    Args:
        num_samples: ``N``, the number of sample indices.
        num_columns: ``C``, the number of distinct guide input columns.
        dtype: ``torch.float32`` (exact) or ``torch.float16``.
        directory: disk cache directory; ``None`` keeps the cache in memory.
        fingerprint: identifies the guide; a stored cache with another fingerprint is discarded.
        shared: the directory is used by several processes at once (see above).
        creator: with ``shared``, whether this process may create, validate and discard the files.

    Example::

        >>> cache = GuideEmbeddingCache(num_samples=10, num_columns=2)
        >>> calls = []
        >>> def guide(rows): calls.append(rows.tolist()); return torch.ones(len(rows), 4)
        >>> _ = cache.get_or_compute(0, torch.tensor([3, 5]), guide)
        >>> _ = cache.get_or_compute(0, torch.tensor([5, 7]), guide)
        >>> calls, cache.hits, cache.misses
        ([[0, 1], [1]], 1, 3)
    """

    def __init__(self, num_samples: int, num_columns: int, dtype: torch.dtype = torch.float32,
                 directory: Optional[Union[str, Path]] = None, fingerprint: str = "", shared: bool = False,
                 creator: bool = True) -> None:
        if dtype not in (torch.float32, torch.float16):
            raise ValueError(f"Expected cache dtype float32 or float16, but got {dtype}.")
        self.num_samples, self.num_columns, self.dtype = num_samples, num_columns, dtype
        self.directory = Path(directory) if directory is not None else None
        self.fingerprint = fingerprint
        self.shared, self.creator = shared and self.directory is not None, creator or not shared
        self.values: Optional[Tensor] = None
        self.filled = torch.zeros(num_samples, num_columns, dtype=torch.bool)
        self._memmaps: list[Any] = []  # numpy memmaps behind `values`/`filled` (disk mode)
        self.hits = self.misses = 0
        if self.directory is not None:
            self._open_existing()

    @property
    def dim(self) -> Optional[int]:
        return None if self.values is None else int(self.values.shape[-1])

    def _meta(self, dim: int) -> dict[str, Any]:
        return {"num_samples": self.num_samples, "num_columns": self.num_columns, "dim": dim,
                "dtype": str(self.dtype), "fingerprint": self.fingerprint}

    def missing_rows(self) -> Tensor:
        """Sample indices with at least one column not cached yet (ascending)."""
        return (~self.filled.all(1)).nonzero().squeeze(1)

    def _open_existing(self) -> None:
        import numpy as np

        assert self.directory is not None
        meta_path = self.directory / "meta.json"
        if not meta_path.exists():
            return
        meta = json.loads(meta_path.read_text())
        if meta != self._meta(meta.get("dim", -1)):
            if not self.creator:  # only the creator judges and discards; it did so before we got here
                return
            reason = "the guide changed" if meta.get("fingerprint") != self.fingerprint else "its shape or dtype differs"
            warnings.warn(f"Discarding the guide-embedding cache in {self.directory}: {reason}.", RuntimeWarning)
            meta_path.unlink()
            return
        self._memmaps = [np.load(self.directory / "values.npy", mmap_mode="r+"),
                         np.load(self.directory / "filled.npy", mmap_mode="r+")]
        self.values, self.filled = (torch.from_numpy(m) for m in self._memmaps)

    def reopen(self) -> None:
        """Map the files again, e.g. after other processes created or filled them (disk mode only).

        Never discards: a missing or mismatching ``meta.json`` raises :class:`SelectionError`.
        """
        if self.directory is None:
            return
        creator, self.creator = self.creator, False  # a mismatch here is an error, not a stale cache
        self._memmaps, self.values = [], None
        self.filled = torch.zeros(self.num_samples, self.num_columns, dtype=torch.bool)
        try:
            self._open_existing()
        finally:
            self.creator = creator
        if self.values is None:
            raise SelectionError(
                f"No valid guide-embedding cache in {self.directory} (meta.json missing or for another guide/shape). "
                "Under DDP local rank 0 creates it: cache_dir must be storage that every rank of a node sees."
            )

    def _write_meta(self, dim: int) -> None:
        """Write ``meta.json`` atomically: a temporary file in the same directory, then ``os.replace``."""
        assert self.directory is not None
        tmp = self.directory / f"meta.json.tmp{os.getpid()}"
        tmp.write_text(json.dumps(self._meta(dim)))
        os.replace(tmp, self.directory / "meta.json")

    def _allocate(self, dim: int) -> None:
        shape = (self.num_samples, self.num_columns, dim)
        if self.directory is None:
            self.values = torch.zeros(shape, dtype=self.dtype)
            return
        import numpy as np

        if not self.creator:
            raise SelectionError(
                f"The shared guide-embedding cache in {self.directory} is missing; only its creator (local rank 0) "
                "may create it."
            )
        self.directory.mkdir(parents=True, exist_ok=True)
        np_dtype = np.float16 if self.dtype == torch.float16 else np.float32
        values = np.lib.format.open_memmap(self.directory / "values.npy", mode="w+", dtype=np_dtype, shape=shape)
        filled = np.lib.format.open_memmap(self.directory / "filled.npy", mode="w+", dtype=np.bool_,
                                           shape=(self.num_samples, self.num_columns))
        values.flush()
        filled.flush()
        self._write_meta(dim)  # last: a valid meta.json means both arrays exist at full size
        self._memmaps = [values, filled]
        self.values, self.filled = torch.from_numpy(values), torch.from_numpy(filled)

    def store(self, column: int, indices: Tensor, embeddings: Tensor) -> None:
        if self.values is None:
            self._allocate(int(embeddings.shape[-1]))
        assert self.values is not None
        if embeddings.shape[-1] != self.values.shape[-1]:
            raise SelectionError(
                f"Guide embeddings of column {column} have dimension {embeddings.shape[-1]}, but the cache holds "
                f"dimension {self.values.shape[-1]}: every guide column must embed to the same dimension."
            )
        idx = indices.cpu()
        self.values[idx, column] = embeddings.detach().to("cpu", self.dtype)
        if self.shared:  # values reach the file before the flags that vouch for them
            self._memmaps[0].flush()
        self.filled[idx, column] = True

    def get_or_compute(self, column: int, indices: Tensor, compute: Callable[[Tensor], Tensor]) -> Tensor:
        """Embeddings ``[b, G]`` (fp32) for ``indices``; ``compute(rows)`` embeds the missing row positions."""
        idx = indices.cpu()
        hit = self.filled[idx, column]
        n_hit = int(hit.sum())
        self.hits += n_hit
        self.misses += idx.numel() - n_hit
        if n_hit == idx.numel():
            assert self.values is not None
            return self.values[idx, column].to(indices.device, torch.float32)
        missing_rows = (~hit).nonzero().squeeze(1)
        fresh = compute(missing_rows.to(indices.device)).float()
        self.store(column, idx[missing_rows], fresh)
        if n_hit == 0:
            return fresh
        assert self.values is not None
        out = self.values[idx, column].to(fresh.device, torch.float32)
        out[missing_rows.to(fresh.device)] = fresh
        return out

    def flush(self) -> None:
        """Write memory-mapped pages to disk (no-op in memory)."""
        for memmap in self._memmaps:
            memmap.flush()


