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

_FIELDS = {
    "last_loss": (torch.float32, float("nan")),
    "ema_loss": (torch.float32, float("nan")),
    "count": (torch.int32, 0),
    "first_step": (torch.int32, -1),
    "last_step": (torch.int32, -1),
    "first_epoch": (torch.int32, -1),
    "last_epoch": (torch.int32, -1),
}


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
        for name, (dtype, fill) in _FIELDS.items():
            setattr(self, name, torch.full((num_samples,), fill, dtype=dtype))
        self.trace = torch.full((num_samples, trace_epochs), float("nan"))
        self.trace_epoch_ids = torch.full((trace_epochs,), -1, dtype=torch.int32)
        self.stats: dict[str, Tensor] = {}

    # --------------------------------------------------------------- updates
    def check_indices(self, indices: Tensor) -> None:
        """Raise ``IndexError`` naming the offending indices if any lies outside ``[0, N)``."""
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.num_samples):
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
        step: int,
        epoch: int,
        stats: Optional[dict[str, Tensor]] = None,
    ) -> None:
        """Record one observation per unique index (duplicates are averaged). O(n log n), vectorised."""
        indices = indices.detach().long().cpu()
        losses = losses.detach().float().cpu()
        self.check_indices(indices)
        if indices.numel() == 0:
            return
        uniq, inverse = torch.unique(indices, return_inverse=True)
        if uniq.numel() != indices.numel():
            mult = torch.zeros(uniq.numel()).index_add_(0, inverse, torch.ones_like(losses))
            losses = torch.zeros(uniq.numel()).index_add_(0, inverse, losses) / mult
            stats = {k: torch.zeros(uniq.numel()).index_add_(0, inverse, v.detach().float().cpu()) for k, v in (stats or {}).items()}
        else:
            order = torch.empty_like(inverse).scatter_(0, inverse, torch.arange(inverse.numel()))
            losses = losses[order]
            stats = {k: v.detach().float().cpu()[order] for k, v in (stats or {}).items()}
        ids = uniq
        unseen = self.count[ids] == 0
        self.count[ids] += 1
        first_ids = ids[unseen]
        self.first_step[first_ids] = step
        self.first_epoch[first_ids] = epoch
        prev = self.ema_loss[ids]
        self.ema_loss[ids] = torch.where(unseen, losses, self.ema_decay * prev + (1 - self.ema_decay) * losses)
        self.last_loss[ids] = losses
        self.last_step[ids] = step
        self.last_epoch[ids] = epoch
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

    # --------------------------------------------------------------- views
    def per_sample_tensors(self) -> dict[str, Tensor]:
        out = {name: getattr(self, name) for name in _FIELDS}
        out.update({f"stat_{k}": v for k, v in self.stats.items()})
        return out

    def bytes_per_sample(self, include_optional: bool = False) -> float:
        """Measured memory of the per-sample tensors divided by N (default fields only unless asked)."""
        tensors = [getattr(self, name) for name in _FIELDS]
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
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        cols = self.to_columns()
        suffix = path.suffix.lower()
        if suffix == ".npz":
            import numpy as np

            np.savez(path, **cols)
        elif suffix in (".csv", ".parquet"):
            import pandas as pd

            frame = pd.DataFrame(cols)
            if suffix == ".csv":
                frame.to_csv(path, index=False)
            else:
                frame.to_parquet(path, index=False)
        else:
            raise ValueError(f"Expected an export path ending in .parquet, .csv or .npz, but got {path.name!r}.")
        return path

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
        state.update({name: getattr(self, name).clone() for name in _FIELDS})
        return state

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "SampleLossStore":
        store = cls(state["num_samples"], state["ema_decay"], state["trace_epochs"])
        for name in _FIELDS:
            getattr(store, name).copy_(state[name])
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
    ) -> None:
        SampleLossStore(1, ema_decay, trace_epochs)  # validate arguments now, not at the first step
        self.num_samples = num_samples
        self.ema_decay = ema_decay
        self.trace_epochs = trace_epochs
        self.capacity = capacity
        self.export_path = export_path
        self.store: Optional[SampleLossStore] = None
        self._stat_names: Optional[list[str]] = None

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
        if self.store is None:
            self.store = SampleLossStore(n, self.ema_decay, self.trace_epochs)
        elif self.store.num_samples != n:
            raise SelectionError(
                f"The restored LossHistory tracks {self.store.num_samples} samples but the training set has {n}; "
                "resume with the same dataset or start a new history."
            )

    @override
    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.export_path and trainer.is_global_zero and self.store is not None:
            self.store.export(self.export_path)

    def observe(self, ctx: StepContext) -> None:
        if self.store is None:
            raise SelectionError("LossHistory was used before on_train_start; it must be a Trainer callback.")
        assert ctx.losses is not None
        n = ctx.rows.numel()
        names = sorted(ctx.sample_stats)
        if self._stat_names is None:
            self._stat_names = names
        elif names != self._stat_names:
            raise SelectionError(f"Per-sample statistics changed between steps: {self._stat_names} -> {names}.")
        cols = [ctx.kept_indices.double(), ctx.losses.detach().double()]
        cols += [ctx.sample_stats[k].detach().double() for k in names]
        local = torch.stack(cols, dim=1)
        if not ctx.has_samples:
            local[:, 0] = -1
        if ctx.world_size > 1:
            if self.capacity is None:
                self.capacity = ctx.batch_size
            if n > self.capacity:
                raise SelectionError(
                    f"LossHistory gathers at most {self.capacity} rows per rank but this batch kept {n}; "
                    "set LossHistory(capacity=...) to the largest per-rank batch size."
                )
            padded = local.new_full((self.capacity, local.shape[1]), -1.0)
            padded[:n] = local
            local = ctx.all_gather(padded).reshape(-1, local.shape[1])
        local = local[local[:, 0] >= 0]
        stats = {k: local[:, 2 + j] for j, k in enumerate(names)}
        self.store.update(local[:, 0].long(), local[:, 1], ctx.trainer.global_step, ctx.trainer.current_epoch, stats)

    def export(self, path: Union[str, Path]) -> Path:
        """Write the history table (see :meth:`SampleLossStore.export`)."""
        if self.store is None:
            raise SelectionError("The history is empty: nothing was trained yet.")
        return self.store.export(path)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {} if self.store is None else {"store": self.store.state_dict(), "stat_names": self._stat_names}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "store" in state_dict:
            self.store = SampleLossStore.from_state_dict(state_dict["store"])
            self._stat_names = state_dict["stat_names"]
