"""What a weighting policy did, per step and in total: :class:`WeightStatistics`.

The hard-example weighting policies (:class:`~lightning_select.policies.focal_weighting.FocalWeighting`,
:class:`~lightning_select.policies.ohem.OHEM`,
:class:`~lightning_select.policies.loss_softmax_weighting.LossSoftmaxWeighting`) stage their weights in
``sample_weights`` (or ``select``) and record them in ``observe``, which runs once per step after the
engine agreed that the step is finite (a ``nan_policy="skip"`` re-run calls ``sample_weights`` twice,
``observe`` once).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from lightning_select.core import SelectionPolicy, StepContext
from lightning_select.core.engine import override
from lightning_select.rules.reduction import effective_sample_size

FIELDS = ("rows", "kept", "weight_sum", "weight_sq_sum", "score_sum")


class WeightStatistics:
    """Per-step logs and running totals of one policy's weights, the same on every rank.

    Logged at the engine's cadence (``ctx.log``), for this rank's rows: ``<prefix>/weight_mean``,
    ``<prefix>/max_mean_ratio`` (``max(w)/mean(w)``), ``<prefix>/ess_fraction`` (Kish's effective
    sample size over the number of rows, :func:`~lightning_select.rules.reduction.effective_sample_size`),
    ``<prefix>/<score>`` (the mean of the policy's score), and ``<prefix>/kept_fraction`` for a mask.

    Totals since the start of training (:attr:`sums`: rows, kept rows, ``Σw``, ``Σw²``, ``Σ score``, in
    fp64) are summed over every rank's rows (one 5-element all-reduce per step under DDP), so every
    rank holds the same totals; they are checkpointed with the policy, so a resumed run continues
    them bit for bit.

    Example::

        >>> stats = WeightStatistics("focal", "pt_mean")
        >>> stats.summary()["steps"]
        0
    """

    def __init__(self, prefix: str, score: str) -> None:
        self.prefix, self.score = prefix, score
        self.steps = 0
        self.sums = torch.zeros(len(FIELDS), dtype=torch.float64)
        self._pending: Optional[tuple[Tensor, Tensor, Optional[Tensor]]] = None

    def stage(self, weights: Tensor, scores: Tensor, kept: Optional[Tensor] = None) -> None:
        """Keep this step's ``[n]`` weights, scores and (optional) bool keep-mask for :meth:`record`."""
        self._pending = (weights.detach(), scores.detach(), None if kept is None else kept.detach())

    def record(self, ctx: StepContext) -> None:
        """Log the staged step and add it to the totals. Call from ``observe``: every rank, every step."""
        pending, self._pending = self._pending, None
        device = ctx.losses.device if ctx.losses is not None else torch.device("cpu")
        if pending is None:
            pending = (torch.zeros(0, device=device), torch.zeros(0, device=device), None)
        w, s, kept = (t if t is None else t.to(device) for t in pending)
        w64 = w.double()
        n_kept = kept.sum().double() if kept is not None else w64.new_tensor(float(w.numel()))
        local = torch.stack([w64.new_tensor(float(w.numel())), n_kept, w64.sum(), w64.square().sum(),
                             s.double().sum()])
        if ctx.world_size > 1:  # every rank calls this every step (observe)
            local = ctx.trainer.strategy.reduce(local, reduce_op="sum")
        if self.sums.device != local.device:
            self.sums = self.sums.to(local.device)
        self.sums += local
        self.steps += 1
        if ctx.should_log and w.numel():
            mean = w.float().mean()
            ctx.log(f"{self.prefix}/weight_mean", mean)
            ctx.log(f"{self.prefix}/max_mean_ratio", w.float().max() / mean.clamp_min(torch.finfo(torch.float32).tiny))
            ctx.log(f"{self.prefix}/ess_fraction", effective_sample_size(w) / w.numel())
            ctx.log(f"{self.prefix}/{self.score}", s.float().mean())
            if kept is not None:
                ctx.log(f"{self.prefix}/kept_fraction", kept.float().mean())

    def summary(self) -> dict[str, float]:
        """Totals so far: steps, rows, kept fraction, mean weight, the pooled ESS fraction, mean score."""
        rows, kept, w_sum, w_sq, score = self.sums.tolist()
        nan = float("nan")
        return {"steps": self.steps, "rows": int(rows), "kept_fraction": kept / rows if rows else nan,
                "weight_mean": w_sum / rows if rows else nan,
                "ess_fraction": w_sum * w_sum / (rows * w_sq) if rows and w_sq > 0 else nan,
                f"{self.score}": score / rows if rows else nan}

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "sums": self.sums.detach().cpu().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        self.sums = state["sums"].detach().clone().to(torch.float64)


class StatisticsPolicy(SelectionPolicy):
    """Base of the weighting policies: their :class:`WeightStatistics` (``self.stats``) is recorded in
    :meth:`observe` and is the policy's checkpointed state."""

    stats: WeightStatistics

    def observe(self, ctx: StepContext) -> None:
        self.stats.record(ctx)

    @override
    def state_dict(self) -> dict[str, Any]:
        return self.stats.state_dict()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.stats.load_state_dict(state_dict)
