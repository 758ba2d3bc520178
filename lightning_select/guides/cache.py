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

#: The arrays of a disk cache; ``meta.json`` vouches for them.
_ARRAYS = ("values.npy", "filled.npy")
#: Samples per chunk when the rows of a disk cache are checked on opening (bounded transient memory).
_CHECK_CHUNK = 4096


class _Damage(Exception):
    """A cache file that cannot be used at all; the message says which and why."""


def _npy_layout(path: Path) -> tuple[int, tuple[int, ...], Any, bool]:
    """``(data offset, shape, dtype, fortran_order)`` from an ``.npy`` header, without mapping the file."""
    import numpy as np

    name = path.name
    try:
        if path.stat().st_size == 0:
            raise _Damage(f"{name} is empty")
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"unsupported .npy version {version}")
            return f.tell(), tuple(shape), dtype, bool(fortran)
    except FileNotFoundError:
        raise _Damage(f"{name} is missing") from None
    except (OSError, ValueError, EOFError, SyntaxError, TypeError) as err:
        raise _Damage(f"{name} has no readable .npy header ({err})") from None


# ----------------------------------------------------------------------------------------------- cache
class GuideEmbeddingCache:
    """Guide embeddings keyed by (sample index, column), computed once and reused every epoch.

    In memory (``[N, C, G]`` in fp32 or fp16) or, with ``directory``, in numpy ``.npy`` memory maps
    (``values.npy``, ``filled.npy``, ``meta.json``) that outlive the run. ``meta.json`` records the
    shape, dtype and a fingerprint of the guide; a cache whose meta differs (the guide changed, or
    the dataset size, column count or dtype did) is discarded with a warning and rebuilt. New arrays
    are created under temporary names and renamed into place, then ``meta.json`` is written last and
    atomically (temporary file + ``os.replace``): a reader never sees a half-written meta, and arrays
    without a meta are no cache (an interrupted allocation: rebuilt with a warning).

    **Damage** is checked when the cache is opened, never per lookup: ``meta.json`` must parse; both
    ``.npy`` headers must match its shape and dtype and each file must be exactly as long as its header
    says (checked *before* memory-mapping, which would silently zero-extend a short file). Then every
    row (one (sample, column)) marked filled must be finite and not all zero, and every flag 0 or 1.
    Recoverable damage is repaired with a ``RuntimeWarning`` naming the directory, files, rows and
    cause: rows past the end of a short ``values.npy``, rows whose flags a short ``filled.npy`` lost,
    and bad rows are marked missing (so they are recomputed); an unreadable meta, a missing, empty or
    mismatching array discards the cache, which is rebuilt. A damaged cache is never trained on.
    An exact all-zero vector is never a valid guide embedding (it has no direction: its cosine
    similarity is undefined), so :meth:`store` does not cache such rows, nor rows that overflow the
    cache dtype (warning once), and a filled all-zero row in the files can only be damage.

    **Shared directory** (``shared=True``): under DDP every rank of a node opens the *same* directory
    (see :class:`~lightning_select.guides.lookup.GuideLookup`). Exactly one process per directory is
    the ``creator`` (local rank 0): only it validates, discards or creates the files; the others
    (``creator=False``) open what it made after a barrier and never create, discard or resize. All
    of them write rows in place (``r+`` memory maps). A row is always written whole (every value of
    one (sample, column)); its values are written and flushed *before* its ``filled`` flag is set, so
    a flag seen set (by another process, or in the files after a crash) always covers finished
    values. Two processes writing the same row both write the guide's output for it (equal up to the
    float noise a batch-dependent kernel may add), so even that race only ever stores a correct row.
    Only the creator checks, repairs or discards; a process that is not the creator and finds damaged
    files leaves them untouched and :meth:`reopen` raises :class:`SelectionError` naming the cause.

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
        self._problem: Optional[str] = None  # why the files were refused (a process that may not repair)
        self._warned_invalid = False
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
        """Map a valid stored cache; the creator checks it first and repairs or discards damage (class doc)."""
        import numpy as np

        assert self.directory is not None
        self._problem = None
        if self.creator:
            self._remove_temporaries()
        meta_path = self.directory / "meta.json"
        if not meta_path.exists():
            if self.creator and any((self.directory / name).exists() for name in _ARRAYS):
                self._damaged("values.npy/filled.npy exist without meta.json (an interrupted allocation, "
                              "or meta.json was deleted)")
            return
        try:
            meta = json.loads(meta_path.read_text())
            if not isinstance(meta, dict):
                raise TypeError(f"it holds a JSON {type(meta).__name__}, not an object")
        except (OSError, ValueError, TypeError) as err:  # JSONDecodeError, UnicodeDecodeError: ValueErrors
            self._damaged(f"meta.json is unreadable ({err})")
            return
        if meta != self._meta(meta.get("dim", -1)):
            if not self.creator:  # only the creator judges and discards; it did so before we got here
                return
            reason = "the guide changed" if meta.get("fingerprint") != self.fingerprint else "its shape or dtype differs"
            warnings.warn(f"Discarding the guide-embedding cache in {self.directory}: {reason}.", RuntimeWarning)
            self._discard()
            return
        dim = meta["dim"]
        if type(dim) is not int or dim < 1:
            self._damaged(f"meta.json records dimension {dim!r}")
            return
        np_dtype = np.dtype(np.float16 if self.dtype == torch.float16 else np.float32)
        try:
            values_at = self._check_array("values.npy", (self.num_samples, self.num_columns, dim), np_dtype)
            filled_at = self._check_array("filled.npy", (self.num_samples, self.num_columns), np.dtype(np.bool_))
        except _Damage as err:
            self._damaged(str(err))
            return
        short = [(name, size, need) for name, (_, size, need) in zip(_ARRAYS, (values_at, filled_at)) if size < need]
        if short and not self.creator:  # never map (r+ would zero-extend) nor repair what the creator vouched for
            name, size, need = short[0]
            self._problem = f"{name} is {size} bytes, its header says {need}"
            return
        notes: list[str] = []
        if filled_at[1] < filled_at[2]:  # a short flag file: the lost flags read as "missing" once extended
            lost = filled_at[2] - max(filled_at[1], filled_at[0])
            notes.append(f"filled.npy is {filled_at[1]} bytes, its header says {filled_at[2]}: "
                         f"the flags of its last {lost} rows were lost")
            os.truncate(self.directory / "filled.npy", filled_at[2])
        filled = np.load(self.directory / "filled.npy", mmap_mode="r+")
        damaged: list[str] = []
        n_damaged = 0
        if values_at[1] < values_at[2]:
            # rows not wholly inside the file are unset *before* the file is extended with zeros
            row_bytes = dim * np_dtype.itemsize
            first_lost = max(values_at[1] - values_at[0], 0) // row_bytes
            flat = filled.reshape(-1)
            lost = int(np.count_nonzero(flat[first_lost:].view(np.uint8)))
            flat[first_lost:] = False
            filled.flush()
            if lost:
                n_damaged += lost
                damaged.append(f"{lost} lie past the end of values.npy ({values_at[1]} bytes, "
                               f"its header says {values_at[2]})")
            else:
                notes.append(f"values.npy is {values_at[1]} bytes, its header says {values_at[2]} "
                             "(no row marked filled was in the lost part)")
            os.truncate(self.directory / "values.npy", values_at[2])
        values = np.load(self.directory / "values.npy", mmap_mode="r+")
        if self.creator:
            garbled, bad = self._check_rows(values, filled)
            if garbled:
                n_damaged += garbled
                damaged.append(f"{garbled} have garbled flags in filled.npy")
            if bad:
                n_damaged += bad
                damaged.append(f"{bad} hold zeros or non-finite values")
        if damaged:
            notes.insert(0, f"{n_damaged} rows marked filled are damaged ({'; '.join(damaged)})")
        if notes:
            warnings.warn(f"Guide cache {self.directory}: {'; '.join(notes)}; they will be recomputed.",
                          RuntimeWarning, stacklevel=2)
        self._memmaps = [values, filled]
        self.values, self.filled = (torch.from_numpy(m) for m in self._memmaps)

    def _check_array(self, name: str, shape: tuple[int, ...], dtype: Any) -> tuple[int, int, int]:
        """``(data offset, file size, size its header needs)`` of a cache array; raises ``_Damage``."""
        import numpy as np

        assert self.directory is not None
        path = self.directory / name
        offset, got_shape, got_dtype, fortran = _npy_layout(path)
        if got_shape != shape or got_dtype != dtype or fortran:
            raise _Damage(f"{name} holds {got_dtype}{' (Fortran order)' if fortran else ''} {got_shape}, "
                          f"but meta.json says {dtype} {shape}")
        need = offset + int(np.prod(shape)) * dtype.itemsize
        size = path.stat().st_size
        if size > need:
            raise _Damage(f"{name} is {size} bytes, longer than the {need} its header says")
        return offset, size, need

    def _check_rows(self, values: Any, filled: Any) -> tuple[int, int]:
        """Unset the flags of rows that are not valid embeddings (vectorised, in chunks of samples).

        Returns ``(garbled, bad)``: flags that were neither 0 nor 1, and filled rows that hold an
        all-zero or non-finite vector. On the IEEE bits with the sign masked off, magnitudes order as
        integers, inf and NaN are the largest (exponent all ones) and ±0 is 0: a row is valid iff
        ``0 < max(bits & ~sign) < bits(inf)``, one integer reduction per row (fast for float16 too).
        """
        import numpy as np

        garbled = bad = 0
        flags = filled.view(np.uint8)
        if values.dtype == np.float16:
            bits, magnitude, inf = values.view(np.uint16), np.uint16(0x7FFF), 0x7C00
        else:
            bits, magnitude, inf = values.view(np.uint32), np.uint32(0x7FFFFFFF), 0x7F800000
        for start in range(0, self.num_samples, _CHECK_CHUNK):
            f = flags[start:start + _CHECK_CHUNK]
            odd = f > 1
            if odd.any():
                garbled += int(odd.sum())
                f[odd] = 0
            peak = (bits[start:start + _CHECK_CHUNK] & magnitude).max(axis=-1)
            wrong = (f == 1) & ((peak == 0) | (peak >= inf))
            if wrong.any():
                bad += int(wrong.sum())
                f[wrong] = 0
        if garbled or bad:
            filled.flush()
        return garbled, bad

    def _damaged(self, reason: str) -> None:
        """Unusable files: the creator warns and discards them (rebuilt); another process only records why."""
        if not self.creator:
            self._problem = reason
            return
        warnings.warn(f"Guide cache {self.directory}: {reason}; the cache will be rebuilt (every row recomputed).",
                      RuntimeWarning, stacklevel=3)
        self._discard()

    def _discard(self) -> None:
        """Delete the stored cache: ``meta.json`` first, so an interruption leaves no valid-looking cache."""
        assert self.directory is not None
        for name in ("meta.json", *_ARRAYS):
            (self.directory / name).unlink(missing_ok=True)

    def _remove_temporaries(self) -> None:
        """Remove what an interrupted allocation or meta write left (creator only, before anyone maps)."""
        assert self.directory is not None
        if self.directory.is_dir():
            for name in ("meta.json", *_ARRAYS):
                for tmp in self.directory.glob(f"{name}.tmp*"):
                    tmp.unlink(missing_ok=True)

    @property
    def problem(self) -> Optional[str]:
        """Why this process refused the stored files (one that may not repair them found them damaged)."""
        return self._problem

    def damage_error(self) -> SelectionError:
        """The error for :attr:`problem`: which directory, what is wrong, and the fix."""
        return SelectionError(
            f"No valid guide-embedding cache in {self.directory}: {self._problem}. Local rank 0 checks and "
            "repairs it before the other ranks open it, so it was damaged since or the ranks do not see the "
            "same files: delete the directory or pass a fresh cache_dir."
        )

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
        if self.values is None and self._problem is not None:
            raise self.damage_error()
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
        # Created under temporary names and renamed whole: a crash never leaves a half-sized array under
        # its real name, nor truncates files another (older) mapping still reads.
        tmp = {name: self.directory / f"{name}.tmp{os.getpid()}" for name in _ARRAYS}
        values = np.lib.format.open_memmap(tmp["values.npy"], mode="w+", dtype=np_dtype, shape=shape)
        filled = np.lib.format.open_memmap(tmp["filled.npy"], mode="w+", dtype=np.bool_,
                                           shape=(self.num_samples, self.num_columns))
        values.flush()
        filled.flush()
        (self.directory / "meta.json").unlink(missing_ok=True)  # (already gone: nothing vouches for old arrays)
        for name in _ARRAYS:
            os.replace(tmp[name], self.directory / name)
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
        rows = embeddings.detach().to("cpu", self.dtype)
        valid = torch.isfinite(rows).all(-1) & (rows != 0).any(-1)  # after the cast: fp16 may overflow
        if not bool(valid.all()):
            if not self._warned_invalid:
                self._warned_invalid = True
                in_dtype = " in float16" if self.dtype == torch.float16 else ""
                warnings.warn(
                    f"Guide cache: {int((~valid).sum())} guide embedding(s) of column {column} all zero or "
                    f"non-finite{in_dtype}; not cached (an all-zero vector has no direction), recomputed when "
                    "needed. (Warned once per cache.)", RuntimeWarning, stacklevel=2)
            idx, rows = idx[valid], rows[valid]
        self.values[idx, column] = rows
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


