"""Batch plumbing: sample indices that travel inside the batch, and subset selection of nested batches.

Every policy in lightning_select keys its state by a stable integer index per sample. The index is
part of the batch itself (never a side channel, which goes stale when Lightning prefetches), and it is
never guessed: a label column must not be mistaken for it.

* dict batches carry it under a key (``"index"`` by default, configurable);
* tuple/list batches carry it as the one element that is a :class:`SampleIndex` (an int64 tensor
  subclass that marks sample indices), or at an integer position the user names explicitly
  (``SelectionEngine(index_key=2)``). An unmarked element is never read as indices.

:class:`IndexedDataset` adds the index to any map-style dataset. Indices that cannot be indices
(missing, float/bool dtype, negative, repeated within a batch) raise :class:`SampleIndexError`.

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
from typing import Any, Optional, Union

import torch
from torch import Tensor
from torch.utils.data import Dataset

from lightning_select.core.context import SelectionError

IndexKey = Union[str, int]

_HOW_TO_ADD = (
    "Wrap the dataset in `lightning_select.IndexedDataset` (dict items get an 'index' key, tuple/list items a "
    "trailing `SampleIndex`), or tell the engine where the indices are with `SelectionEngine(index_key=...)`: "
    "a dict key, or the position of the tuple element that holds dataset positions."
)


class SampleIndexError(SelectionError, KeyError):
    """A batch's sample indices are missing or cannot be sample indices.

    A :class:`~lightning_select.core.context.SelectionError`, and a ``KeyError`` (what a missing
    index has always raised). The message names the problem and the fix.
    """

    def __str__(self) -> str:  # KeyError would print the message quoted
        return BaseException.__str__(self)


class SampleIndex(Tensor):
    """An int64 tensor marked as sample indices, so that it cannot be confused with data.

    :class:`IndexedDataset` appends ``SampleIndex(i)`` to tuple/list items; the engine takes the one
    element of a tuple/list batch that is a ``SampleIndex``, and never guesses among unmarked ones.
    Return one from your own dataset (``return x, y, SampleIndex(i)``) to mark indices yourself.

    The mark survives what happens to a batch on its way to ``training_step``: ``default_collate``
    (``torch.stack``, also into the shared memory of ``DataLoader`` workers), pickling between
    processes, ``pin_memory``, ``.to(device)`` (Lightning's ``batch_to_device``) and row selection.
    It is kept by every operation whose first operand is a ``SampleIndex`` (or a list of them) and
    whose result is an integer tensor; anything else (``x[index]``, ``index.float()``, ``index == 3``)
    is a plain tensor, so the subclass never leaks into the model's computation.

    Example::

        >>> from torch.utils.data import default_collate
        >>> batch = default_collate([(torch.tensor(0.5), SampleIndex(7)), (torch.tensor(1.5), SampleIndex(3))])
        >>> type(batch[1]).__name__, batch[1].tolist(), type(batch[0] * 2).__name__
        ('SampleIndex', [7, 3], 'Tensor')
    """

    def __new__(cls, data: Any) -> "SampleIndex":
        if type(data) is int:  # the per-item fast path of IndexedDataset
            return torch.tensor(data, dtype=torch.long).as_subclass(cls)
        raw = torch.as_tensor(data)
        if not _is_integer(raw):
            raise TypeError(f"Expected integer sample indices, but got {raw.dtype}.")
        return raw.to(torch.long).as_subclass(cls)

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **(kwargs or {}))
        if (isinstance(out, Tensor) and not isinstance(out, cls) and func is not Tensor.as_subclass
                and _is_integer(out) and _first_operand_marked(args)):
            return out.as_subclass(cls)
        return out

    def __deepcopy__(self, memo: dict) -> "SampleIndex":
        out = self.as_subclass(Tensor).clone().as_subclass(SampleIndex)
        memo[id(self)] = out
        return out


def _is_integer(t: Tensor) -> bool:
    return not (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool)


def _first_operand_marked(args: tuple) -> bool:
    first = args[0] if args else None
    if isinstance(first, (list, tuple)):  # torch.stack / torch.cat
        return bool(first) and all(isinstance(t, SampleIndex) for t in first)
    return isinstance(first, SampleIndex)


class IndexedDataset(Dataset):
    """Wrap a map-style dataset so that each item carries its own dataset index.

    Dict items get a new key ``index_key`` (a plain int); tuple/list items get a :class:`SampleIndex`
    appended as the last element, which the engine recognises by its type (so ``x, y, index = batch``
    keeps working, and the labels ``y`` can never be read as indices); any other item ``x`` becomes
    ``(x, SampleIndex(index))``.

    Args:
        dataset: any map-style dataset (supports ``len`` and ``__getitem__``).
        index_key: key used for dict items.

    Raises:
        ValueError: if a dict item already holds ``index_key``, or a tuple/list item already holds a
            :class:`SampleIndex` (the index would be ambiguous).
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
        if isinstance(item, (tuple, list)):
            if any(isinstance(v, SampleIndex) for v in item):
                raise ValueError("The dataset item already carries a SampleIndex; wrap the dataset in IndexedDataset "
                                 "once.")
            return (*item, SampleIndex(i)) if isinstance(item, tuple) else [*item, SampleIndex(i)]
        return (item, SampleIndex(i))


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
    """Return the ``[B]`` int64 sample-index tensor carried by ``batch`` (a plain tensor).

    Indices are never guessed. They are found:

    * in a dict batch, under the key ``index_key``;
    * in a tuple/list batch, at position ``index_key`` when it is an int (the user's explicit
      statement; negative positions count from the end), else as the one element that is a
      :class:`SampleIndex` (what :class:`IndexedDataset` appends). An unmarked last element, such
      as the labels of ``TensorDataset(x, y)``, is never read as indices.

    Args:
        batch: the batch.
        index_key: the dict key, or the tuple/list position.

    Raises:
        SampleIndexError: (a ``SelectionError`` and a ``KeyError``) the batch carries no index, or
            one that is not a 1-d integer tensor (e.g. a float or bool label column). The message
            says how to add indices.
    """
    if isinstance(batch, Mapping):
        if index_key not in batch:
            raise SampleIndexError(
                f"The batch has no sample-index key {index_key!r} (keys: {sorted(map(str, batch))}). "
                f"lightning_select needs a stable per-sample index in every batch. {_HOW_TO_ADD}"
            )
        raw, where = batch[index_key], f"under key {index_key!r}"
    elif isinstance(batch, (tuple, list)):
        kind = type(batch).__name__
        marked = [i for i, v in enumerate(batch) if isinstance(v, SampleIndex)]
        if isinstance(index_key, int) and not isinstance(index_key, bool):
            if not -len(batch) <= index_key < len(batch):
                raise SampleIndexError(
                    f"index_key={index_key} names a position outside the {kind} batch of {len(batch)} elements. "
                    f"{_HOW_TO_ADD}"
                )
            if marked and marked != [index_key % len(batch)]:
                raise SampleIndexError(
                    f"index_key={index_key} names element {index_key % len(batch)} of the {kind} batch, but the "
                    f"SampleIndex (from IndexedDataset) is element {marked}. Leave index_key unset (or point it at "
                    "the SampleIndex) so that data is never read as indices."
                )
            raw, where = batch[index_key], f"at position {index_key} of the {kind} batch"
        elif len(marked) == 1:
            raw, where = batch[marked[0]], f"at position {marked[0]} of the {kind} batch"
        else:
            found = ("none of its elements is a SampleIndex" if not marked
                     else f"elements {marked} are all SampleIndex, so the index is ambiguous")
            raise SampleIndexError(
                f"The {kind} batch of {len(batch)} elements carries no marked sample indices ({found}). "
                "lightning_select never takes an unmarked element (such as the last one) as indices, because a "
                f"label column would silently be read as sample ids. {_HOW_TO_ADD}"
            )
    else:
        raise SampleIndexError(
            f"Cannot find sample indices in a batch of type {type(batch).__name__}: use a dict batch with an "
            f"{index_key!r} key, or a tuple/list batch with a SampleIndex element. {_HOW_TO_ADD}"
        )
    if isinstance(raw, SampleIndex):
        raw = raw.as_subclass(Tensor)  # the engine works on plain tensors (and skips __torch_function__)
    elif isinstance(raw, (list, tuple)):
        try:
            raw = torch.as_tensor(raw)
        except (TypeError, ValueError, RuntimeError):
            pass
    if not isinstance(raw, Tensor) or not _is_integer(raw) or raw.dim() != 1:
        what = (f"a {raw.dtype} tensor of shape {tuple(raw.shape)}" if isinstance(raw, Tensor)
                else f"a {type(raw).__name__}")
        hint = (" A float or bool column is a label or a feature, not dataset positions."
                if isinstance(raw, Tensor) and not _is_integer(raw) else "")
        raise SampleIndexError(
            f"The sample index {where} is {what}, but sample indices must be a 1-d integer tensor of dataset "
            f"positions, one per sample.{hint} {_HOW_TO_ADD}"
        )
    return raw.long()


INDEX_REFUSALS = {  # kind -> what is wrong and how to fix it (the same text on every rank)
    "negative": (
        "negative sample indices, but sample indices are dataset positions in [0, N): check that the batch's index "
        "holds dataset positions (a label or a feature column looks like this)"
    ),
    "repeated": (
        "a sample index that occurs more than once in one batch, so that sample would count several times in one "
        "step. If your sampler draws with replacement (e.g. WeightedRandomSampler(replacement=True)), pass "
        "SelectionEngine(allow_repeated_indices=True); otherwise check that the batch's index holds dataset "
        "positions (a label column looks like this)"
    ),
}


def index_value_problem(indices: Tensor, allow_repeated: bool = False) -> Optional[tuple[str, list[int]]]:
    """Why the ``[B]`` integer ``indices`` cannot be one batch's sample indices, or None if they can.

    Refused: negative values (dataset positions start at 0) and, unless ``allow_repeated``, a value
    that occurs twice in the batch (samplers without replacement, ``DistributedSampler`` included,
    never repeat a sample within one batch; a label column does). The upper bound N is not known
    here: :class:`~lightning_select.stats.table.SampleTable` checks ``[0, N)``.

    Returns:
        None, or ``(kind, values)``: a key of :data:`INDEX_REFUSALS` and up to 10 offending values.

    Cost: one ``torch.unique`` of the ``[B]`` tensor where it lies and one scalar read, or one ``min``
    when repeats are allowed. Measured: 8-26 µs for B = 64-1024 on one CPU thread; on an H100 about
    60 µs up to B = 1024 and 130 µs at B = 8192 (20 µs with repeats allowed), a wait for the device
    included.

    Example::

        >>> index_value_problem(torch.tensor([3, 0, 2])) is None
        True
        >>> index_value_problem(torch.tensor([1, 0, 1])), index_value_problem(torch.tensor([1, 0, 1]), True)
        (('repeated', [1]), None)
    """
    if indices.numel() == 0:
        return None
    if allow_repeated:
        if int(indices.min()) < 0:
            return "negative", indices[indices < 0].unique()[:10].tolist()
        return None
    distinct = torch.unique(indices)  # sorted
    if int(distinct[0]) < 0:
        return "negative", distinct[distinct < 0][:10].tolist()
    if distinct.numel() < indices.numel():
        ordered = indices.sort().values
        return "repeated", ordered[1:][ordered[1:] == ordered[:-1]].unique()[:10].tolist()
    return None


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

