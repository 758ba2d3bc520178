"""Training dynamics of every sample (cartography, forgetting events, AUM, EL2N), from the ordinary training pass.

:class:`DynamicsStore` keeps running sums on a :class:`~lightning_select.stats.table.SampleTable`
(no Lightning); :class:`TrainingDynamics` is the observer callback that feeds it. The files it writes
(and the contract with ``lightning-select report``) are described in
:mod:`lightning_select.stats.dynamics_files`.

**Per presentation.** Every time a sample is trained (a *presentation*) its row of the training
pass's logits gives ``p(label)``, whether the arg-max is the label, the margin
``z_label − max_{other} z`` and the EL2N score (:mod:`lightning_select.rules.dynamics`). The statistics
are over presentations; with one presentation per epoch (a shuffled loader, every sample once per
epoch) this is exactly "per epoch" as the papers define them. A sampler that trains a sample twice in
an epoch counts both; one that skips it (a selector, RS2) counts none. A sample trained twice in one
step (DistributedSampler's padding) counts once, with its first row in gather order.

Per-sample memory, measured by :meth:`DynamicsStore.bytes_per_sample` (a test checks it): **60 bytes**

================= ======= =====================================================================
column            dtype   meaning
================= ======= =====================================================================
``presentations`` int32   number of presentations
``epochs_seen``   int32   number of distinct epochs with a presentation
``last_epoch``    int32   epoch of the last presentation (−1 never)
``sum_p``         float64 ``Σ p(label)``
``sum_p2``        float64 ``Σ p(label)²`` (float64: the variance is ``Σp²/n − (Σp/n)²``)
``correct_count`` int32   presentations predicted correctly
``last_correct``  int32   the last presentation was correct (1), wrong (0), never seen (−1)
``ever_correct``  int32   predicted correctly at least once
``forgetting``    int32   correct → wrong flips between consecutive presentations
``sum_margin``    float64 ``Σ (z_label − max_{other} z)``
``el2n``          float32 EL2N at epoch ``el2n_epoch`` (the last presentation up to that epoch)
``label``         int32   the training label (−1 never seen)
================= ======= =====================================================================

plus 4 bytes per epoch of an in-memory trace (``trace_epochs``); an on-disk trace (``trace_dir``)
costs no memory beyond the pages being written (4 bytes per sample and epoch on disk).

Example::

    >>> store = DynamicsStore(num_samples=4)
    >>> logits, labels = torch.tensor([[2.0, 0.0], [0.0, 2.0], [0.0, 1.0]]), torch.tensor([0, 0, 0])
    >>> store.update(torch.tensor([0, 1, 2]), logits, labels, epoch=0)  # right, wrong, wrong
    >>> store.update(torch.tensor([0, 1, 2]), logits.flip(1), labels, epoch=1)  # wrong, right, right
    >>> store.update(torch.tensor([2]), torch.tensor([[0.0, 3.0]]), labels[:1], epoch=2)  # sample 2: wrong
    >>> stats = store.statistics()
    >>> stats["forgetting_events"].tolist(), stats["aum"].tolist()
    ([1.0, 0.0, 1.0, nan], [0.0, 0.0, -1.0, nan])
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

import torch
from torch import Tensor

from lightning_select.core import SelectionError, SelectionPolicy, StepContext, TrainingPreempted, training_loss_of
from lightning_select.core.distributed import train_dataset_size
from lightning_select.core.engine import override
from lightning_select.core.options import int_option, path_option, str_option
from lightning_select.io import write_table
from lightning_select.rules.contrastive import EmbeddingOutput
from lightning_select.rules.dynamics import (
    aum_margin,
    cartography_from_sums,
    el2n,
    predicted_correct,
    true_class_probability,
)
from lightning_select.stats.dynamics_files import TRACE_NAME, DiskTrace, write_json
from lightning_select.stats.table import SampleTable

if TYPE_CHECKING:  # pragma: no cover
    import lightning.pytorch as pl

_I32, _F64 = torch.int32, torch.float64
_COLUMNS = (("presentations", _I32, 0, "count"), ("epochs_seen", _I32, 0, "sum"), ("last_epoch", _I32, -1, "last"),
            ("sum_p", _F64, 0.0, "sum"), ("sum_p2", _F64, 0.0, "sum"), ("correct_count", _I32, 0, "sum"),
            ("last_correct", _I32, -1, "last"), ("ever_correct", _I32, 0, "max"), ("forgetting", _I32, 0, "sum"),
            ("sum_margin", _F64, 0.0, "sum"), ("el2n", torch.float32, float("nan"), "last"),
            ("label", _I32, -1, "last"))
STATISTICS = {
    "confidence": "mean over presentations of p(label) (dataset cartography)",
    "variability": "standard deviation (ddof 0) over presentations of p(label) (dataset cartography)",
    "correctness": "fraction of presentations whose arg-max is the label (dataset cartography)",
    "forgetting_events": "correct -> wrong flips between consecutive presentations; inf if never predicted correctly",
    "aum": "area under the margin: mean over presentations of (label logit - largest other logit)",
    "el2n": "||softmax - onehot(label)||_2 at epoch el2n_epoch (the last presentation up to it)",
}
_STAT_KEYS = ("dynamics_p_true", "dynamics_correct", "dynamics_margin", "dynamics_el2n", "dynamics_label")


class DynamicsStore:
    """Running per-sample training-dynamics sums for indices ``0 .. num_samples-1`` (see the module docstring).

    Args:
        num_samples: number of samples N.
        el2n_epoch: EL2N is recorded at presentations in epochs ``<= el2n_epoch`` (the last one stays).
        trace_epochs: in-memory ``[N, K]`` ring buffer of ``p(label)`` for the last K epochs (0: none).
    """

    def __init__(self, num_samples: int, el2n_epoch: int = 3, trace_epochs: int = 0) -> None:
        self.num_samples, self.el2n_epoch, self.trace_epochs = num_samples, el2n_epoch, trace_epochs
        self.table = SampleTable(num_samples)
        for name, dtype, default, reduce in _COLUMNS:
            self.table.add_column(name, dtype, default, reduce)  # type: ignore[arg-type]
        if trace_epochs:
            self.table.add_trace("p_true", trace_epochs)

    def update(self, indices: Tensor, logits: Tensor, targets: Tensor, epoch: int) -> None:
        """Record one presentation of each row (``logits [n, C]``, ``targets [n]``); see :meth:`update_values`."""
        self.update_values(indices, true_class_probability(logits, targets), predicted_correct(logits, targets),
                           aum_margin(logits, targets), el2n(logits, targets), targets, epoch)

    def update_values(self, indices: Tensor, p_true: Tensor, correct: Tensor, margin: Tensor, el2n_score: Tensor,
                      labels: Tensor, epoch: int) -> tuple[Tensor, Tensor]:
        """Record one presentation per unique index (a repeated index keeps its first row). Vectorised.

        Returns the unique indices and the positions of their rows (for a trace kept elsewhere)."""
        indices = indices.detach().cpu().long().reshape(-1)
        self.table.check_indices(indices)
        ids, inverse = torch.unique(indices, return_inverse=True)
        first = torch.full((ids.numel(),), indices.numel(), dtype=torch.long)
        first.scatter_reduce_(0, inverse, torch.arange(indices.numel()), "amin")
        pick = lambda t: t.detach().cpu().reshape(-1)[first]  # noqa: E731
        p, ok, m, e, y = pick(p_true).double(), pick(correct).bool(), pick(margin), pick(el2n_score), pick(labels)
        ok_i = ok.to(_I32)
        was_correct = self.table["last_correct"][ids] == 1
        new_epoch = (self.table["last_epoch"][ids] != epoch).to(_I32)
        values: dict[str, Any] = {
            "epochs_seen": new_epoch, "last_epoch": epoch, "sum_p": p, "sum_p2": p.square(), "correct_count": ok_i,
            "last_correct": ok_i, "ever_correct": ok_i, "forgetting": (was_correct & ~ok).to(_I32),
            "sum_margin": m.double(), "label": y.round().to(_I32)}
        if epoch <= self.el2n_epoch:
            values["el2n"] = e.float()
        self.table.update(ids, values)
        if self.trace_epochs:
            self.table.update_trace("p_true", ids, p.float(), epoch)
        return ids, first

    def statistics(self) -> dict[str, Tensor]:
        """``[N]`` per-sample statistics (NaN for samples never presented): the keys of :data:`STATISTICS`,
        plus ``epochs_seen``, ``presentations`` and ``label``."""
        t = self.table
        n = t["presentations"]
        seen = n > 0
        out = cartography_from_sums(n, t["sum_p"], t["sum_p2"], t["correct_count"])
        nan, inf = torch.tensor(float("nan"), dtype=_F64), torch.tensor(float("inf"), dtype=_F64)
        forgetting = torch.where(t["ever_correct"] > 0, t["forgetting"].double(), inf)
        out["forgetting_events"] = torch.where(seen, forgetting, nan)
        out["aum"] = torch.where(seen, t["sum_margin"] / n.double().clamp_min(1), nan)
        out["el2n"] = t["el2n"].clone()
        out.update(epochs_seen=t["epochs_seen"].clone(), presentations=n.clone(), label=t["label"].clone())
        return out

    def epochs_trained(self) -> int:
        return int(self.table["last_epoch"].max()) + 1

    def bytes_per_sample(self) -> float:
        """Measured bytes of every per-sample tensor (the columns and the in-memory trace) divided by N."""
        return self.table.bytes_per_sample(include_traces=True)

    def state_dict(self) -> dict[str, Any]:
        return {"num_samples": self.num_samples, "el2n_epoch": self.el2n_epoch, "trace_epochs": self.trace_epochs,
                "table": self.table.state_dict()}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "DynamicsStore":
        store = cls(state["num_samples"], state["el2n_epoch"], state["trace_epochs"])
        store.table = SampleTable.from_state_dict(state["table"])
        return store


class TrainingDynamics(SelectionPolicy):
    """Per-sample training dynamics: dataset cartography, forgetting events, AUM and EL2N, from the training pass.

    **Card.** What it changes: nothing (an observer). Unbiased: yes (it does not touch the gradient).
    Extra cost: no extra forward pass: it reads the training pass's logits (``ctx.output_field("logits")``)
    and the class targets of the batch, computes four ``[B]`` values per step, and sends them through
    ``ctx.sample_stats``, so they ride on the engine's one per-step gather of every rank's trained rows;
    every rank then holds the identical table. Memory: 60 bytes per sample (+4 per epoch of an
    in-memory trace; see :mod:`lightning_select.stats.dynamics`). Reference: Swayamdipta et al. 2020
    (cartography), Toneva et al. 2019 (forgetting events), Pleiss et al. 2020 (AUM), Paul et al. 2021
    (EL2N); checked against per-sample numpy/loop formulas in the tests. Defaults: statistics per
    presentation (= per epoch with one presentation per epoch); ``el2n_epoch=3``: the paper computes
    EL2N early in training (epoch 20 of 200 on CIFAR-10, averaged over 10 runs; here one run), "a few
    epochs in" for the 10-30 epoch runs of this library.

    Needs ``training_step`` to return ``{"loss": per_sample_losses, "logits": logits [B, C]}`` (e.g.
    ``NoisyLabelClassifier``) and the batch to hold the class targets under ``target_key``. A module
    without logits, or a contrastive ``EmbeddingOutput`` module, is refused at its first step with an
    error naming the statistics that are unavailable and why (for contrastive pairs use
    :class:`~lightning_select.policies.dbpm.DBPM` and ``LossHistory(trace_epochs=...)``).

    Logs ``dynamics/confidence_mean``, ``dynamics/correct_fraction`` and ``dynamics/margin_mean`` per step (this
    step's rows of every rank), and per epoch ``dynamics/coverage``, ``dynamics/forgotten_share`` (share of
    the seen samples with at least one forgetting event), ``dynamics/never_learned_share`` and ``dynamics/aum_mean``.

    Args:
        num_samples: dataset size N (default: ``len(trainer.train_dataloader.dataset)``).
        target_key: batch key of the class targets.
        el2n_epoch: epoch (0-based) whose EL2N is kept; a shorter run keeps its last epoch's.
        trace_epochs: keep ``p(label)`` of the last K epochs in memory (0: off; checkpointed).
        trace_dir: keep ``p(label)`` of every epoch in a file in this folder instead (no cap; rank 0
            writes it; the folder must outlive the run's checkpoints for an exact resume).
        export_path: write the table (and its ``.json`` metadata, ``_trace.npy``) there at the end of ``fit``
            (rank 0); ``.parquet`` or ``.csv``.
        capacity: fixed per-rank row count of the engine's gather (None: agreed every step).

    Example::

        >>> dynamics = TrainingDynamics(export_path="run/training_dynamics.parquet")
        >>> # Trainer(callbacks=[dynamics]).fit(NoisyLabelClassifier(), NoisyDigitsDataModule())
        >>> # dynamics.statistics()["aum"]  (low AUM: likely mislabelled)
    """

    order = 900
    needs_global_rows = True

    def __init__(self, num_samples: Optional[int] = None, target_key: str = "label", el2n_epoch: int = 3,
                 trace_epochs: int = 0, trace_dir: Optional[str] = None, export_path: Optional[str] = None,
                 capacity: Optional[int] = None) -> None:
        who = type(self).__name__
        self.num_samples = int_option(who, "num_samples", num_samples, minimum=1, optional=True)
        self.target_key = str_option(who, "target_key", target_key)
        self.el2n_epoch = int_option(who, "el2n_epoch", el2n_epoch, minimum=0)
        self.trace_epochs = int_option(who, "trace_epochs", trace_epochs, minimum=0)
        self.trace_dir = path_option(who, "trace_dir", trace_dir)
        if self.trace_epochs and self.trace_dir:
            raise ValueError(f"{who}: got both trace_epochs={trace_epochs} (an in-memory trace of the last epochs) and "
                             f"trace_dir={trace_dir!r} (every epoch on disk); choose one of them.")
        self.export_path = path_option(who, "export_path", export_path)
        if self.export_path and Path(self.export_path).suffix.lower() not in (".parquet", ".csv"):
            raise ValueError(f"{who}: expected `export_path` to end in .parquet or .csv, but got {export_path!r}.")
        self.gather_capacity = int_option(who, "capacity", capacity, minimum=1, optional=True)
        self.run_config: Optional[dict[str, Any]] = None  # set by lightning_select.cli.run: the resolved config
        self._store: Optional[DynamicsStore] = None
        self._disk: Optional[DiskTrace] = None
        self._disk_epochs = 0
        self._noisy: Optional[Tensor] = None
        self._dataset = ""

    @property
    def store(self) -> Optional[DynamicsStore]:
        return self._store

    @property
    def state_key(self) -> str:
        return self._generate_state_key(el2n_epoch=self.el2n_epoch, trace_epochs=self.trace_epochs)

    def statistics(self) -> dict[str, Tensor]:
        """The per-sample statistics (see :meth:`DynamicsStore.statistics`)."""
        if self._store is None:
            raise SelectionError("TrainingDynamics has recorded nothing yet: it must be a Trainer callback of a fit.")
        return self._store.statistics()

    # ------------------------------------------------------------------ fit hooks
    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        n = self.num_samples or train_dataset_size(trainer, "TrainingDynamics")
        if self._store is None:
            self._store = DynamicsStore(n, self.el2n_epoch, self.trace_epochs)
        elif self._store.num_samples != n:
            raise SelectionError(
                f"The restored TrainingDynamics tracks {self._store.num_samples} samples but the training set has {n}: "
                "the history comes from a different dataset size. Resume with the same dataset, or start a new run.")
        dm = getattr(trainer, "datamodule", None)
        self._dataset = type(dm).__name__ if dm is not None else type(getattr(trainer.train_dataloader, "dataset",
                                                                              None)).__name__
        try:
            mask = getattr(dm, "train_noisy_mask", None) if dm is not None else None
        except RuntimeError:  # a datamodule that was not set up
            mask = None
        self._noisy = mask.bool().cpu() if isinstance(mask, Tensor) and mask.numel() == n else None
        if self.trace_dir and trainer.is_global_zero:
            self._disk = DiskTrace(Path(self.trace_dir) / "training_dynamics_trace.f32", n, self._disk_epochs)

    def sample_weights(self, ctx: StepContext) -> None:
        """Stage 5 (the first stage after the training pass): compute this step's per-row values and hand them
        to the engine's gather through ``ctx.sample_stats``. Returns None (no weights)."""
        logits, targets = self._inputs(ctx)
        ctx.sample_stats.update({
            "dynamics_p_true": true_class_probability(logits, targets),
            "dynamics_correct": predicted_correct(logits, targets).float(),
            "dynamics_margin": aum_margin(logits, targets), "dynamics_el2n": el2n(logits, targets),
            "dynamics_label": targets.float()})

    def _inputs(self, ctx: StepContext) -> tuple[Tensor, Tensor]:
        n = ctx.rows.numel()
        raw = training_loss_of(ctx.output)
        if isinstance(raw, EmbeddingOutput):
            raise SelectionError(
                "TrainingDynamics: statistics asked of a contrastive run: confidence, variability, correctness, "
                "forgetting_events, aum and el2n are unavailable because training_step returned an EmbeddingOutput "
                "(in-batch pairs, no class logits). For positive pairs use DBPM (per-pair loss history and bad-pair "
                "flags) and LossHistory(trace_epochs=...) (per-sample loss traces).")
        logits = ctx.output_field("logits")
        if logits is None or logits.dim() != 2 or logits.shape[0] != n or logits.shape[1] < 2:
            got = ("no 'logits'" if logits is None else f"'logits' of shape {tuple(logits.shape)}")
            raise SelectionError(
                "TrainingDynamics: statistics asked of a run that logged no logits: confidence, variability, "
                "correctness, forgetting_events, aum and el2n are all unavailable, because each needs the class "
                f"logits of the training pass and training_step returned {type(ctx.output).__name__} with {got} "
                f"(expected [{n}, C]). Return {{'loss': per_sample_losses, 'logits': logits}} from training_step "
                "(read with ctx.output_field('logits'); no second forward is run), or record only the per-sample loss "
                "with LossHistory.")
        targets = ctx.row_column(self.target_key, f"TrainingDynamics(target_key={self.target_key!r})",
                                 "class targets", "set target_key to the batch key of the labels")
        return logits.detach(), targets.to(logits.device)

    def observe(self, ctx: StepContext) -> None:
        if self._store is None:
            raise SelectionError("TrainingDynamics was used before on_train_start; it must be a Trainer callback.")
        rows = ctx.gathered
        assert rows is not None
        if rows["index"].numel() == 0:
            return
        epoch = ctx.trainer.current_epoch
        p, ok, margin, e, y = (rows[k] for k in _STAT_KEYS)
        ids, first = self._store.update_values(rows["index"], p, ok, margin, e, y, epoch)
        self._disk_epochs = max(self._disk_epochs, epoch + 1)
        if self._disk is not None:
            self._disk.write(ids.numpy(), p.detach().cpu().reshape(-1)[first].float().numpy(), epoch)
        if ctx.should_log:
            ctx.log("dynamics/confidence_mean", p.float().mean())
            ctx.log("dynamics/correct_fraction", ok.float().mean())
            ctx.log("dynamics/margin_mean", margin.float().mean())

    @override
    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self._store is None:
            return
        stats = self._store.statistics()
        seen = self._store.table["presentations"] > 0
        pl_module.log("dynamics/coverage", seen.float().mean(), on_epoch=True, on_step=False)
        if bool(seen.any()):
            forgetting = stats["forgetting_events"][seen]
            pl_module.log("dynamics/forgotten_share", ((forgetting >= 1) & forgetting.isfinite()).float().mean(),
                          on_epoch=True, on_step=False)
            pl_module.log("dynamics/never_learned_share", forgetting.isinf().float().mean(), on_epoch=True,
                          on_step=False)
            pl_module.log("dynamics/aum_mean", stats["aum"][seen].float().mean(), on_epoch=True, on_step=False)

    @override
    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self._disk is not None:
            self._disk.flush()
        if self.export_path and trainer.is_global_zero and self._store is not None:
            self.export(self.export_path)

    @override
    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        """After a pre-emption the table is exported as far as it got (the checkpoint holds it too)."""
        if isinstance(exception, TrainingPreempted):
            self.on_train_end(trainer, pl_module)

    # ------------------------------------------------------------------ export
    def metadata(self) -> dict[str, Any]:
        """The run metadata of the export (see :mod:`lightning_select.stats.dynamics_files`)."""
        store = self._store
        if store is None:
            raise SelectionError("TrainingDynamics has recorded nothing yet: nothing to export.")
        seen = int((store.table["presentations"] > 0).sum())
        epochs = store.epochs_trained()
        statistics: dict[str, dict[str, Any]] = {}
        for name, definition in STATISTICS.items():
            entry: dict[str, Any] = {"available": seen > 0, "definition": definition}
            if not seen:
                entry["reason"] = "no sample was trained"
            statistics[name] = entry
        statistics["noisy"] = {"available": self._noisy is not None,
                               "definition": "the training label differs from the clean label (train_noisy_mask)"}
        if self._noisy is None:
            statistics["noisy"]["reason"] = ("the datamodule has no train_noisy_mask of the training-set size: "
                                              "which samples are truly mislabelled is unknown")
        seed = os.environ.get("PL_GLOBAL_SEED")
        trace_epochs: list[int] = []
        if store.trace_epochs:
            trace_epochs = store.table.trace("p_true")[0].tolist()
        elif self._disk is not None:
            trace_epochs = list(range(self._disk.epochs))
        return {"num_samples": store.num_samples, "epochs": epochs, "seed": int(seed) if seed else None,
                "config": self.run_config, "dataset": self._dataset, "statistics": statistics,
                "samples_seen": seen, "bytes_per_sample": store.bytes_per_sample(),
                "el2n_epoch": min(self.el2n_epoch, max(epochs - 1, 0)),
                "unit": "presentation (= epoch with one presentation per epoch)",
                "trace_file": TRACE_NAME if trace_epochs else None, "trace_epochs": trace_epochs}

    def to_columns(self) -> dict[str, Any]:
        stats = self.statistics()
        columns: dict[str, Any] = {"index": torch.arange(self._store.num_samples).numpy()}  # type: ignore[union-attr]
        columns.update({name: stats[name].numpy() for name in STATISTICS})
        columns.update({k: stats[k].numpy() for k in ("epochs_seen", "presentations", "label")})
        if self._noisy is not None:
            columns["noisy"] = self._noisy.numpy()
        return columns

    def export(self, path: Union[str, os.PathLike]) -> Path:
        """Write the table to ``path`` (``.parquet``/``.csv``), its metadata beside it (``.json``) and, if a trace
        is kept, ``<stem>_trace.npy`` (``[N, E]`` float32). Returns the table's path."""
        path = Path(path)
        meta = self.metadata()
        write_table(self.to_columns(), path)
        if meta["trace_file"]:
            trace_path = path.with_name(path.stem + "_trace.npy")
            meta["trace_file"] = trace_path.name
            if self._disk is not None:
                self._disk.to_npy(trace_path)
            else:
                import numpy as np

                np.save(trace_path, self._store.table.trace("p_true")[1].numpy())  # type: ignore[union-attr]
        write_json(meta, path.with_suffix(".json"))
        return path

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        if self._store is None:
            return {}
        return {"store": self._store.state_dict(), "disk_epochs": self._disk_epochs}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "store" in state_dict:
            self._store = DynamicsStore.from_state_dict(state_dict["store"])
            self._disk_epochs = int(state_dict["disk_epochs"])
