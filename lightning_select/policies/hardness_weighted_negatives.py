"""``HardnessWeightedNegatives``: hardness-weighted in-batch negatives (sentence-transformers' MNRL
``hardness_mode``) as a stage-4 logit edit that composes with ``GuidedNegatives``."""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from torch import Tensor

from lightning_select.core import SelectionError, SelectionPolicy, StepContext
from lightning_select.core.engine import override
from lightning_select.core.options import bool_option, real_option, str_option
from lightning_select.rules.contrastive import ContrastiveLogits
from lightning_select.rules.hardness import HARDNESS_FIELDS, HARDNESS_MODES, HardnessMode, apply_hardness


class HardnessWeightedNegatives(SelectionPolicy):
    """Add ``α·stopgrad(s_ij)`` to the logit of every in-batch negative (harder negatives count more).

    **Card.** What it changes: the contrastive logits (an additive, gradient-free bonus on the
    negatives' logits; no row is dropped or weighted). Unbiased: no, by design: it trains a different
    objective, InfoNCE whose softmax denominator weights negative ``j`` of row ``i`` by
    ``exp(α·s_ij)``. Extra cost: no extra forward pass; one elementwise pass over the ``[B, C]``
    logits per step; under DDP one 6-element all-reduce per step (the running totals). Reference:
    Lan et al. 2025, "LLaVE" (Eq. 5), as implemented by sentence-transformers 6.2.0's
    ``MultipleNegativesRankingLoss(hardness_mode=..., hardness_strength=α)``; our loss equals it to
    1e-5 (value and gradients) in all three modes, also with its ``query_to_query``/``doc_to_doc``
    directions (tests/test_hardness.py). Defaults: ``mode="in_batch_negatives"`` (the mode Lan et
    al. define) and ``α = 9`` (the value the reference's docs give for that mode, from Lan et al.);
    the reference's own default ``hardness_strength=0.0`` switches it off. The bonus is in logit
    units, added after the division by τ (as the reference), so the same α is a stronger edit at a
    larger τ. ``same_type_blocks=False`` as the reference (see below).

    The rule is :func:`~lightning_select.rules.hardness.apply_hardness`. Modes, as the reference:
    ``"in_batch_negatives"`` (other rows' positives and hard negatives), ``"hard_negatives"`` (the
    row's own hard negatives only; refused when ``training_step`` returns none, where the reference
    silently does nothing) and ``"all_negatives"`` (everything but the positive).

    **With** :class:`~lightning_select.policies.guided_negatives.GuidedNegatives` **(GIST) in one step.**
    ``order = 400`` runs this edit after GIST's (``order = 300``) whatever the callbacks' order in
    the ``Trainer``: GIST first masks the guide-flagged false negatives to −inf and adds its AA/PP
    blocks, then the bonus goes to the negatives that are left; a masked entry gets no bonus and
    stays −inf. The AA/PP blocks: the reference weights only query-to-document scores, never its
    same-type ``query_to_query``/``doc_to_doc`` directions, which is what GIST's AA/PP blocks are, so by
    default they get no bonus (GIST still masks them). ``same_type_blocks=True`` treats them as GIST
    does, as in-batch negatives: their unmasked off-self entries get the bonus too (not in the
    reference). Self-pairs (``a_i·a_i``, ``p_i·p_i``) never get it. With GIST's
    ``gather_across_devices`` the bonus applies to every rank's candidates (GIST rebuilds the blocks
    first). The edit also runs in the scoring pass (``ctx.phase == "score"``), so scores are losses of
    the objective being trained; only the training pass is recorded.

    Logs (this rank, the engine's cadence): ``hardness/weighted_fraction`` (the share of the mode's
    negatives that got the bonus), ``hardness/masked_fraction`` (the share an earlier edit, i.e.
    GIST, had masked, so untouched; the two add up to 1), ``hardness/bonus_mean`` and
    ``hardness/bonus_max`` (the bonus ``α·s`` in logit units) and ``hardness/weight_mean`` (the mean
    equivalent weight ``exp(α·s)``). The totals over training (:meth:`summary`; steps, negatives,
    weighted, masked, Σ bonus, Σ bonus², Σ weight in fp64, summed over every rank) are checkpointed.

    Args:
        alpha: the strength ``α >= 0`` (finite); 0 leaves the logits unchanged (with a warning).
        mode: ``"in_batch_negatives"``, ``"hard_negatives"`` or ``"all_negatives"``.
        same_type_blocks: also weight GIST's AA/PP blocks (see above).

    Example::

        >>> from lightning_select import GuidedNegatives, HardnessWeightedNegatives
        >>> hardness = HardnessWeightedNegatives(alpha=9.0)
        >>> hardness.order > GuidedNegatives.order, hardness.needs_embeddings
        (True, True)
        >>> # Trainer(callbacks=[hardness, GuidedNegatives("minilm")]).fit(TextEmbeddingModule(), SickDataModule())
    """

    order = 400  # stage 4 after GuidedNegatives (300): mask first, then weight what is left
    needs_embeddings = True

    def __init__(self, alpha: float = 9.0, mode: HardnessMode = "in_batch_negatives",
                 same_type_blocks: bool = False) -> None:
        who = type(self).__name__
        alpha = real_option(who, "alpha", alpha)
        if alpha < 0:
            raise ValueError(f"{who}: expected `alpha` >= 0 (the hardness strength; Lan et al. use 9, 0 switches it "
                             f"off), but got {alpha}. A negative α would make hard negatives count less.")
        if alpha == 0:
            warnings.warn(f"{who}: alpha=0 leaves the logits unchanged (hardness weighting is off).", UserWarning)
        self.alpha = alpha
        self.mode: HardnessMode = str_option(who, "mode", mode)  # type: ignore[assignment]
        if self.mode not in HARDNESS_MODES:
            raise ValueError(f"{who}: expected `mode` in {HARDNESS_MODES}, but got {mode!r}.")
        self.same_type_blocks = bool_option(who, "same_type_blocks", same_type_blocks)
        self.steps = 0
        self.sums = torch.zeros(len(HARDNESS_FIELDS), dtype=torch.float64)
        self._pending: Optional[Tensor] = None

    # ------------------------------------------------------------------ the logit stage
    def edit_logits(self, ctx: StepContext, logits: ContrastiveLogits) -> None:
        if self.mode == "hard_negatives" and ctx.embedding_output.negatives is None:
            raise SelectionError(
                "HardnessWeightedNegatives(mode='hard_negatives') weights the rows' own hard negatives, but "
                "training_step returned an EmbeddingOutput without `negatives`. Return "
                "EmbeddingOutput(anchor, positive, negatives=...) or use mode='in_batch_negatives'."
            )
        stats = apply_hardness(logits, self.alpha, self.mode, self.same_type_blocks)
        if ctx.phase != "train":
            return
        totals = torch.stack([stats[k] for k in HARDNESS_FIELDS])
        self._pending = totals if ctx.has_samples else torch.zeros_like(totals)
        if ctx.should_log and ctx.has_samples:
            negatives, weighted, masked = (float(stats[k]) for k in ("negatives", "weighted", "masked"))
            ctx.log("hardness/weighted_fraction", weighted / negatives if negatives else 0.0)
            ctx.log("hardness/masked_fraction", masked / negatives if negatives else 0.0)
            if weighted:
                ctx.log("hardness/bonus_mean", float(stats["bonus_sum"]) / weighted)
                ctx.log("hardness/bonus_max", float(stats["bonus_max"]))
                ctx.log("hardness/weight_mean", float(stats["weight_sum"]) / weighted)

    def observe(self, ctx: StepContext) -> None:
        """Add this step's counts (every rank's, under DDP) to the checkpointed totals."""
        device = ctx.losses.device if ctx.losses is not None else torch.device("cpu")
        local = self._pending if self._pending is not None else torch.zeros(len(HARDNESS_FIELDS), dtype=torch.float64)
        self._pending = None
        local = local.to(device)
        if ctx.world_size > 1:  # every rank observes every step
            local = ctx.trainer.strategy.reduce(local, reduce_op="sum")
        self.sums = self.sums.to(local.device) + local
        self.steps += 1

    def summary(self) -> dict[str, float]:
        """Totals so far: steps, negatives, the weighted and masked fractions, the bonus's mean and
        standard deviation, and the mean equivalent weight ``exp(α·s)``."""
        negatives, weighted, masked, b_sum, b_sq, w_sum = self.sums.tolist()
        nan = float("nan")
        mean = b_sum / weighted if weighted else nan
        return {"steps": self.steps, "negatives": int(negatives),
                "weighted_fraction": weighted / negatives if negatives else nan,
                "masked_fraction": masked / negatives if negatives else nan,
                "bonus_mean": mean, "bonus_std": max(b_sq / weighted - mean * mean, 0.0) ** 0.5 if weighted else nan,
                "weight_mean": w_sum / weighted if weighted else nan}

    # ------------------------------------------------------------------ state
    @property
    def state_key(self) -> str:
        return self._generate_state_key(alpha=self.alpha, mode=self.mode, same_type_blocks=self.same_type_blocks)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "sums": self.sums.detach().cpu().clone()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps = int(state_dict.get("steps", 0))
        if "sums" in state_dict:
            self.sums = state_dict["sums"].detach().clone().to(torch.float64)

    def get_config_dict(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "mode": self.mode, "same_type_blocks": self.same_type_blocks}
