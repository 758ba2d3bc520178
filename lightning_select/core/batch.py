"""Batch plumbing: sample indices that travel inside the batch, and subset selection of nested batches.

Every policy in lightning_select keys its state by a stable integer index per sample. The index is
part of the batch itself (never a side channel, which goes stale when Lightning prefetches):

* dict batches carry it under a key (``"index"`` by default, configurable);
* tuple/list batches carry it at a position (the last element by default, configurable).

:class:`IndexedDataset` adds the index to any map-style dataset.

Example::

    >>> import torch
    >>> ds = IndexedDataset([{"x": torch.tensor([1.0])}, {"x": torch.tensor([2.0])}])
    >>> ds[1]["index"]
    1
    >>> batch = {"x": torch.arange(4.0), "text": ["a", "b", "c", "d"], "index": torch.arange(4)}
    >>> sub = select_batch(batch, torch.tensor([3, 1]))
    >>> sub["text"], sub["index"].tolist()
    (['d', 'b'], [3, 1])
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields, is_dataclass, replace
from typing import Any, Union

import torch
from torch import Tensor
from torch.utils.data import Dataset

IndexKey = Union[str, int]


class IndexedDataset(Dataset):
    """Wrap a map-style dataset so that each item carries its own dataset index.

    Dict items get a new key ``index_key``; tuple/list items get the index appended as the last
    element; any other item ``x`` becomes ``(x, index)``.

    Args:
        dataset: any map-style dataset (supports ``len`` and ``__getitem__``).
        index_key: key used for dict items.

    Raises:
        ValueError: if a dict item already holds ``index_key`` (the index would be ambiguous).
    """

    def __init__(self, dataset: Any, index_key: str = "index") -> None:
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise TypeError(
                f"Expected a map-style dataset with __getitem__ and __len__, but got {type(dataset).__name__}."
            )
        self.dataset = dataset
        self.index_key = index_key

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Any:
        item = self.dataset[i]
        if isinstance(item, Mapping):
            if self.index_key in item:
                raise ValueError(
                    f"The dataset item already has a key {self.index_key!r}; pass a different `index_key` "
                    "to IndexedDataset or drop the existing key."
                )
            return {**item, self.index_key: i}
        if isinstance(item, tuple):
            return (*item, i)
        if isinstance(item, list):
            return [*item, i]
        return (item, i)


def batch_size_of(batch: Any) -> int:
    """Number of samples in a (nested) batch: the length of its first tensor or list leaf."""
    if isinstance(batch, Tensor):
        if batch.dim() == 0:
            raise ValueError("Expected a batch with a leading sample dimension, but got a 0-d tensor.")
        return int(batch.shape[0])
    if isinstance(batch, Mapping):
        for value in batch.values():
            try:
                return batch_size_of(value)
            except ValueError:
                continue
    elif is_dataclass(batch) and not isinstance(batch, type):
        for f in fields(batch):
            try:
                return batch_size_of(getattr(batch, f.name))
            except ValueError:
                continue
    elif isinstance(batch, (list, tuple)):
        if batch and all(isinstance(b, str) for b in batch):
            return len(batch)
        for value in batch:
            try:
                return batch_size_of(value)
            except ValueError:
                continue
    raise ValueError(f"Could not find a batched tensor or list of strings in a batch of type {type(batch).__name__}.")


def get_indices(batch: Any, index_key: IndexKey = "index") -> Tensor:
    """Return the ``[B]`` int64 sample-index tensor carried by ``batch``.

    Args:
        batch: dict batch (index under ``index_key``) or tuple/list batch (index at position
            ``index_key`` if it is an int, else the last element).
        index_key: the dict key, or the tuple position.

    Raises:
        KeyError: the batch has no index. The message says how to add one.
        TypeError: the index is not an integer tensor/list.
    """
    if isinstance(batch, Mapping):
        if index_key not in batch:
            raise KeyError(
                f"The batch has no sample-index key {index_key!r} (keys: {sorted(map(str, batch))}). "
                "lightning_select needs a stable per-sample index in every batch: wrap your dataset in "
                "`lightning_select.IndexedDataset`, or set `index_key=` on the policies to the key you use."
            )
        raw = batch[index_key]
    elif isinstance(batch, (tuple, list)):
        position = index_key if isinstance(index_key, int) else -1
        if not batch:
            raise KeyError("The batch is an empty sequence, so it carries no sample indices.")
        raw = batch[position]
    else:
        raise KeyError(
            f"Cannot find sample indices in a batch of type {type(batch).__name__}. Use a dict batch with an "
            f"{index_key!r} key or a tuple/list batch whose last element is the index (see IndexedDataset)."
        )
    if isinstance(raw, (list, tuple)):
        raw = torch.as_tensor(raw)
    if not isinstance(raw, Tensor) or raw.dtype.is_floating_point or raw.dtype == torch.bool or raw.dim() != 1:
        raise TypeError(
            f"Expected the sample index to be a 1-d integer tensor, but got "
            f"{type(raw).__name__} {getattr(raw, 'dtype', '')} with shape {tuple(getattr(raw, 'shape', ()))}. "
            "If your tuple batch keeps the index somewhere other than the last position, pass that position "
            "as `index_key=`."
        )
    return raw.long()


def select_batch(batch: Any, rows: Tensor, batch_size: int | None = None) -> Any:
    """Take rows ``rows`` of every batched leaf of a nested batch.

    Tensors whose leading dimension equals the batch size are indexed; lists/tuples of length ``B``
    whose items are not themselves batches (e.g. lists of strings) are gathered item by item;
    dicts, dataclasses, tuples and lists of leaves are recursed into. Anything else (scalars, config
    strings, tensors with another leading size) is passed through unchanged.

    Args:
        batch: the batch.
        rows: 1-d int64 tensor of row positions (not sample indices), in the order to keep.
        batch_size: ``B``; inferred with :func:`batch_size_of` when omitted.
    """
    size = batch_size_of(batch) if batch_size is None else batch_size
    rows_list: list[int] | None = None

    def take(obj: Any) -> Any:
        nonlocal rows_list
        if isinstance(obj, Tensor):
            if obj.dim() > 0 and obj.shape[0] == size:
                return obj.index_select(0, rows.to(obj.device))
            return obj
        if isinstance(obj, Mapping):
            taken = {k: take(v) for k, v in obj.items()}
            return taken if type(obj) is dict else type(obj)(taken)
        if is_dataclass(obj) and not isinstance(obj, type):
            return replace(obj, **{f.name: take(getattr(obj, f.name)) for f in fields(obj) if f.init})
        if isinstance(obj, (list, tuple)):
            if len(obj) == size and obj and not any(isinstance(v, (Tensor, Mapping, list, tuple)) for v in obj):
                if rows_list is None:
                    rows_list = rows.tolist()
                picked = [obj[r] for r in rows_list]
                return type(obj)(picked) if isinstance(obj, list) else tuple(picked)
            items = [take(v) for v in obj]
            if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
                return type(obj)(*items)
            return type(obj)(items)
        return obj

    return take(batch)

