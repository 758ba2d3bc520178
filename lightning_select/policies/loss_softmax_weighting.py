"""``LossSoftmaxWeighting``: per-sample weights ``n·softmax(ℓ/T)``, harder rows weigh exponentially more."""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from lightning_select.core import StepContext
from lightning_select.core.options import real_option
from lightning_select.policies.focal_weighting import _checked_ratio
from lightning_select.policies.weight_stats import StatisticsPolicy, WeightStatistics
from lightning_select.rules.weighting import bound_weights, loss_softmax_weights


class LossSoftmaxWeighting(StatisticsPolicy):
    """Weight each row by ``n·softmax(ℓ/T)`` of the batch's per-sample losses (mean 1), with a capped ratio.

    **Card.** What it changes: the weights (no row is dropped). Unbiased: no, by design: it minimises the
    *tilted* risk ``T·log mean exp(ℓ/T)`` instead of the mean loss. With the weights held constant (as
    the engine does), ``∇ Σ softmax(ℓ/T)_i ℓ_i = ∇ T·log mean exp(ℓ/T)`` exactly, so without a cap the
    trained gradient is that of the tilted loss of the batch (a Trainer test checks it). ``T → ∞`` is
    the plain mean, ``T → 0`` the maximum loss. Extra cost: no extra forward pass; a ``[B]`` softmax
    per step; under DDP one 5-element all-reduce per step for the running totals. Reference: "Tilted
    Empirical Risk Minimization" (Li, Beirami, Sanjabi and Smith, ICLR 2021; tilt ``t = 1/T``, whose
    gradient is this softmax-weighted mean), and the mini-batch softmax weights of attentional-biased
    SGD (Qi et al., 2020, ABSGD, ``λ = T``); checked against the hand formula. Defaults:
    ``temperature = 1``; ``max_weight_ratio = 10`` (a deviation: the papers do not cap; ``None``
    removes the cap) so that one row never carries more than 10× the mean weight, which keeps the
    effective sample size of a batch with a few outliers (e.g. mislabelled rows) from collapsing.
    The tilts below zero of TERM and ABSGD (down-weighting hard rows, for label noise) are not offered:
    ``temperature`` must be > 0.

    The cap (:func:`~lightning_select.rules.weighting.bound_weights`) is solved exactly and keeps the
    total ``n``, so the weights keep mean 1 and the engine's weight-sum normalisation divides by ``n``.
    Under DDP the softmax and the cap are over each rank's own rows (the objective is the mean of the
    ranks' tilted losses); the normalisation is global (the engine's).

    Logs ``loss_softmax/weight_mean`` (1), ``loss_softmax/max_mean_ratio``, ``loss_softmax/ess_fraction``
    and ``loss_softmax/loss_mean`` (the score: the mean per-sample loss).

    Args:
        temperature: ``T > 0``, in the units of the loss.
        max_weight_ratio: the largest ``max(w)/mean(w)`` per step (``>= 1``), or None for no cap.

    Example::

        >>> policy = LossSoftmaxWeighting(temperature=0.5)
        >>> policy.max_weight_ratio, policy.needs_scores, policy.normalise_by_count
        (10.0, False, False)
        >>> # Trainer(callbacks=[policy]).fit(model)   # training_step returns per-sample losses [B]
    """

    order = 300

    def __init__(self, temperature: float = 1.0, max_weight_ratio: Optional[float] = 10.0) -> None:
        who = type(self).__name__
        temperature = real_option(who, "temperature", temperature)
        if temperature <= 0:
            raise ValueError(f"{who}: expected `temperature` > 0 (in the units of the loss; larger is closer to "
                             f"uniform weights), but got {temperature}.")
        self.temperature = temperature
        self.max_weight_ratio = _checked_ratio(who, max_weight_ratio)
        self.stats = WeightStatistics("loss_softmax", "loss_mean")

    def sample_weights(self, ctx: StepContext) -> Tensor:
        assert ctx.losses is not None
        losses = ctx.losses.detach()
        weights = loss_softmax_weights(losses, self.temperature)
        if self.max_weight_ratio is not None and ctx.has_samples:
            weights = bound_weights(weights, self.max_weight_ratio)
        if ctx.has_samples:
            self.stats.stage(weights, losses.float())
        return weights
