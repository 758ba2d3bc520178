"""``FocalWeighting``: the focal loss (Lin et al., 2017) as per-sample weights on the cross-entropy."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, Optional, Union

import torch
from torch import Tensor

from lightning_select.core import SelectionError, StepContext
from lightning_select.core.distributed import raise_together
from lightning_select.core.engine import override
from lightning_select.core.options import bool_option, real_option, str_option
from lightning_select.policies.weight_stats import StatisticsPolicy, WeightStatistics
from lightning_select.rules.weighting import _log_pt, bound_weights, focal_gradient_weights, focal_loss, focal_weights


class FocalWeighting(StatisticsPolicy):
    """The focal loss ``FL = −α_t (1 − p_t)^γ log p_t`` (Lin et al., 2017), applied as per-sample weights.

    **Card.** What it changes: the weights (no row is dropped). Unbiased: no, by design: it trains on the
    focal loss, not on the cross-entropy, down-weighting well-classified rows (``p_t → 1``). Extra cost:
    no extra forward pass; a ``[B, C]`` log-softmax per step; under DDP one 5-element all-reduce per step
    (the running totals, :class:`~lightning_select.policies.weight_stats.WeightStatistics`), and one
    boolean all-reduce at the first step of each fit (the cross-entropy check, below). Reference:
    "Focal Loss for Dense Object Detection", ICCV 2017 (RetinaNet); checked against the hand formula
    (torchvision's ``sigmoid_focal_loss`` is not a dependency). Defaults: ``γ = 2`` (the paper);
    ``α = None`` (no class weighting; the paper's ``α = 0.25`` is for its binary *sigmoid* form, see
    below); the loss normalised by the number of rows (the paper normalises by a count, the anchors
    assigned to objects, not by the weights); no weight cap.

    **The exact focal gradient** (``match="gradient"``, the default). The engine treats weights as
    constants, so the weights ``w = α_t (1 − p_t)^γ`` give ``Σ w·CE`` the focal loss's *value* but not
    its gradient: the term from differentiating ``(1 − p_t)^γ`` is missing. Because the focal loss
    depends on the logits only through ``p_t``, and ``∇_z p_t = −p_t ∇_z CE``, its gradient is the
    cross-entropy's gradient times ``α_t (1 − p_t)^γ (1 + γ p_t CE / (1 − p_t))``
    (:func:`~lightning_select.rules.weighting.focal_gradient_weights`). These weights, with the count
    normalisation, make the trained gradient *equal* the gradient of the batch's mean focal loss (a
    Trainer test checks it against a hand-written focal loss). The reduced loss the engine returns is
    then ``mean(w·CE)``, not the focal loss; the focal loss itself is logged as ``focal/loss``.
    ``match="value"`` uses ``α_t (1 − p_t)^γ`` (``w·CE = FL`` per row, a smaller gradient for
    mid-confidence rows; the "detached focal weight" that weighting frameworks often ship).

    The identity needs the per-sample loss to be the softmax cross-entropy of ``logits`` against the
    batch's ``target_key`` (``NoisyLabelClassifier`` returns exactly that). At the first step of every
    fit each rank checks this on its batch and all ranks raise together if any differs (label
    smoothing, another loss); ``check_loss=False`` skips the check and weights whatever loss it is.

    **α for multi-class.** ``None``: ``α_t = 1``. A number: a constant factor (it only scales the
    loss, like the learning rate). ``C`` per-class values: ``α_t = alpha[target]``; for two softmax
    classes the paper's binary ``α = 0.25`` is ``alpha=[0.75, 0.25]``.

    **Normalisation.** ``normalise="count"`` (default) sets ``normalise_by_count``: the engine divides
    ``Σ w·CE`` by the global number of trained rows, so the loss is the mean focal loss. It applies to
    the whole step: combined with a policy that zeroes weights (``OHEM(mode="weight")``,
    ``EntropySelection``), those rows then count in the denominator. ``"weight_sum"`` divides by
    ``Σ w`` instead (a self-normalised focal loss whose scale does not shrink as rows become easy).

    ``max_weight_ratio`` caps every weight at that multiple of the step's mean weight
    (:func:`~lightning_select.rules.weighting.bound_weights`, exact, total kept); the gradient is then
    no longer the focal loss's. Under DDP the cap and the statistics are per rank; the normalisation is
    global (the engine's).

    Logs ``focal/weight_mean``, ``focal/max_mean_ratio``, ``focal/ess_fraction``, ``focal/pt_mean``
    (the mean probability of the target class) and ``focal/loss``.

    Args:
        gamma: the focusing parameter ``γ >= 0`` (0: plain cross-entropy).
        alpha: None, a positive number, or ``C`` non-negative per-class values (see above).
        max_weight_ratio: None (no cap) or the largest ``max(w)/mean(w)`` per step, ``>= 1``.
        target_key: the batch key of the class targets.
        match: ``"gradient"`` (the focal loss's exact gradient) or ``"value"`` (``w·CE = FL``).
        normalise: ``"count"`` or ``"weight_sum"`` (see above).
        check_loss: check at the first step that the per-sample loss is the cross-entropy.

    Example::

        >>> policy = FocalWeighting(gamma=2.0)
        >>> policy.normalise_by_count, policy.needs_scores, policy.needs_per_sample_loss
        (True, False, True)
        >>> # Trainer(callbacks=[policy]).fit(NoisyLabelClassifier(), NoisyDigitsDataModule())
    """

    order = 300

    def __init__(self, gamma: float = 2.0, alpha: Union[None, float, Sequence[float], Tensor] = None,
                 max_weight_ratio: Optional[float] = None, target_key: str = "label",
                 match: Literal["gradient", "value"] = "gradient", normalise: Literal["count", "weight_sum"] = "count",
                 check_loss: bool = True) -> None:
        who = type(self).__name__
        gamma = real_option(who, "gamma", gamma)
        if gamma < 0:
            raise ValueError(f"{who}: expected `gamma` >= 0 (the focusing parameter; 0 is plain cross-entropy, the "
                             f"paper uses 2), but got {gamma}.")
        self.gamma = gamma
        self.alpha = _checked_alpha(who, alpha)
        self.max_weight_ratio = _checked_ratio(who, max_weight_ratio)
        self.target_key = str_option(who, "target_key", target_key)
        self.match = str_option(who, "match", match)
        if self.match not in ("gradient", "value"):
            raise ValueError(f"{who}: expected `match` to be 'gradient' (the focal loss's exact gradient) or 'value' "
                             f"(w·CE equals the focal loss per row), but got {match!r}.")
        self.normalise = str_option(who, "normalise", normalise)
        if self.normalise not in ("count", "weight_sum"):
            raise ValueError(f"{who}: expected `normalise` to be 'count' (the mean focal loss) or 'weight_sum', "
                             f"but got {normalise!r}.")
        self.normalise_by_count = self.normalise == "count"
        self.check_loss = bool_option(who, "check_loss", check_loss)
        self.stats = WeightStatistics("focal", "pt_mean")
        self._checked = False

    def _inputs(self, ctx: StepContext) -> tuple[Tensor, Tensor]:
        n = ctx.rows.numel()
        logits = ctx.output_field("logits")
        if logits is None or logits.dim() != 2 or logits.shape[0] != n:
            got = "no 'logits'" if logits is None else f"'logits' of shape {tuple(logits.shape)}"
            raise SelectionError(
                f"FocalWeighting needs training_step to return {{'loss': per_sample_losses, 'logits': logits}} with "
                f"logits of shape [{n}, C] (read with ctx.output_field('logits')), but it returned {got}.")
        targets = ctx.row_column(self.target_key, f"FocalWeighting(target_key={self.target_key!r})", "class targets",
                                 "set target_key to the batch key of the labels")
        if isinstance(self.alpha, Tensor) and self.alpha.numel() != logits.shape[1]:
            raise SelectionError(f"FocalWeighting got {self.alpha.numel()} per-class `alpha` values but logits with "
                                 f"{logits.shape[1]} classes; give one value per class.")
        return logits.detach(), targets.to(logits.device)

    def _check(self, ctx: StepContext, logits: Tensor, targets: Tensor) -> None:
        """Once per fit, on every rank together: is the per-sample loss the cross-entropy of the logits?"""
        self._checked = True
        assert ctx.losses is not None
        problem = None
        ce = -_log_pt(logits, targets)
        losses, ce = ctx.losses.detach().float(), ce.to(ctx.losses.device, torch.float32)
        finite = torch.isfinite(losses) & torch.isfinite(ce)  # a non-finite loss is the engine's nan_policy's
        if not torch.allclose(losses[finite], ce[finite], rtol=1e-4, atol=1e-5):
            worst = int(((losses - ce).abs() * finite).nan_to_num(0.0).argmax())
            problem = (f"row {worst}: loss {float(losses[worst]):.6g}, cross-entropy of the logits against "
                       f"{self.target_key!r} {float(ce[worst]):.6g}")
        raise_together(ctx.trainer, problem, (
            f"FocalWeighting(match={self.match!r}): the per-sample loss is not the softmax cross-entropy of "
            f"training_step's 'logits' against the batch's {self.target_key!r}, so the weights would not give the "
            "focal loss. Return F.cross_entropy(logits, targets, reduction='none') as the loss (no label smoothing, "
            "no class weights: use `alpha` for those), or pass check_loss=False to weight this loss anyway."))

    def sample_weights(self, ctx: StepContext) -> Tensor:
        logits, targets = self._inputs(ctx)
        if self.check_loss and not self._checked:
            self._check(ctx, logits, targets)
        rule = focal_gradient_weights if self.match == "gradient" else focal_weights
        weights = rule(logits, targets, self.gamma, self.alpha)
        if self.max_weight_ratio is not None and ctx.has_samples:
            weights = bound_weights(weights, self.max_weight_ratio)
        if ctx.has_samples:
            pt = _log_pt(logits, targets).exp()
            self.stats.stage(weights, pt)
            if ctx.should_log:
                ctx.log("focal/loss", focal_loss(logits, targets, self.gamma, self.alpha).mean())
        return weights

    @override
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._checked = False  # every fit checks its first step


def _checked_alpha(who: str, alpha: Any) -> Union[None, float, Tensor]:
    if alpha is None:
        return None
    if isinstance(alpha, (int, float)) and not isinstance(alpha, bool):
        if not alpha > 0:
            raise ValueError(f"{who}: expected `alpha` > 0 (a constant factor), None (no class weighting) or one "
                             f"value >= 0 per class, but got {alpha}.")
        return float(alpha)
    try:
        table = torch.as_tensor(list(alpha) if not isinstance(alpha, Tensor) else alpha, dtype=torch.float32)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{who}: expected `alpha` to be None, a number or a list of per-class numbers, but got "
                        f"{alpha!r}.") from err
    if table.dim() != 1 or table.numel() < 2 or bool((table < 0).any()) or not bool(torch.isfinite(table).all()):
        raise ValueError(f"{who}: expected per-class `alpha` as one finite value >= 0 per class (at least 2), but got "
                         f"{table.tolist()}.")
    return table


def _checked_ratio(who: str, ratio: Any) -> Optional[float]:
    ratio = real_option(who, "max_weight_ratio", ratio, optional=True)
    if ratio is not None and ratio < 1:
        raise ValueError(f"{who}: expected `max_weight_ratio` >= 1 (the largest max/mean weight ratio per step; 1 makes "
                         f"every weight equal) or None (no cap), but got {ratio}.")
    return ratio
