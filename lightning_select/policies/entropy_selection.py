"""``EntropySelection``: EATA's reliable and non-redundant sample filter and entropy weights, for training."""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor

from lightning_select.core import SelectionError, SelectionPolicy, StepContext
from lightning_select.core.options import bool_option, int_option, real_option
from lightning_select.rules.entropy import (
    eata_weights,
    prediction_entropy,
    redundancy_mask,
    reliable_mask,
    update_moving_average,
)


class EntropySelection(SelectionPolicy):
    """EATA's sample filter and weights (Niu et al., 2022), applied as per-sample weights.

    **Card.** What it changes: the weights. A row is kept when it is *reliable* (prediction entropy
    ``E < E0``, ``E0 = entropy_fraction·ln C``) and *non-redundant* (``|cos(softmax, m)| < ε``, with ``m``
    the moving average of the softmax outputs of previously kept rows); kept rows get ``exp(E0 − E)``
    (EATA's ``1/exp(E − E0)``; 1 with ``weight=False``), filtered rows get weight 0. Unbiased: no, by
    design: it trains on the confident, non-redundant rows only, weighted towards the most confident.
    Extra cost: none in forward passes (no scoring pass), a ``[B, C]`` softmax per step, and under DDP
    one ``C + 1``-element all-reduce per step (the moving-average update). Reference: "Efficient
    Test-Time Model Adaptation without Forgetting", ICML 2022; checked against the public EATA code
    (``mr-eggplant/EATA``, ``eata.py``: ``softmax_entropy``, ``update_model_probs``). Defaults: the
    paper's ``E0 = 0.4·ln C``, ``ε = 0.05``, momentum 0.9.

    **Why weights and not a selection.** The selection stage runs before the training pass, but EATA
    filters on the logits of the very forward pass it adapts with. So this policy reads the training
    pass's logits (``ctx.output_field("logits")``) in :meth:`sample_weights` and gives the filtered
    rows weight 0. They then contribute nothing to the loss or the gradient, exactly as in EATA, and
    the forward cost is the full batch, as in EATA's test-time setting (it too forwards every sample
    and filters afterwards). One difference: the engine's reduction is ``Σ w·ℓ / Σ w`` over the kept
    rows, where EATA's code takes ``Σ w·ℓ / n_kept``; the gradient direction is the same, its
    scale differs by the step's mean kept weight. A step where no row is kept gives a zero loss.

    **State.** The moving average ``m`` (``[C]`` fp32) is updated in :meth:`observe` from the softmax
    of the kept rows, with EATA's rule (``m ← momentum·m + (1 − momentum)·mean``, initialised by the
    first step that keeps a row). Under DDP the mean is over the kept rows of every rank (each rank's
    sum of softmax outputs and count are averaged with ``trainer.strategy.reduce(..., "mean")``, which
    every rank calls every step), so every rank holds the same ``m``. ``m`` is checkpointed
    (``state_dict``), so a resumed run filters exactly as an uninterrupted one.

    **Test-time adaptation.** With a ``training_step`` that returns the per-sample prediction entropy as
    the loss, ``{"loss": prediction_entropy(logits), "logits": logits}``, this policy performs EATA's
    sample-efficient entropy minimisation on unlabelled data (up to the reduction's scale, above).
    EATA's anti-forgetting Fisher regulariser is **not** implemented; add it to the loss in the module
    if needed.

    Training from scratch: an untrained model's entropy is near ``ln C``, so the paper's ``E0`` keeps
    nothing until the model is confident; and with few classes the cosine of two softmax outputs is
    rarely below 0.05. Use a larger ``entropy_fraction`` (≥ 1 turns the reliability filter off) and
    ``epsilon`` (> 1 turns the redundancy filter off) there.

    Needs ``training_step`` to return ``{"loss": [B], "logits": [B, C]}``.

    Args:
        entropy_fraction: ``E0 / ln C``, > 0.
        epsilon: the cosine-similarity threshold ``ε``, > 0.
        momentum: momentum of the moving average of kept softmax outputs, in [0, 1).
        weight: weight kept rows by ``exp(E0 − E)``; False gives them weight 1.
        num_classes: ``C``; None reads it from the logits' width.

    Example::

        >>> policy = EntropySelection(entropy_fraction=0.4, epsilon=0.05)
        >>> policy.moving_average is None, policy.needs_scores
        (True, False)
        >>> round(policy.threshold(10), 4)
        0.921
    """

    order = 300

    def __init__(self, entropy_fraction: float = 0.4, epsilon: float = 0.05, momentum: float = 0.9,
                 weight: bool = True, num_classes: Optional[int] = None) -> None:
        who = type(self).__name__
        entropy_fraction = real_option(who, "entropy_fraction", entropy_fraction)
        if entropy_fraction <= 0:
            raise ValueError(f"{who}: expected `entropy_fraction` > 0 (E0 = entropy_fraction·ln C; the paper uses 0.4), "
                             f"but got {entropy_fraction}.")
        epsilon = real_option(who, "epsilon", epsilon)
        if epsilon <= 0:
            raise ValueError(f"{who}: expected `epsilon` > 0 (the cosine threshold; the paper uses 0.05), but got {epsilon}.")
        momentum = real_option(who, "momentum", momentum)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"{who}: expected `momentum` in [0, 1) (the paper uses 0.9), but got {momentum}.")
        self.entropy_fraction, self.epsilon, self.momentum = entropy_fraction, epsilon, momentum
        self.weight = bool_option(who, "weight", weight)
        self.num_classes = int_option(who, "num_classes", num_classes, minimum=2, optional=True)
        self.moving_average: Optional[Tensor] = None  # [C] fp32 (checkpointed)
        self._kept_probs: Optional[Tensor] = None     # softmax of this step's kept rows, for observe

    def threshold(self, num_classes: int) -> float:
        """``E0 = entropy_fraction · ln C``."""
        return self.entropy_fraction * math.log(num_classes)

    def _logits(self, ctx: StepContext) -> Tensor:
        logits = ctx.output_field("logits")
        if logits is None or logits.dim() != 2 or logits.shape[0] != ctx.rows.numel():
            got = "no 'logits'" if logits is None else f"'logits' of shape {tuple(logits.shape)}"
            raise SelectionError(
                f"EntropySelection needs training_step to return {{'loss': per_sample_losses, 'logits': logits}} with "
                f"logits of shape [{ctx.rows.numel()}, C], but it returned {got}."
            )
        if self.num_classes is not None and logits.shape[1] != self.num_classes:
            raise SelectionError(
                f"EntropySelection(num_classes={self.num_classes}) got logits with {logits.shape[1]} classes; "
                "set num_classes to the logits' width, or None to read it from the logits."
            )
        return logits.detach()

    def sample_weights(self, ctx: StepContext) -> Tensor:
        logits = self._logits(ctx)
        e0 = self.threshold(self.num_classes or logits.shape[1])
        entropy = prediction_entropy(logits)
        probs = torch.softmax(logits.float(), dim=-1)
        keep = reliable_mask(entropy, e0) & redundancy_mask(probs, self.moving_average, self.epsilon)
        if not ctx.has_samples:  # every row was deselected by another policy: the stand-in row is not kept
            keep = torch.zeros_like(keep)
        kept_weights = eata_weights(entropy, e0) if self.weight else torch.ones_like(entropy)
        weights = torch.where(keep, kept_weights, torch.zeros_like(kept_weights))
        self._kept_probs = probs[keep]
        ctx.log("eata/kept_fraction", keep.float().mean())
        ctx.log("eata/entropy_mean", entropy.mean())
        ctx.log("eata/weight_mean", weights.mean())
        return weights

    def observe(self, ctx: StepContext) -> None:
        kept = self._kept_probs
        self._kept_probs = None
        if kept is None:
            return
        if ctx.world_size > 1:  # the mean over every rank's kept rows; every rank calls this each step
            parts = torch.cat([kept.sum(dim=0), kept.new_tensor([float(kept.shape[0])])])
            parts = ctx.trainer.strategy.reduce(parts, reduce_op="mean")
            count = float(parts[-1])
            kept = (parts[:-1] / parts[-1]).unsqueeze(0) if count > 0 else parts[:0].reshape(0, kept.shape[1])
        self.moving_average = update_moving_average(self.moving_average, kept, self.momentum)

    def state_dict(self) -> dict[str, Any]:
        return {"moving_average": None if self.moving_average is None else self.moving_average.detach().cpu().clone()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        average = state_dict.get("moving_average")
        self.moving_average = None if average is None else average.clone().float()
