"""``ImportanceSampling``: train on an importance-resampled subset of a larger loaded batch, unbiased."""

from __future__ import annotations

from typing import Any, Literal, Optional

import torch
from torch import Tensor

from lightning_select.core import SelectionError, SelectionPolicy, StepContext
from lightning_select.core.options import bool_option, int_option, real_option, str_option
from lightning_select.rules.importance import (
    gradient_norm_bound,
    importance_resample,
    sampling_probabilities,
    variance_reduction,
)


class ImportanceSampling(SelectionPolicy):
    """Importance sampling with unbiased weights (Katharopoulos & Fleuret, 2018).

    **Card.** What it changes: the selection (``b`` of the loaded ``B`` rows, drawn with replacement,
    ``p ∝ score``) and the weights (``1/(B·p_i)``). Unbiased: yes, the reduction divides by the number
    of trained rows (``normalise_by_count``), so the loss is an unbiased estimate of the loaded batch's
    mean loss. Extra cost: one no-grad scoring forward over the ``B`` loaded rows, and one host sync
    per step for the switch-on test (plus one scalar all-reduce under DDP). Reference: "Not All
    Samples Are Created Equal: Deep Learning with Importance Sampling", ICML 2018. Defaults: ``keep = 1/3`` (the paper presamples ``B = 3b``),
    the gradient-norm bound ``‖softmax − onehot‖`` as the score, and switch-on when the EMA (0.9) of
    the variance reduction ``τ`` exceeds ``(B + 3b)/(3b)``. Until then a uniform subset of ``b`` rows
    is trained with weight 1.

    Load the larger batch ``B`` in the DataLoader (e.g. ``data.batch_size=384`` for ``b = 128``).
    Under DDP each rank resamples from its own loaded batch, and ``τ`` is averaged over the ranks
    (one small all-reduce per step), so every rank switches on at the same step and the
    checkpointed ``τ`` is the same on every rank.

    Args:
        keep: ``b / B``, the trained fraction of the loaded batch, in (0, 1].
        score: ``"gradient_norm"`` (needs ``training_step`` to return ``{"loss": [B], "logits": [B, C]}``
            and the batch to hold ``target_key``) or ``"loss"`` (the scoring pass's per-sample loss;
            works for any per-sample loss, e.g. the contrastive default).
        target_key: batch key of the class targets for ``"gradient_norm"``.
        tau_threshold: switch-on threshold for the EMA of ``τ``; None uses ``(B + 3b)/(3b)``.
        always_on: importance-sample from the first step (no switch-on test).
        tau_ema: EMA factor of ``τ``.
        smoothing: add ``smoothing·mean(score)`` to every score (bounds the weights; 0 = the paper).
        scoring_mode: ``"eval"`` or ``"train"`` mode of the scoring pass.
        seed: seed of the position-seeded draws (``StepContext.generator``).

    Example::

        >>> policy = ImportanceSampling(keep=1 / 3, score="loss")
        >>> policy.normalise_by_count, policy.needs_scores
        (True, True)
    """

    order = 200
    needs_scores = True
    loads_larger_batch = True
    normalise_by_count = True

    def __init__(self, keep: float = 1 / 3, score: Literal["gradient_norm", "loss"] = "gradient_norm",
                 target_key: str = "label", tau_threshold: Optional[float] = None, always_on: bool = False,
                 tau_ema: float = 0.9, smoothing: float = 0.0, scoring_mode: Literal["eval", "train"] = "eval",
                 seed: int = 0) -> None:
        who = type(self).__name__
        keep = real_option(who, "keep", keep)
        if not 0.0 < keep <= 1.0:
            raise ValueError(f"{who}: expected `keep` in (0, 1], but got {keep}.")
        if score not in ("gradient_norm", "loss"):
            raise ValueError(f"{who}: expected `score` to be 'gradient_norm' or 'loss', but got {score!r}.")
        if scoring_mode not in ("eval", "train"):
            raise ValueError(f"{who}: expected `scoring_mode` to be 'eval' or 'train', but got {scoring_mode!r}.")
        tau_ema = real_option(who, "tau_ema", tau_ema)
        if not 0.0 <= tau_ema < 1.0:
            raise ValueError(f"{who}: expected `tau_ema` in [0, 1), but got {tau_ema}.")
        smoothing = real_option(who, "smoothing", smoothing)
        if smoothing < 0:
            raise ValueError(f"{who}: expected `smoothing` >= 0, but got {smoothing}.")
        self.keep, self.score, self.target_key = keep, score, str_option(who, "target_key", target_key)
        self.tau_threshold = real_option(who, "tau_threshold", tau_threshold, optional=True)
        self.always_on = bool_option(who, "always_on", always_on)
        self.tau_ema, self.smoothing, self.scoring_mode = tau_ema, smoothing, scoring_mode
        self.seed = int_option(who, "seed", seed)
        self.tau: Optional[float] = None  # EMA of the variance reduction (checkpointed)
        self._weights: Optional[Tensor] = None

    def _scores(self, ctx: StepContext) -> Tensor:
        assert ctx.scores is not None
        if self.score == "loss":
            return ctx.scores
        logits = ctx.output_field("logits", phase="score")
        targets = ctx.batch.get(self.target_key) if isinstance(ctx.batch, dict) else None
        if logits is None or not isinstance(targets, Tensor):
            raise SelectionError(
                "ImportanceSampling(score='gradient_norm') needs training_step to return "
                "{'loss': per_sample_losses, 'logits': logits} and the batch to hold the class targets under "
                f"{self.target_key!r}; or use score='loss'."
            )
        return gradient_norm_bound(logits, targets)

    def select(self, ctx: StepContext) -> Tensor:
        loaded = ctx.rows.numel()
        count = max(1, round(self.keep * loaded))
        scores = self._scores(ctx)
        p = sampling_probabilities(scores, self.smoothing)
        tau = variance_reduction(p)
        if ctx.world_size > 1:  # one decision for all ranks: the mean tau (every rank calls this each step)
            tau = ctx.trainer.strategy.reduce(tau.to(scores.device), reduce_op="mean")
        tau_now = float(tau)
        self.tau = tau_now if self.tau is None else self.tau_ema * self.tau + (1 - self.tau_ema) * tau_now
        threshold = self.tau_threshold or (loaded + 3 * count) / (3 * count)
        active = self.always_on or self.tau > threshold
        generator = ctx.generator(self.seed)
        if active:
            positions, weights = importance_resample(scores, count, generator, self.smoothing)
        else:
            positions = torch.randperm(loaded, generator=generator)[:count].sort().values.to(scores.device)
            weights = torch.ones(count, device=scores.device)
        self._weights = weights
        ctx.log("is/tau", tau_now)
        ctx.log("is/tau_ema", self.tau)
        ctx.log("is/active", float(active))
        ctx.log("is/score_mean", scores.float().mean())
        ctx.log("is/weight_max", weights.max())
        return positions

    def sample_weights(self, ctx: StepContext) -> Optional[Tensor]:
        weights = self._weights
        if weights is not None and weights.numel() != ctx.rows.numel():
            raise SelectionError(
                "ImportanceSampling must be the last policy that selects rows: a later selector changed the batch "
                f"from {weights.numel()} to {ctx.rows.numel()} rows, so the importance weights no longer apply."
            )
        return weights

    def state_dict(self) -> dict[str, Any]:
        return {"tau": self.tau}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.tau = state_dict.get("tau")
