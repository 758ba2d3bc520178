"""``DBPM``: Dynamic Bad Pair Mining, bounded down-weighting of abnormal positive pairs in contrastive training."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Optional, Union

import torch
from torch import Tensor

from lightning_select.core import SelectionError, SelectionPolicy, StepContext, training_loss_of
from lightning_select.core.distributed import train_dataset_size
from lightning_select.core.engine import override
from lightning_select.core.options import int_option, path_option, real_option, str_option
from lightning_select.io import write_table
from lightning_select.policies.weight_stats import WeightStatistics
from lightning_select.rules.contrastive import EmbeddingOutput
from lightning_select.rules.dbpm import FAULTY, NOISY, dbpm_flags, dbpm_weights, history_mean
from lightning_select.stats.dynamics_files import write_json
from lightning_select.stats.table import SampleTable

if TYPE_CHECKING:  # pragma: no cover
    import lightning.pytorch as pl

_F64 = torch.float64


class DBPM(SelectionPolicy):
    """Dynamic Bad Pair Mining: flag positive pairs with an abnormal loss history and down-weight them, bounded.

    **Card.** What it changes: the weights (flagged pairs get a weight in ``[min_weight, 1]``, the
    others 1; no row is dropped). Unbiased: no, by design: it trains less on pairs it judges bad.
    Extra cost: no extra forward pass; the per-row InfoNCE losses ride on the engine's one per-step
    gather of every rank's trained rows, so every rank holds the same memory and computes the same
    ``μ``, ``σ`` and flags (no collective of its own besides the weight statistics' 5-element all-reduce
    per step). Memory: 28 bytes per pair (presentations, ``Σℓ``, ``Σ(e+1)ℓ``, ``Σ(e+1)``, the last
    weight; float64 sums) plus the 1-byte flag. Reference: Lei et al., "Robust Time Series Contrastive
    Learning via Dynamic Bad Pair Mining" (DBPM; see ``selection-methods.md``); the flag rule is
    checked against a numpy formula in the tests. Defaults: ``β_np = 2``, ``β_fp = 3`` (the reference);
    **deviation**: the weight is the bounded Gaussian *kernel* ``exp(−(ℓ − μ)²/2σ²)`` (floored at
    ``min_weight``), not the reference's Gaussian *density*, which exceeds 1 for ``σ < 0.4`` and would
    up-weight flagged pairs (:mod:`lightning_select.rules.dbpm`); ``warmup_epochs=5`` is this library's
    choice.

    **The rule.** Each pair's per-epoch loss ``ℓ_i^(e)`` (the training pass's per-row loss, recorded every
    presentation) is kept as running sums. At the start of every epoch ``e >= warmup_epochs``, each
    seen pair's summary ``m_i`` (``history="mean"``: the mean; ``"weighted"``: a linear recency weighting,
    epoch ``e`` weighs ``e + 1``; :func:`~lightning_select.rules.dbpm.history_mean`) is compared with the
    mean ``μ`` and standard deviation ``σ`` of all ``m``: ``m_i ≤ μ − β_np·σ`` flags it *noisy*,
    ``m_i ≥ μ + β_fp·σ`` *faulty*. During that epoch a flagged pair's loss ``ℓ`` is weighted by
    ``max(exp(−(ℓ − μ)²/2σ²), min_weight)``.

    Needs ``training_step`` to return an :class:`~lightning_select.rules.contrastive.EmbeddingOutput`
    (row ``i`` is the pair ``(anchor_i, positive_i)``, keyed by the batch's sample index). Logs
    ``dbpm/history_coverage`` (share of pairs seen), ``dbpm/noisy_fraction`` and ``dbpm/faulty_fraction``
    (share of pairs flagged), ``dbpm/mu``, ``dbpm/sigma``, and ``dbpm/weight_mean``, ``dbpm/ess_fraction``,
    ``dbpm/max_mean_ratio``, ``dbpm/flagged_fraction`` (this step's rows;
    :class:`~lightning_select.policies.weight_stats.WeightStatistics`).

    Args:
        warmup_epochs: epochs recorded before the first flags (>= 1).
        beta_np: noisy threshold ``m ≤ μ − β_np·σ``.
        beta_fp: faulty threshold ``m ≥ μ + β_fp·σ``.
        history: ``"mean"`` or ``"weighted"`` (see above).
        min_weight: floor of a flagged pair's weight, in ``(0, 1]``.
        num_samples: number of pairs (default: the training dataset's length).
        export_path: write ``dbpm.parquet`` (or ``.csv``) and ``dbpm.json`` there at the end of ``fit`` (rank 0).
        capacity: fixed per-rank row count of the engine's gather (None: agreed every step).

    Example::

        >>> policy = DBPM(warmup_epochs=2, beta_np=2.0, beta_fp=3.0, history="weighted")
        >>> # Trainer(callbacks=[policy]).fit(DigitsEmbeddingModule(), DigitsPairsDataModule())
        >>> # policy.flags: 0 ok, 1 noisy, 2 faulty per pair; policy.export("run/dbpm.parquet")
    """

    order = 500
    needs_global_rows = True

    def __init__(self, warmup_epochs: int = 5, beta_np: float = 2.0, beta_fp: float = 3.0,
                 history: Literal["mean", "weighted"] = "mean", min_weight: float = 1e-3,
                 num_samples: Optional[int] = None, export_path: Optional[str] = None,
                 capacity: Optional[int] = None) -> None:
        who = type(self).__name__
        self.warmup_epochs = int_option(who, "warmup_epochs", warmup_epochs, minimum=1)
        self.beta_np, self.beta_fp = real_option(who, "beta_np", beta_np), real_option(who, "beta_fp", beta_fp)
        for name, value in (("beta_np", self.beta_np), ("beta_fp", self.beta_fp)):
            if not value > 0:  # type: ignore[operator]
                raise ValueError(f"{who}: expected `{name}` > 0 (a number of standard deviations; the reference uses "
                                 f"beta_np=2, beta_fp=3), but got {value}.")
        self.history = str_option(who, "history", history)
        if self.history not in ("mean", "weighted"):
            raise ValueError(f"{who}: expected `history` to be 'mean' (the plain mean of the per-epoch losses) or "
                             f"'weighted' (linear recency weighting), but got {history!r}.")
        self.min_weight = real_option(who, "min_weight", min_weight)
        if not 0.0 < self.min_weight <= 1.0:  # type: ignore[operator]
            raise ValueError(f"{who}: expected `min_weight` in (0, 1] (the floor of a flagged pair's weight), "
                             f"but got {min_weight}.")
        self.num_samples = int_option(who, "num_samples", num_samples, minimum=1, optional=True)
        self.export_path = path_option(who, "export_path", export_path)
        if self.export_path and Path(self.export_path).suffix.lower() not in (".parquet", ".csv"):
            raise ValueError(f"{who}: expected `export_path` to end in .parquet or .csv, but got {export_path!r}.")
        self.gather_capacity = int_option(who, "capacity", capacity, minimum=1, optional=True)
        self.stats = WeightStatistics("dbpm", "flagged_fraction")
        self.table: Optional[SampleTable] = None
        self.flags: Optional[Tensor] = None  # [N] int8 flags of the current epoch
        self.mu, self.sigma = float("nan"), float("nan")
        self.flags_epoch = -1  # the epoch whose start computed the flags (-1: none yet)
        self.epochs = 0  # epochs with a recorded presentation (the last one + 1)

    # ------------------------------------------------------------------ memory and flags
    def mean_loss(self) -> Tensor:
        """``[N]`` float64 summary ``m_i`` of every pair's loss history (NaN for pairs never seen)."""
        if self.table is None:
            raise SelectionError("DBPM has recorded nothing yet: it must be a Trainer callback of a fit.")
        t = self.table
        return history_mean(t["sum_loss"], t["count"], t["sum_weighted"], t["sum_weights"], self.history)  # type: ignore[arg-type]

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        n = self.num_samples or train_dataset_size(trainer, "DBPM")
        if self.table is None:
            table = SampleTable(n)
            table.add_column("count", torch.int32, 0, "count")
            for name in ("sum_loss", "sum_weighted", "sum_weights"):
                table.add_column(name, _F64, 0.0, "sum")
            table.add_column("last_weight", torch.float32, float("nan"), "last")
            self.table, self.flags = table, torch.zeros(n, dtype=torch.int8)
        elif self.table.num_samples != n:
            raise SelectionError(f"The restored DBPM memory holds {self.table.num_samples} pairs but the training set "
                                 f"has {n}: it comes from a different dataset size. Resume with the same dataset.")

    @override
    def on_train_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """From ``warmup_epochs`` on, flag the pairs from the history of the epochs before (identical on every
        rank: the memory is built from every rank's rows). A resumed mid-epoch run keeps its checkpointed flags."""
        epoch = trainer.current_epoch
        if self.table is None or epoch < self.warmup_epochs or self.flags_epoch == epoch:
            return
        flags, self.mu, self.sigma = dbpm_flags(self.mean_loss(), self.beta_np, self.beta_fp)  # type: ignore[arg-type]
        self.flags, self.flags_epoch = flags.to(torch.int8), epoch

    def sample_weights(self, ctx: StepContext) -> Optional[Tensor]:
        raw = training_loss_of(ctx.output)
        if not isinstance(raw, EmbeddingOutput):
            raise SelectionError(
                f"DBPM mines bad positive pairs of contrastive training, but training_step returned "
                f"{type(raw).__name__}, not an EmbeddingOutput(anchor=..., positive=...). For classification use "
                "TrainingDynamics (AUM, forgetting events, cartography) to find mislabelled samples.")
        assert ctx.losses is not None and self.flags is not None
        if self.flags_epoch < 0:  # warm-up: record only (the weight statistic is there every step, for observers)
            ctx.sample_stats["dbpm_weight"] = torch.ones_like(ctx.losses.detach())
            return None
        row_flags = self.flags[ctx.kept_indices.cpu()].to(ctx.losses.device)
        weights = dbpm_weights(ctx.losses.detach(), row_flags, self.mu, self.sigma, self.min_weight)  # type: ignore[arg-type]
        ctx.sample_stats["dbpm_weight"] = weights
        if ctx.has_samples:
            self.stats.stage(weights, (row_flags > 0).float())
        return weights

    def observe(self, ctx: StepContext) -> None:
        if self.table is None:
            raise SelectionError("DBPM was used before on_train_start; it must be a Trainer callback.")
        self.stats.record(ctx)
        rows = ctx.gathered
        assert rows is not None
        if rows["index"].numel():
            indices = rows["index"].cpu().long()
            self.table.check_indices(indices)
            losses = rows["loss"].detach().cpu().double()
            weight = float(ctx.trainer.current_epoch + 1)
            self.table.update(indices, {"sum_loss": losses, "sum_weighted": weight * losses, "sum_weights": weight,
                                        "last_weight": rows["dbpm_weight"]})
            self.epochs = max(self.epochs, ctx.trainer.current_epoch + 1)
        if ctx.should_log:
            ctx.log("dbpm/history_coverage", (self.table["count"] > 0).float().mean())
            if self.flags_epoch >= 0:
                assert self.flags is not None
                ctx.log("dbpm/noisy_fraction", (self.flags == NOISY).float().mean())
                ctx.log("dbpm/faulty_fraction", (self.flags == FAULTY).float().mean())
                ctx.log("dbpm/mu", self.mu)
                ctx.log("dbpm/sigma", self.sigma)

    # ------------------------------------------------------------------ export
    @override
    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.export_path and trainer.is_global_zero and self.table is not None:
            self.export(self.export_path)

    def export(self, path: Union[str, os.PathLike]) -> Path:
        """Write ``dbpm.parquet``-style columns (``index``, ``mean_loss``, ``flag``, ``weight``, ``presentations``)
        and ``<stem>.json`` (μ, σ, β's, warm-up, epochs, counts).

        ``mean_loss`` and ``flag`` are the rule applied to the *whole* recorded history (what the next epoch would
        use), ``weight`` the last weight DBPM applied to the pair in training (1 during the warm-up, NaN if never seen)."""
        m = self.mean_loss()
        flags, mu, sigma = dbpm_flags(m, self.beta_np, self.beta_fp)  # type: ignore[arg-type]
        assert self.table is not None
        count = self.table["count"]
        path = Path(path)
        write_table({"index": torch.arange(self.table.num_samples).numpy(), "mean_loss": m.numpy(),
                     "flag": flags.numpy(), "weight": self.table["last_weight"].numpy(),
                     "presentations": count.numpy()}, path)
        write_json({"num_samples": self.table.num_samples, "mu": mu, "sigma": sigma, "beta_np": self.beta_np,
                    "beta_fp": self.beta_fp, "warmup_epochs": self.warmup_epochs, "history": self.history,
                    "min_weight": self.min_weight, "epochs": self.epochs,
                    "flags_epoch": self.flags_epoch, "pairs_seen": int((count > 0).sum()),
                    "noisy": int((flags == NOISY).sum()), "faulty": int((flags == FAULTY).sum()),
                    "seed": os.environ.get("PL_GLOBAL_SEED"),
                    "flag_codes": {"0": "ok", "1": "noisy (m <= mu - beta_np*sigma)",
                                   "2": "faulty (m >= mu + beta_fp*sigma)"}},
                   path.with_suffix(".json"))
        return path

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        if self.table is None:
            return {}
        return {"table": self.table.state_dict(), "flags": self.flags.clone(),  # type: ignore[union-attr]
                "mu": torch.tensor(self.mu, dtype=_F64), "sigma": torch.tensor(self.sigma, dtype=_F64),
                "flags_epoch": self.flags_epoch, "epochs": self.epochs, "stats": self.stats.state_dict()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "table" in state_dict:
            self.table = SampleTable.from_state_dict(state_dict["table"])
            self.flags = state_dict["flags"].clone()
            self.mu, self.sigma = float(state_dict["mu"]), float(state_dict["sigma"])
            self.flags_epoch, self.epochs = int(state_dict["flags_epoch"]), int(state_dict["epochs"])
            self.stats.load_state_dict(state_dict["stats"])
