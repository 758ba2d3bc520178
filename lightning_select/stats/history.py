"""Per-sample loss history: :class:`SampleLossStore` (the table's first user) and the ``LossHistory`` callback.

:class:`SampleLossStore` declares its columns on a :class:`~lightning_select.stats.table.SampleTable`
(no Lightning). The default fields cost 28 bytes per tracked sample:

=============== ======= ======= ===========================================================
field           dtype   reduce  meaning
=============== ======= ======= ===========================================================
``last_loss``   float32 last    most recent loss (NaN until seen)
``ema_loss``    float32 ema     exponential moving average, ``ema ← d·ema + (1−d)·loss``
``count``       int32   count   number of steps in which the sample was trained on
``first_step``  int32   first   ``global_step`` when first seen (−1 until seen)
``last_step``   int32   last    ``global_step`` when last seen
``first_epoch`` int32   first   epoch when first seen
``last_epoch``  int32   last    epoch when last seen
=============== ======= ======= ===========================================================

Optional: a bounded per-epoch trace (``[N, trace_epochs]`` float32 ring buffer of each sample's
last loss in each of the most recent epochs) and summed extra statistics ``stat_{name}`` (e.g.
false-negative counts contributed by other policies through ``StepContext.sample_stats``).

A sample that appears several times in one update (DistributedSampler pads the last batch with
repeats) is counted once for that update, with the mean of its losses: deterministic whatever the
order of the duplicates.

Example::

    >>> import torch
    >>> store = SampleLossStore(num_samples=5, ema_decay=0.5)
    >>> store.update(torch.tensor([1, 3, 3]), torch.tensor([2.0, 1.0, 3.0]), step=0, epoch=0)
    >>> store.update(torch.tensor([1]), torch.tensor([4.0]), step=1, epoch=1)
    >>> store.count.tolist(), store.ema_loss[1].item(), store.last_loss[3].item()
    ([0, 2, 0, 1, 0], 3.0, 2.0)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_select.core import SelectionError, SelectionPolicy, StepContext
from lightning_select.core.engine import override
from lightning_select.core.distributed import train_dataset_size
from lightning_select.core.options import int_option, path_option, real_option
from lightning_select.core.preemption import TrainingPreempted
from lightning_select.io import write_table
from lightning_select.stats.table import SampleTable

_FIELDS = ("last_loss", "ema_loss", "count", "first_step", "last_step", "first_epoch", "last_epoch")
Observation = tuple[Tensor, Tensor, Union[int, Tensor], int, dict[str, Tensor]]


class SampleLossStore:
    """Dense per-sample loss statistics for sample indices ``0 .. num_samples-1``.

    Args:
        num_samples: number of samples N (indices must lie in ``[0, N)``).
        ema_decay: EMA decay ``d`` in ``[0, 1)``; the first observation initialises the EMA.
        trace_epochs: length K of the per-epoch ring buffer (0 disables it).
    """

    def __init__(self, num_samples: int, ema_decay: float = 0.9, trace_epochs: int = 0) -> None:
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"Expected `num_samples` >= 1, but got {num_samples!r}.")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"Expected `ema_decay` in [0, 1), but got {ema_decay}.")
        if trace_epochs < 0:
            raise ValueError(f"Expected `trace_epochs` >= 0, but got {trace_epochs}.")
        self.num_samples, self.ema_decay, self.trace_epochs = int(num_samples), float(ema_decay), int(trace_epochs)
        self.table = SampleTable(self.num_samples)
        nan = float("nan")
        self.table.add_column("last_loss", torch.float32, nan, "last")
        self.table.add_column("ema_loss", torch.float32, nan, "ema", ema_decay=self.ema_decay)
        self.table.add_column("count", torch.int32, 0, "count")
        for name, reduce in (("first_step", "first"), ("last_step", "last"), ("first_epoch", "first"),
                             ("last_epoch", "last")):
            self.table.add_column(name, torch.int32, -1, reduce)  # type: ignore[arg-type]
        if self.trace_epochs:
            self.table.add_trace("loss", self.trace_epochs)

    last_loss = property(lambda self: self.table["last_loss"], doc="[N] float32 most recent loss (NaN if unseen)")
    ema_loss = property(lambda self: self.table["ema_loss"], doc="[N] float32 EMA of the loss (NaN if unseen)")
    count = property(lambda self: self.table["count"], doc="[N] int32 number of updates that saw the sample")
    first_step = property(lambda self: self.table["first_step"], doc="[N] int32 global step of the first update")
    last_step = property(lambda self: self.table["last_step"], doc="[N] int32 global step of the last update")
    first_epoch = property(lambda self: self.table["first_epoch"], doc="[N] int32 epoch of the first update")
    last_epoch = property(lambda self: self.table["last_epoch"], doc="[N] int32 epoch of the last update")

    @property
    def stats(self) -> dict[str, Tensor]:
        """Summed extra statistics by name (``[N]`` float32 views)."""
        return {name[5:]: self.table[name] for name in self.table.columns if name.startswith("stat_")}

    def check_indices(self, indices: Tensor) -> None:
        """Raise ``IndexError`` naming the offending indices if any lies outside ``[0, N)``."""
        self.table.check_indices(indices)

    def update(self, indices: Tensor, losses: Tensor, step: Union[int, Tensor], epoch: int,
               stats: Optional[dict[str, Tensor]] = None) -> None:
        """Record one observation per unique index (duplicates are averaged). Vectorised.

        ``step`` is the global step of the observation, or a per-entry int tensor (see :meth:`update_many`).
        """
        for name in stats or {}:
            self.table.add_column(f"stat_{name}", torch.float32, 0.0, "sum")
        values: dict[str, Any] = {"last_loss": losses, "ema_loss": losses, "first_step": step, "last_step": step,
                                  "first_epoch": epoch, "last_epoch": epoch}
        values.update({f"stat_{k}": v for k, v in (stats or {}).items()})
        self.table.update(indices, values)
        if self.trace_epochs and indices.numel():
            self.table.update_trace("loss", indices, losses, epoch)

    def update_many(self, observations: list[Observation]) -> None:
        """Apply ``(indices, losses, step, epoch, stats)`` observations in order.

        When no index repeats across them and they share one epoch (the usual case within an epoch),
        this is a single vectorised update; otherwise they are applied one by one.
        """
        if not observations:
            return
        epochs = {obs[3] for obs in observations}
        indices = torch.cat([obs[0].detach().cpu().long() for obs in observations])
        if len(observations) > 1 and len(epochs) == 1:
            ordered = indices.sort().values
            if not bool((ordered[1:] == ordered[:-1]).any()):
                steps = torch.cat([torch.full((obs[0].numel(),), int(obs[2]), dtype=torch.int32) for obs in observations])
                losses = torch.cat([obs[1].detach().cpu().float() for obs in observations])
                stats = {k: torch.cat([obs[4][k].detach().cpu().float() for obs in observations])
                         for k in observations[0][4]}
                self.update(indices, losses, steps, epochs.pop(), stats)
                return
        for obs in observations:
            self.update(*obs)

    # --------------------------------------------------------------- views
    def per_sample_tensors(self) -> dict[str, Tensor]:
        return {name: self.table[name] for name in self.table.columns}

    def bytes_per_sample(self, include_optional: bool = False) -> float:
        """Measured memory of the per-sample tensors divided by N (default fields only unless asked)."""
        if include_optional:
            return self.table.bytes_per_sample(include_traces=True)
        return sum(self.table[name].element_size() for name in _FIELDS)

    def epoch_trace(self) -> tuple[Tensor, Tensor]:
        """``(epochs [K'], losses [N, K'])`` of the trace, columns sorted by epoch, unused ones dropped."""
        if not self.trace_epochs:
            return torch.zeros(0, dtype=torch.int32), torch.zeros(self.num_samples, 0)
        return self.table.trace("loss")

    def to_columns(self) -> dict[str, Any]:
        """Column name → 1-d numpy array, one row per sample index (traces as ``loss_epoch_{e}``)."""
        return self.table.to_columns()

    def export(self, path: Union[str, Path]) -> Path:
        """Write the table to ``.parquet`` (pandas + pyarrow), ``.csv`` or ``.npz``; returns the path."""
        return write_table(self.to_columns(), path)

    # --------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        table = self.table.state_dict()
        state: dict[str, Any] = {"num_samples": self.num_samples, "ema_decay": self.ema_decay,
                                 "trace_epochs": self.trace_epochs, "table": table}
        # Readable without the class; the same tensor objects, so torch.save stores each column once.
        state.update({name: table["columns"][name] for name in _FIELDS})
        return state

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "SampleLossStore":
        store = cls(state["num_samples"], state["ema_decay"], state["trace_epochs"])
        store.table = SampleTable.from_state_dict(state["table"])
        return store


class LossHistory(SelectionPolicy):
    """Track every sample's loss over training, consistently across DDP ranks and exactly across resume.

    What it changes: nothing (an observer). Unbiased: yes (it does not touch the gradient). Extra
    cost: O(batch) tensor updates, buffered; under DDP it reads the engine's one per-step gather of
    every rank's trained rows (``ctx.gathered``), so every rank holds the full global history and
    whichever rank saves the checkpoint saves all of it. Memory: 28 bytes per sample (+4 per
    summed statistic, +4 per trace epoch).

    Args:
        num_samples: dataset size N. Inferred from ``len(trainer.train_dataloader.dataset)`` when None.
        ema_decay: EMA decay of the per-sample loss.
        trace_epochs: keep each sample's loss for the last K epochs (0 = off).
        capacity: fixed per-rank row count of the engine's gather. None (default): the ranks agree on
            it every step through the reduction's all-reduce, so any per-rank batch size works. A
            fixed value that a rank exceeds raises the same error on every rank.
        export_path: if set, the table is written there at the end of ``fit`` (rank 0).
        flush_every: observations are buffered and applied to the store in one vectorised update
            every this many steps (and at epoch end, before checkpointing and whenever ``store`` is
            read). 1 applies them immediately.

    Example::

        >>> from lightning_select import LossHistory
        >>> history = LossHistory(num_samples=1797, trace_epochs=10)
        >>> # Trainer(callbacks=[history]).fit(model)  ->  history.store.ema_loss, history.export("h.parquet")
    """

    order = 900
    needs_global_rows = True

    def __init__(self, num_samples: Optional[int] = None, ema_decay: float = 0.9, trace_epochs: int = 0,
                 capacity: Optional[int] = None, export_path: Optional[str] = None, flush_every: int = 32) -> None:
        int_option("LossHistory", "num_samples", num_samples, minimum=1, optional=True)
        ema_decay = real_option("LossHistory", "ema_decay", ema_decay)
        int_option("LossHistory", "trace_epochs", trace_epochs, minimum=0)
        int_option("LossHistory", "flush_every", flush_every, minimum=1)
        int_option("LossHistory", "capacity", capacity, minimum=1, optional=True)
        export_path = path_option("LossHistory", "export_path", export_path)
        SampleLossStore(1, ema_decay, trace_epochs)  # validate the values now, not at the first step
        self.num_samples, self.ema_decay, self.trace_epochs = num_samples, ema_decay, trace_epochs
        self.gather_capacity = capacity
        self.export_path, self.flush_every = export_path, flush_every
        self._pending: list[Observation] = []
        self._store: Optional[SampleLossStore] = None
        self._stat_names: Optional[list[str]] = None

    @property
    def capacity(self) -> Optional[int]:
        return self.gather_capacity

    @property
    def store(self) -> Optional[SampleLossStore]:
        """The up-to-date :class:`SampleLossStore` (pending observations are applied first)."""
        self.flush()
        return self._store

    def flush(self) -> None:
        """Apply buffered observations to the store."""
        if self._pending and self._store is not None:
            pending, self._pending = self._pending, []
            self._store.update_many(pending)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(ema_decay=self.ema_decay, trace_epochs=self.trace_epochs)

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        n = self.num_samples or train_dataset_size(trainer, "LossHistory")
        if self._store is None:
            self._store = SampleLossStore(n, self.ema_decay, self.trace_epochs)
        elif self._store.num_samples != n:
            raise SelectionError(
                f"The restored LossHistory tracks {self._store.num_samples} samples but the training set has {n}; "
                "resume with the same dataset or start a new history."
            )

    @override
    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self.flush()
        store = self._store
        if store is not None:
            seen = store.count > 0
            pl_module.log("history/coverage", seen.float().mean(), on_epoch=True, on_step=False)
            if bool(seen.any()):
                pl_module.log("history/ema_loss_mean", store.ema_loss[seen].mean(), on_epoch=True, on_step=False)

    @override
    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self.flush()
        if self.export_path and trainer.is_global_zero and self._store is not None:
            self._store.export(self.export_path)

    @override
    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        """After a pre-emption the table is exported as far as it got (the checkpoint holds it too)."""
        if isinstance(exception, TrainingPreempted):
            self.on_train_end(trainer, pl_module)

    def observe(self, ctx: StepContext) -> None:
        if self._store is None:
            raise SelectionError("LossHistory was used before on_train_start; it must be a Trainer callback.")
        rows = ctx.gathered
        assert rows is not None
        names = sorted(k for k in rows if k not in ("index", "loss", "weight"))
        if self._stat_names is None:
            self._stat_names = names
        elif names != self._stat_names:
            raise SelectionError(f"Per-sample statistics changed between steps: {self._stat_names} -> {names}.")
        indices = rows["index"]
        if indices.numel() == 0:
            return
        self._store.check_indices(indices)  # fail at the offending step, before anything is buffered
        self._pending.append((indices, rows["loss"].detach(), ctx.trainer.global_step, ctx.trainer.current_epoch,
                              {k: rows[k] for k in names}))
        if len(self._pending) >= self.flush_every:
            self.flush()

    def export(self, path: Union[str, Path]) -> Path:
        """Write the history table (see :meth:`SampleLossStore.export`)."""
        store = self.store
        if store is None:
            raise SelectionError("The history is empty: nothing was trained yet.")
        return store.export(path)

    @override
    def state_dict(self) -> dict[str, Any]:
        store = self.store  # flushes pending observations
        return {} if store is None else {"store": store.state_dict(), "stat_names": self._stat_names}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "store" in state_dict:
            self._pending = []
            self._store = SampleLossStore.from_state_dict(state_dict["store"])
            self._stat_names = state_dict["stat_names"]
