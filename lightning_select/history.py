"""Per-sample loss history: a dense store keyed by sample index, and the ``LossHistory`` callback.

:class:`SampleLossStore` is the tensor-level core (no Lightning): O(batch) vectorised updates, no
Python per-sample loops. Default fields cost 28 bytes per tracked sample:

=============== ======= ===========================================================
field           dtype   meaning
=============== ======= ===========================================================
``last_loss``   float32 most recent loss (NaN until seen)
``ema_loss``    float32 exponential moving average, ``ema ← d·ema + (1−d)·loss``
``count``       int32   number of steps in which the sample was trained on
``first_step``  int32   ``global_step`` when first seen (−1 until seen)
``last_step``   int32   ``global_step`` when last seen
``first_epoch`` int32   epoch when first seen
``last_epoch``  int32   epoch when last seen
=============== ======= ===========================================================

Optional: a bounded per-epoch trace (``[N, trace_epochs]`` float32 ring buffer of each sample's
last loss in each of the most recent epochs) and extra summed statistics (e.g. false-negative
counts contributed by other policies through ``StepContext.sample_stats``).

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

from lightning_select.engine import SelectionError, SelectionPolicy, StepContext, override

# Packed storage: one float32 [N, 2] and one int32 [N, 5] table, so an update is two gathers and two
# scatters rather than seven of each. The public fields are column views.
_FLOAT_FIELDS = ("last_loss", "ema_loss")
_INT_FIELDS = ("count", "first_step", "last_step", "first_epoch", "last_epoch")
_FIELDS = _FLOAT_FIELDS + _INT_FIELDS


def write_table(columns: dict[str, Any], path: Union[str, Path]) -> Path:
    """Write equal-length 1-d columns to ``.parquet`` (pandas + pyarrow), ``.csv`` or ``.npz``."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".npz", ".csv", ".parquet"):
        raise ValueError(f"Expected an export path ending in .parquet, .csv or .npz, but got {path.name!r}.")
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".npz":
        import numpy as np

        np.savez(path, **columns)
        return path
    import pandas as pd

    frame = pd.DataFrame(columns)
    frame.to_csv(path, index=False) if suffix == ".csv" else frame.to_parquet(path, index=False)
    return path


def _as_cpu(t: Tensor, dtype: torch.dtype) -> Tensor:
    t = t.detach()
    return t if (t.dtype == dtype and t.device.type == "cpu") else t.to("cpu", dtype)


