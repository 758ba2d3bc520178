"""One dense per-sample table for every statistic: columns declared like torchmetrics' ``add_state``.

A :class:`SampleTable` holds one row per sample index ``0 .. N-1``. Each column has a name, a dtype,
a default and an update rule; an update touches only the rows it names, with O(batch) vectorised
tensor operations and no Python loop over samples. Columns of one dtype are packed into one
``[N, k]`` tensor, so an update is one gather and one scatter per dtype, whatever the number of
columns. Optional per-epoch *traces* keep each sample's value for the last ``K`` epochs (a ring
buffer).

Update rules (``reduce``):

========= =================================================================================
``last``  the new value
``first`` the new value where the row still holds the default, else unchanged
``sum``   running sum
``ema``   ``d·old + (1−d)·new``; the first value initialises it (default must mark "unset")
``max``   running maximum
``min``   running minimum
``count`` +1 per update that names the row (the value is ignored)
========= =================================================================================

An index that occurs several times in one update is one observation: float values are averaged
(``sum`` sums them, ``max``/``min`` take the extreme), integer values take the maximum (e.g. the
latest step). The result does not depend on the order of duplicates.

Example::

    >>> import torch
    >>> table = SampleTable(num_samples=4)
    >>> table.add_column("loss", torch.float32, float("nan"), "ema", ema_decay=0.5)
    >>> table.add_column("seen", torch.int32, 0, "count")
    >>> table.update(torch.tensor([1, 2, 2]), {"loss": torch.tensor([4.0, 1.0, 3.0])})
    >>> table.update(torch.tensor([1]), {"loss": torch.tensor([2.0])})
    >>> table["loss"].tolist()[1:3], table["seen"].tolist()
    ([3.0, 2.0], [0, 2, 1, 0])
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal, Optional, Union

import torch
from torch import Tensor

Reduce = Literal["last", "first", "sum", "ema", "max", "min", "count"]
_REDUCES = ("last", "first", "sum", "ema", "max", "min", "count")


@dataclass(frozen=True)
class Column:
    """How one per-sample column is stored and updated (see the module docstring)."""

    name: str
    dtype: str  # "float32", "float64", "int32" or "int64"
    default: float
    reduce: Reduce
    ema_decay: float = 0.0


def _cpu(t: Any, dtype: torch.dtype) -> Tensor:
    t = torch.as_tensor(t).detach()
    return t if (t.dtype == dtype and t.device.type == "cpu") else t.to("cpu", dtype)


class SampleTable:
    """Dense per-sample columns keyed by sample index, with exact checkpointing and export.

    Args:
        num_samples: number of samples N; every index must lie in ``[0, N)``.
    """

    def __init__(self, num_samples: int) -> None:
        if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
            raise ValueError(f"Expected `num_samples` to be an int >= 1, but got {num_samples!r}.")
        self.num_samples = num_samples
        self.columns: dict[str, Column] = {}
        self._packed: dict[torch.dtype, Tensor] = {}  # dtype -> [N, k]
        self._position: dict[str, int] = {}  # column -> its position in its packed tensor
        self.traces: dict[str, tuple[Tensor, Tensor]] = {}  # name -> ([N, K] float32, [K] epoch ids)

    # ------------------------------------------------------------------ schema
    def add_column(self, name: str, dtype: torch.dtype = torch.float32, default: float = float("nan"),
                   reduce: Reduce = "last", ema_decay: Optional[float] = None) -> None:
        """Declare a column (idempotent for an identical declaration)."""
        if reduce not in _REDUCES:
            raise ValueError(f"Expected `reduce` in {_REDUCES}, but got {reduce!r}.")
        if dtype not in (torch.float32, torch.float64, torch.int32, torch.int64):
            raise ValueError(f"Expected a float32/float64/int32/int64 column dtype, but got {dtype}.")
        if reduce == "ema" and not (ema_decay is not None and 0.0 <= ema_decay < 1.0):
            raise ValueError(f"Expected `ema_decay` in [0, 1) for an 'ema' column, but got {ema_decay!r}.")
        column = Column(name, str(dtype).replace("torch.", ""), float(default), reduce, float(ema_decay or 0.0))
        if name in self.columns:
            if self.columns[name] != column:
                raise ValueError(f"Column {name!r} is already declared as {self.columns[name]}, not {column}.")
            return
        if name in self.traces:
            raise ValueError(f"{name!r} is already a trace.")
        fresh = torch.full((self.num_samples, 1), column.default, dtype=dtype)
        packed = self._packed.get(dtype)
        self._position[name] = 0 if packed is None else packed.shape[1]
        self._packed[dtype] = fresh if packed is None else torch.cat([packed, fresh], dim=1)
        self.columns[name] = column

    def add_trace(self, name: str, epochs: int) -> None:
        """Declare a ``[N, epochs]`` float32 ring buffer of each sample's value per epoch."""
        if epochs < 1:
            raise ValueError(f"Expected a trace of >= 1 epochs, but got {epochs}.")
        if name in self.columns:
            raise ValueError(f"{name!r} is already a column.")
        if name not in self.traces:
            self.traces[name] = (torch.full((self.num_samples, epochs), float("nan")),
                                 torch.full((epochs,), -1, dtype=torch.int32))

    def __getitem__(self, name: str) -> Tensor:
        """The ``[N]`` column ``name`` (a view: writes go to the table)."""
        column = self.columns[name]
        return self._packed[getattr(torch, column.dtype)][:, self._position[name]]

    def __contains__(self, name: str) -> bool:
        return name in self.columns

    # ------------------------------------------------------------------ updates
    def check_indices(self, indices: Tensor) -> None:
        """Raise ``IndexError`` naming the offending indices if any lies outside ``[0, N)``."""
        if indices.numel() == 0:
            return
        low, high = indices.aminmax()
        if int(low) < 0 or int(high) >= self.num_samples:
            bad = indices[(indices < 0) | (indices >= self.num_samples)].unique()[:10].tolist()
            raise IndexError(
                f"Sample indices {bad} are outside [0, {self.num_samples}). The table was sized for "
                f"{self.num_samples} samples; pass the dataset size as `num_samples=` (or check that the "
                "batch's index column holds dataset positions). No state was changed."
            )

    def update(self, indices: Tensor, values: dict[str, Union[Tensor, float, int]]) -> None:
        """One observation per unique index: ``values[name]`` is a ``[n]`` tensor or a scalar.

        Columns not in ``values`` keep their rows, except ``count`` columns, which count every update.
        """
        unknown = sorted(set(values) - set(self.columns))
        if unknown:
            raise KeyError(f"Unknown column(s) {unknown}; declare them with add_column first.")
        indices = _cpu(indices, torch.long).reshape(-1)
        self.check_indices(indices)
        if indices.numel() == 0:
            return
        ids, order = indices.sort()
        inverse: Optional[Tensor] = None
        if ids.numel() > 1 and bool((ids[1:] == ids[:-1]).any()):
            ids, inverse, mult = torch.unique_consecutive(ids, return_inverse=True, return_counts=True)
        new: dict[str, Tensor] = {}
        for name, value in values.items():
            column = self.columns[name]
            dtype = getattr(torch, column.dtype)
            v = _cpu(value, dtype)
            v = v.expand(indices.numel()) if v.dim() == 0 else v[order]
            if inverse is not None:
                v = self._combine(v, inverse, mult, ids.numel(), column)
            new[name] = v
        for dtype, packed in self._packed.items():
            rows = packed[ids]
            for name, column in self.columns.items():
                if getattr(torch, column.dtype) is not dtype or (name not in new and column.reduce != "count"):
                    continue
                j = self._position[name]
                rows[:, j] = self._apply(column, rows[:, j], new.get(name))
            packed[ids] = rows

    @staticmethod
    def _combine(v: Tensor, inverse: Tensor, mult: Tensor, n: int, column: Column) -> Tensor:
        if column.reduce in ("max", "min") or not v.dtype.is_floating_point:
            op = "amin" if column.reduce == "min" else "amax"
            return torch.zeros(n, dtype=v.dtype).scatter_reduce_(0, inverse, v, op, include_self=False)
        total = torch.zeros(n, dtype=v.dtype).index_add_(0, inverse, v)
        return total if column.reduce == "sum" else total / mult.to(v.dtype)

    @staticmethod
    def _apply(column: Column, old: Tensor, new: Optional[Tensor]) -> Tensor:
        if column.reduce == "count":
            return old + 1
        assert new is not None
        unset = old.isnan() if math.isnan(column.default) else old == column.default
        if column.reduce == "last":
            return new
        if column.reduce == "first":
            return torch.where(unset, new, old)
        if column.reduce == "sum":  # a NaN default means "unset": the first value starts the sum
            return torch.where(unset, new, old + new)
        if column.reduce == "ema":
            return torch.where(unset, new, column.ema_decay * old + (1 - column.ema_decay) * new)
        if column.reduce == "max":
            return torch.where(unset, new, torch.maximum(old, new))
        return torch.where(unset, new, torch.minimum(old, new))

    def update_trace(self, name: str, indices: Tensor, values: Tensor, epoch: int) -> None:
        """Write ``values`` into epoch ``epoch``'s slot of trace ``name`` (a stale slot is cleared first).

        Duplicate indices are averaged like ``last`` columns."""
        trace, epoch_ids = self.traces[name]
        indices = _cpu(indices, torch.long).reshape(-1)
        self.check_indices(indices)
        values = _cpu(values, torch.float32).reshape(-1)
        ids, inverse, mult = torch.unique(indices, return_inverse=True, return_counts=True)
        mean = torch.zeros(ids.numel()).index_add_(0, inverse, values) / mult
        slot = epoch % trace.shape[1]
        if int(epoch_ids[slot]) != epoch:
            trace[:, slot] = float("nan")
            epoch_ids[slot] = epoch
        trace[ids, slot] = mean

    # ------------------------------------------------------------------ views
    def trace(self, name: str) -> tuple[Tensor, Tensor]:
        """``(epochs [K'], values [N, K'])`` of trace ``name``, sorted by epoch, unused slots dropped."""
        values, epoch_ids = self.traces[name]
        valid = epoch_ids >= 0
        epochs, order = epoch_ids[valid].sort()
        return epochs, values[:, valid][:, order]

    def bytes_per_sample(self, include_traces: bool = True) -> float:
        """Measured bytes of every per-sample tensor, divided by N."""
        tensors = list(self._packed.values())
        if include_traces:
            tensors += [t for t, _ in self.traces.values()]
        return sum(t.element_size() * t.numel() for t in tensors) / self.num_samples

    def to_columns(self) -> dict[str, Any]:
        """Column name → 1-d numpy array (one row per sample index), traces as ``{name}_epoch_{e}``."""
        out: dict[str, Any] = {"index": torch.arange(self.num_samples).numpy()}
        out.update({name: self[name].numpy() for name in self.columns})
        for name in self.traces:
            epochs, values = self.trace(name)
            for k, e in enumerate(epochs.tolist()):
                out[f"{name}_epoch_{e}"] = values[:, k].numpy()
        return out

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Schema plus a clone of every column and trace: ``load_state_dict`` restores it bit for bit."""
        return {
            "num_samples": self.num_samples,
            "schema": [asdict(c) for c in self.columns.values()],
            "columns": {name: self[name].clone() for name in self.columns},
            "traces": {name: (t.clone(), e.clone()) for name, (t, e) in self.traces.items()},
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "SampleTable":
        table = cls(int(state["num_samples"]))
        for spec in state["schema"]:
            table.add_column(spec["name"], getattr(torch, spec["dtype"]), spec["default"], spec["reduce"],
                             spec["ema_decay"] if spec["reduce"] == "ema" else None)
            table[spec["name"]].copy_(state["columns"][spec["name"]])
        for name, (values, epoch_ids) in state["traces"].items():
            table.traces[name] = (values.clone(), epoch_ids.clone())
        return table
