"""``DynamicsFilter``: after a warm-up, drop or down-weight the samples that the training dynamics flag."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, Optional

import torch
from torch import Tensor

from lightning_select.core import StepContext
from lightning_select.core.engine import override
from lightning_select.core.options import int_option, real_option, str_option
from lightning_select.stats.dynamics import TrainingDynamics

if TYPE_CHECKING:  # pragma: no cover
    import lightning.pytorch as pl

#: statistic -> +1 if a high value is suspicious (likely mislabelled), -1 if a low value is
SUSPICIOUS_HIGH = {"aum": -1, "confidence": -1, "correctness": -1, "forgetting_events": 1, "el2n": 1}


def most_suspicious(values: Tensor, direction: int, fraction: float) -> Tensor:
    """``[N]`` bool: the ``round(fraction · seen)`` samples with the most suspicious finite-or-infinite value.

    ``direction`` is +1 when high values are suspicious, −1 when low ones are; NaN (never seen) is never
    flagged. Ties are broken by the lower sample index, so the flags are a pure function of the values.

    Example::

        >>> most_suspicious(torch.tensor([0.5, -1.0, float("nan"), -1.0, 2.0]), -1, 0.5).tolist()
        [False, True, False, True, False]
    """
    seen = ~values.isnan()
    k = round(fraction * int(seen.sum()))
    key = torch.where(seen, direction * values.double(), torch.full_like(values, float("-inf"), dtype=torch.float64))
    order = torch.argsort(-key, stable=True)  # most suspicious first; ties keep index order
    flags = torch.zeros(values.shape, dtype=torch.bool)
    flags[order[:k]] = True
    return flags & seen


class DynamicsFilter(TrainingDynamics):
    """Record the training dynamics and, after ``warmup_epochs``, drop (or down-weight) the most suspicious samples.

    **Card.** What it changes: the selection (``mode="select"``: flagged rows are not trained) or the
    weights (``mode="weight"``: flagged rows get ``flagged_weight``). Unbiased: no, by design: it trains on
    the samples the dynamics consider clean. Extra cost: that of
    :class:`~lightning_select.stats.dynamics.TrainingDynamics` (which it is: it records and exports the
    same table) plus a sort of the N per-sample values at each epoch start; 1 byte per sample for the
    flags. Reference: the AUM paper (Pleiss et al., 2020) removes low-AUM samples and retrains; here the
    removal happens within one run, after the warm-up, from the statistic recorded so far (recomputed at
    every epoch start, identical on every rank). Defaults: ``statistic="aum"``, ``fraction=0.2``,
    ``warmup_epochs=3`` (this library's choice; the AUM paper picks the cut with threshold samples).

    Flags: at the start of every epoch ``e >= warmup_epochs``, the ``round(fraction · seen)`` samples with the
    lowest AUM / confidence / correctness, or the highest forgetting events / EL2N
    (:func:`most_suspicious`). With ``mode="select"`` a flagged sample is not trained, so its statistics
    stay as they were when it was flagged. Logs ``dynamics_filter/kept_fraction`` (per step) and
    ``dynamics_filter/flagged_share``; when the datamodule knows the mislabelled samples,
    ``dynamics_filter/flagged_noisy_precision`` (share of the flagged that are mislabelled).

    Args:
        statistic: ``"aum"``, ``"confidence"``, ``"correctness"``, ``"forgetting_events"`` or ``"el2n"``.
        fraction: share of the seen samples flagged, in ``(0, 1)``.
        warmup_epochs: epochs trained on everything first (>= 1).
        mode: ``"select"`` (drop) or ``"weight"`` (down-weight).
        flagged_weight: the weight of a flagged row with ``mode="weight"``, in ``[0, 1)``.
        **dynamics: options of :class:`~lightning_select.stats.dynamics.TrainingDynamics` (``export_path``, ...).

    Example::

        >>> policy = DynamicsFilter(statistic="aum", fraction=0.3, warmup_epochs=5)
        >>> # Trainer(callbacks=[policy]).fit(NoisyLabelClassifier(arch="cnn"), Cifar10NDataModule(label_set="worse"))
    """

    def __init__(self, statistic: str = "aum", fraction: float = 0.2, warmup_epochs: int = 3,
                 mode: Literal["select", "weight"] = "select", flagged_weight: float = 0.0, **dynamics: Any) -> None:
        super().__init__(**dynamics)
        who = type(self).__name__
        self.statistic = str_option(who, "statistic", statistic)
        if self.statistic not in SUSPICIOUS_HIGH:
            raise ValueError(f"{who}: expected `statistic` in {sorted(SUSPICIOUS_HIGH)}, but got {statistic!r}.")
        self.fraction = real_option(who, "fraction", fraction)
        if not 0.0 < self.fraction < 1.0:  # type: ignore[operator]
            raise ValueError(f"{who}: expected `fraction` in (0, 1) (the share of samples flagged), but got {fraction}.")
        self.warmup_epochs = int_option(who, "warmup_epochs", warmup_epochs, minimum=1)
        self.mode = str_option(who, "mode", mode)
        if self.mode not in ("select", "weight"):
            raise ValueError(f"{who}: expected `mode` to be 'select' (drop flagged rows) or 'weight' (down-weight "
                             f"them), but got {mode!r}.")
        self.flagged_weight = real_option(who, "flagged_weight", flagged_weight)
        if not 0.0 <= self.flagged_weight < 1.0:  # type: ignore[operator]
            raise ValueError(f"{who}: expected `flagged_weight` in [0, 1) (a flagged row's weight with mode='weight'), "
                             f"but got {flagged_weight}.")
        self.flags: Optional[Tensor] = None
        self.flags_epoch = -1
        self.flag_log: list[dict[str, Any]] = []  # per flagging epoch: flagged, and mislabelled among them if known

    @override
    def on_train_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        epoch = trainer.current_epoch
        if self.store is None or epoch < self.warmup_epochs or self.flags_epoch == epoch:
            return
        values = self.statistics()[self.statistic]
        self.flags, self.flags_epoch = most_suspicious(values, SUSPICIOUS_HIGH[self.statistic], self.fraction), epoch  # type: ignore[arg-type]
        entry: dict[str, Any] = {"epoch": epoch, "flagged": int(self.flags.sum())}
        if self._noisy is not None:
            entry["flagged_noisy"] = int((self.flags & self._noisy).sum())
        self.flag_log.append(entry)

    def _flagged_rows(self, ctx: StepContext) -> Optional[Tensor]:
        if self.flags is None or self.flags_epoch < 0:
            return None
        return self.flags[ctx.kept_indices.cpu()].to(ctx.rows.device)

    def select(self, ctx: StepContext) -> Optional[Tensor]:
        flagged = self._flagged_rows(ctx) if self.mode == "select" else None
        if flagged is None:
            return None
        if ctx.should_log:
            ctx.log("dynamics_filter/kept_fraction", 1.0 - flagged.float().mean())
            self._log_flags(ctx)
        return ~flagged

    def sample_weights(self, ctx: StepContext) -> Optional[Tensor]:
        super().sample_weights(ctx)  # the dynamics' per-row values, for the gather
        flagged = self._flagged_rows(ctx) if self.mode == "weight" else None
        if flagged is None:
            return None
        if ctx.should_log:
            ctx.log("dynamics_filter/kept_fraction", 1.0 - flagged.float().mean())
            self._log_flags(ctx)
        return torch.where(flagged, torch.full(flagged.shape, self.flagged_weight, device=flagged.device),
                           torch.ones(flagged.shape, device=flagged.device))

    def _log_flags(self, ctx: StepContext) -> None:
        assert self.flags is not None
        ctx.log("dynamics_filter/flagged_share", self.flags.float().mean())
        if self._noisy is not None and bool(self.flags.any()):
            ctx.log("dynamics_filter/flagged_noisy_precision", (self.flags & self._noisy).sum() / self.flags.sum())

    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if state and self.flags is not None:
            state.update(flags=self.flags.clone(), flags_epoch=self.flags_epoch, flag_log=list(self.flag_log))
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if "flags" in state_dict:
            self.flags, self.flags_epoch = state_dict["flags"].clone(), int(state_dict["flags_epoch"])
            self.flag_log = list(state_dict["flag_log"])