class SampleLossStore:
    """Dense per-sample loss statistics for sample indices ``0 .. num_samples-1``.

    Args:
        num_samples: number of samples N (indices must lie in ``[0, N)``).
        ema_decay: EMA decay ``d`` in ``[0, 1)``; the first observation initialises the EMA.
        trace_epochs: length K of the per-epoch ring buffer (0 disables it).
    """

    def __init__(self, num_samples: int, ema_decay: float = 0.9, trace_epochs: int = 0) -> None:
        if num_samples < 1:
            raise ValueError(f"Expected `num_samples` >= 1, but got {num_samples}.")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"Expected `ema_decay` in [0, 1), but got {ema_decay}.")
        if trace_epochs < 0:
            raise ValueError(f"Expected `trace_epochs` >= 0, but got {trace_epochs}.")
        self.num_samples = int(num_samples)
        self.ema_decay = float(ema_decay)
        self.trace_epochs = int(trace_epochs)
        self.float_table = torch.full((num_samples, len(_FLOAT_FIELDS)), float("nan"))
        self.int_table = torch.full((num_samples, len(_INT_FIELDS)), -1, dtype=torch.int32)
        self.int_table[:, 0] = 0
        self.trace = torch.full((num_samples, trace_epochs), float("nan"))
        self.trace_epoch_ids = torch.full((trace_epochs,), -1, dtype=torch.int32)
        self.stats: dict[str, Tensor] = {}

    last_loss = property(lambda self: self.float_table[:, 0], doc="[N] float32 most recent loss (NaN if unseen)")
    ema_loss = property(lambda self: self.float_table[:, 1], doc="[N] float32 EMA of the loss (NaN if unseen)")
    count = property(lambda self: self.int_table[:, 0], doc="[N] int32 number of updates that saw the sample")
    first_step = property(lambda self: self.int_table[:, 1], doc="[N] int32 global step of the first update")
    last_step = property(lambda self: self.int_table[:, 2], doc="[N] int32 global step of the last update")
    first_epoch = property(lambda self: self.int_table[:, 3], doc="[N] int32 epoch of the first update")
    last_epoch = property(lambda self: self.int_table[:, 4], doc="[N] int32 epoch of the last update")

    # --------------------------------------------------------------- updates
    def check_indices(self, indices: Tensor) -> None:
        """Raise ``IndexError`` naming the offending indices if any lies outside ``[0, N)``."""
        if indices.numel() == 0:
            return
        low, high = indices.aminmax()
        if int(low) < 0 or int(high) >= self.num_samples:
            bad = indices[(indices < 0) | (indices >= self.num_samples)].unique()[:10].tolist()
            raise IndexError(
                f"Sample indices {bad} are outside [0, {self.num_samples}). The history was sized for "
                f"{self.num_samples} samples; pass the dataset size as `num_samples=` (or check that the "
                "batch's index column holds dataset positions). No state was changed."
            )

    def update(
        self,
        indices: Tensor,
        losses: Tensor,
        step: Union[int, Tensor],
        epoch: int,
        stats: Optional[dict[str, Tensor]] = None,
    ) -> None:
        """Record one observation per unique index (duplicates are averaged). O(n log n), vectorised.

        ``step`` is the global step of the observation, or a per-entry int tensor (see :meth:`update_many`).
        """
        indices = _as_cpu(indices, torch.long)
        losses = _as_cpu(losses, torch.float32)
        self.check_indices(indices)
        if indices.numel() == 0:
            return
        ids, order = indices.sort()
        losses = losses[order]
        if isinstance(step, Tensor):
            step = _as_cpu(step, torch.int32)[order]
        stats = {k: _as_cpu(v, torch.float32)[order] for k, v in (stats or {}).items()}
        if ids.numel() > 1 and bool((ids[1:] == ids[:-1]).any()):  # duplicates: one averaged observation
            ids, inverse, mult = torch.unique_consecutive(ids, return_inverse=True, return_counts=True)
            losses = torch.zeros(ids.numel()).index_add_(0, inverse, losses) / mult
            if isinstance(step, Tensor):  # one step per sample: keep the latest
                step = torch.zeros(ids.numel(), dtype=torch.int32).scatter_reduce_(0, inverse, step, "amax")
            stats = {k: torch.zeros(ids.numel()).index_add_(0, inverse, v) for k, v in stats.items()}
        ints = self.int_table[ids]
        floats = self.float_table[ids]
        unseen = ints[:, 0] == 0
        ints[:, 0] += 1
        ints[:, 1] = torch.where(unseen, step, ints[:, 1])
        ints[:, 3] = torch.where(unseen, epoch, ints[:, 3])
        ints[:, 2] = step
        ints[:, 4] = epoch
        floats[:, 1] = torch.where(unseen, losses, self.ema_decay * floats[:, 1] + (1 - self.ema_decay) * losses)
        floats[:, 0] = losses
        self.int_table[ids] = ints
        self.float_table[ids] = floats
        if self.trace_epochs:
            col = epoch % self.trace_epochs
            if int(self.trace_epoch_ids[col]) != epoch:
                self.trace[:, col] = float("nan")
                self.trace_epoch_ids[col] = epoch
            self.trace[ids, col] = losses
        for name, values in stats.items():
            if name not in self.stats:
                self.stats[name] = torch.zeros(self.num_samples)
            self.stats[name].index_add_(0, ids, values)

    def update_many(self, observations: list[tuple[Tensor, Tensor, int, int, dict[str, Tensor]]]) -> None:
        """Apply ``(indices, losses, step, epoch, stats)`` observations in order.

        When no index repeats across them and they share one epoch (the usual case within an epoch),
        this is a single vectorised update; otherwise they are applied one by one.
        """
        if not observations:
            return
        epochs = {obs[3] for obs in observations}
        indices = torch.cat([_as_cpu(obs[0], torch.long) for obs in observations])
        if len(observations) > 1 and len(epochs) == 1:
            ordered = indices.sort().values
            if not bool((ordered[1:] == ordered[:-1]).any()):
                steps = torch.cat([torch.full((obs[0].numel(),), obs[2], dtype=torch.int32) for obs in observations])
                losses = torch.cat([_as_cpu(obs[1], torch.float32) for obs in observations])
                stats = {k: torch.cat([_as_cpu(obs[4][k], torch.float32) for obs in observations]) for k in observations[0][4]}
                self.update(indices, losses, steps, epochs.pop(), stats)
                return
        for obs in observations:
            self.update(*obs)

    # --------------------------------------------------------------- views
    def per_sample_tensors(self) -> dict[str, Tensor]:
        out = {name: getattr(self, name) for name in _FIELDS}
        out.update({f"stat_{k}": v for k, v in self.stats.items()})
        return out

    def bytes_per_sample(self, include_optional: bool = False) -> float:
        """Measured memory of the per-sample tensors divided by N (default fields only unless asked)."""
        tensors = [self.float_table, self.int_table]
        if include_optional:
            tensors += [self.trace, *self.stats.values()]
        return sum(t.element_size() * t.numel() for t in tensors) / self.num_samples

    def epoch_trace(self) -> tuple[Tensor, Tensor]:
        """``(epochs [K'], losses [N, K'])`` of the trace, columns sorted by epoch, unused ones dropped."""
        valid = self.trace_epoch_ids >= 0
        epochs, order = self.trace_epoch_ids[valid].sort()
        return epochs, self.trace[:, valid][:, order]

    def to_columns(self) -> dict[str, Any]:
        """Column name → 1-d numpy array, one row per sample index."""
        cols: dict[str, Any] = {"index": torch.arange(self.num_samples).numpy()}
        cols.update({k: v.numpy() for k, v in self.per_sample_tensors().items()})
        epochs, trace = self.epoch_trace()
        for k, e in enumerate(epochs.tolist()):
            cols[f"loss_epoch_{e}"] = trace[:, k].numpy()
        return cols

    def export(self, path: Union[str, Path]) -> Path:
        """Write the table to ``.parquet`` (pandas + pyarrow), ``.csv`` or ``.npz``; returns the path."""
        return write_table(self.to_columns(), path)

    # --------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "num_samples": self.num_samples,
            "ema_decay": self.ema_decay,
            "trace_epochs": self.trace_epochs,
            "trace": self.trace.clone(),
            "trace_epoch_ids": self.trace_epoch_ids.clone(),
            "stats": {k: v.clone() for k, v in self.stats.items()},
        }
        state.update({name: getattr(self, name).clone() for name in _FIELDS})  # named columns: readable anywhere
        return state

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "SampleLossStore":
        store = cls(state["num_samples"], state["ema_decay"], state["trace_epochs"])
        for name in _FIELDS:
            getattr(store, name).copy_(state[name])  # column views write through to the tables
        store.trace.copy_(state["trace"])
        store.trace_epoch_ids.copy_(state["trace_epoch_ids"])
        store.stats = {k: v.clone() for k, v in state["stats"].items()}
        return store


