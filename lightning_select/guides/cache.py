"""The guide-embedding cache: each (sample, column) embedded once, reused every epoch."""

from __future__ import annotations

import json
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
    (``values.npy``, ``filled.npy``, ``meta.json``) that outlive the run. A stored fingerprint of
    the guide invalidates the disk cache when the guide changes. Under DDP each rank keeps its own
    cache (``directory/rank{r}``), so no file is written by two processes.

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
                 directory: Optional[Union[str, Path]] = None, fingerprint: str = "") -> None:
        if dtype not in (torch.float32, torch.float16):
            raise ValueError(f"Expected cache dtype float32 or float16, but got {dtype}.")
        self.num_samples, self.num_columns, self.dtype = num_samples, num_columns, dtype
        self.directory = Path(directory) if directory is not None else None
        self.fingerprint = fingerprint
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

    def _open_existing(self) -> None:
        import numpy as np

        assert self.directory is not None
        meta_path = self.directory / "meta.json"
        if not meta_path.exists():
            return
        meta = json.loads(meta_path.read_text())
        if meta != self._meta(meta.get("dim", -1)):
            reason = "the guide changed" if meta.get("fingerprint") != self.fingerprint else "its shape or dtype differs"
            warnings.warn(f"Discarding the guide-embedding cache in {self.directory}: {reason}.", RuntimeWarning)
            meta_path.unlink()
            return
        self._memmaps = [np.load(self.directory / "values.npy", mmap_mode="r+"),
                         np.load(self.directory / "filled.npy", mmap_mode="r+")]
        self.values, self.filled = (torch.from_numpy(m) for m in self._memmaps)

    def _allocate(self, dim: int) -> None:
        shape = (self.num_samples, self.num_columns, dim)
        if self.directory is None:
            self.values = torch.zeros(shape, dtype=self.dtype)
            return
        import numpy as np

        self.directory.mkdir(parents=True, exist_ok=True)
        np_dtype = np.float16 if self.dtype == torch.float16 else np.float32
        values = np.lib.format.open_memmap(self.directory / "values.npy", mode="w+", dtype=np_dtype, shape=shape)
        filled = np.lib.format.open_memmap(self.directory / "filled.npy", mode="w+", dtype=np.bool_,
                                           shape=(self.num_samples, self.num_columns))
        (self.directory / "meta.json").write_text(json.dumps(self._meta(dim)))
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