class LossHistory(SelectionPolicy):
    """Track every sample's loss over training, consistently across DDP ranks and exactly across resume.

    What it changes: nothing (an observer). Extra cost: one ``all_gather`` of a ``[capacity, 2+S]``
    float64 tensor per step under DDP (equal shapes on every rank: rows are padded to the batch
    capacity), plus O(batch) tensor updates. Every rank holds the full global history, so whichever
    rank saves the checkpoint saves all of it.

    Args:
        num_samples: dataset size N. Inferred from ``len(trainer.train_dataloader.dataset)`` when None.
        ema_decay: EMA decay of the per-sample loss.
        trace_epochs: keep each sample's loss for the last K epochs (0 = off).
        capacity: per-rank rows gathered per step; defaults to the first batch's size. A later, larger
            batch raises (use it with variable-size batch samplers).
        export_path: if set, the table is written there at the end of ``fit`` (rank 0).
        flush_every: observations are buffered and applied to the store in one vectorised update
            every this many steps (and at epoch end, before checkpointing and whenever ``store`` is
            read), which keeps the per-step cost to a few tensor ops. 1 applies them immediately.

    Example::

        >>> from lightning_select import LossHistory
        >>> history = LossHistory(num_samples=1797, trace_epochs=10)
        >>> # Trainer(callbacks=[history]).fit(model)  ->  history.store.ema_loss, history.export("h.parquet")
    """

    order = 900

    def __init__(
        self,
        num_samples: Optional[int] = None,
        ema_decay: float = 0.9,
        trace_epochs: int = 0,
        capacity: Optional[int] = None,
        export_path: Optional[str] = None,
        flush_every: int = 32,
    ) -> None:
        SampleLossStore(1, ema_decay, trace_epochs)  # validate arguments now, not at the first step
        if flush_every < 1:
            raise ValueError(f"Expected `flush_every` >= 1, but got {flush_every}.")
        self.flush_every = flush_every
        self._pending: list[tuple[Tensor, Tensor, int, int, dict[str, Tensor]]] = []
        self.num_samples = num_samples
        self.ema_decay = ema_decay
        self.trace_epochs = trace_epochs
        self.capacity = capacity
        self.export_path = export_path
        self._store: Optional[SampleLossStore] = None
        self._stat_names: Optional[list[str]] = None

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

    def _record(self, indices: Tensor, losses: Tensor, step: int, epoch: int, stats: dict[str, Tensor]) -> None:
        assert self._store is not None
        self._store.check_indices(indices)  # fail at the offending step, before anything is buffered
        self._pending.append((indices, losses.detach(), step, epoch, stats))
        if len(self._pending) >= self.flush_every:
            self.flush()

    @property
    def state_key(self) -> str:
        return self._generate_state_key(ema_decay=self.ema_decay, trace_epochs=self.trace_epochs)

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        n = self.num_samples
        if n is None:
            dataset = getattr(trainer.train_dataloader, "dataset", None)
            try:
                n = len(dataset)  # type: ignore[arg-type]
            except TypeError as err:
                raise SelectionError(
                    "LossHistory could not infer the number of samples from the training dataloader; "
                    "pass `num_samples=` explicitly."
                ) from err
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

    def observe(self, ctx: StepContext) -> None:
        if self._store is None:
            raise SelectionError("LossHistory was used before on_train_start; it must be a Trainer callback.")
        assert ctx.losses is not None
        n = ctx.rows.numel()
        names = sorted(ctx.sample_stats)
        if self._stat_names is None:
            self._stat_names = names
        elif names != self._stat_names:
            raise SelectionError(f"Per-sample statistics changed between steps: {self._stat_names} -> {names}.")
        trainer = ctx.trainer
        if ctx.world_size == 1:
            if ctx.has_samples:
                stats = {k: ctx.sample_stats[k] for k in names}
                self._record(ctx.kept_indices, ctx.losses, trainer.global_step, trainer.current_epoch, stats)
            return
        # One collective per step with equal shapes on every rank: rows padded to `capacity`, index −1 = empty.
        if self.capacity is None:
            self.capacity = ctx.batch_size
        if n > self.capacity:
            raise SelectionError(
                f"LossHistory gathers at most {self.capacity} rows per rank but this batch kept {n}; "
                "set LossHistory(capacity=...) to the largest per-rank batch size."
            )
        cols = [ctx.kept_indices.double(), ctx.losses.detach().double()]
        cols += [ctx.sample_stats[k].detach().double() for k in names]
        local = torch.stack(cols, dim=1)
        if not ctx.has_samples:
            local[:, 0] = -1
        padded = local.new_full((self.capacity, local.shape[1]), -1.0)
        padded[:n] = local
        gathered = ctx.all_gather(padded).reshape(-1, local.shape[1])
        gathered = gathered[gathered[:, 0] >= 0]
        stats = {k: gathered[:, 2 + j] for j, k in enumerate(names)}
        self._record(gathered[:, 0].long(), gathered[:, 1], trainer.global_step, trainer.current_epoch, stats)

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
