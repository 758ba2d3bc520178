"""Hardness-weighted in-batch negatives: sentence-transformers' ``MultipleNegativesRankingLoss``
``hardness_mode``, as a logit edit.

For anchor row ``i`` and a *negative* candidate ``j`` with student cosine similarity ``s_ij`` the
logit becomes

    z_ij = s_ij / τ + α · stopgrad(s_ij)

(Lan et al. 2025, "LLaVE", Eq. 5; sentence-transformers 6.2.0 ``hardness_strength = α``). The bonus
is in logit units: it is added *after* the temperature scaling and is not divided by τ (the
reference computes ``cos·scale + α·cos``). Equivalently, each negative's term in the softmax
denominator is multiplied by the constant ``w_ij = exp(α·s_ij)``: harder negatives (larger ``s``)
count more, negatives with ``s < 0`` count less. The positive (target) logit never changes, and the
bonus carries no gradient.

Which entries are negatives (``mode``, the reference's names; ``o+i`` is row ``i``'s own column):

* ``"in_batch_negatives"``: the other rows' positives (``AP_ij``, ``j ≠ o+i``) and the other rows'
  hard negatives (``AN_k,ij``, ``j ≠ o+i``);
* ``"hard_negatives"``: the row's own hard negatives only (``AN_k,i,o+i``);
* ``"all_negatives"``: both, i.e. everything except the positive.

The reference adds the bonus only to its query-to-document scores (``AP`` and ``AN``), never to its
``query_to_query``/``doc_to_doc`` directions. GIST's ``AA``/``PP`` blocks are those directions, so by
default they get no bonus either; ``same_type_blocks=True`` (not in the reference) weights their
off-self entries like in-batch negatives. Self-pairs (``AA_ii``, ``PP_i,o+i``) are never negatives.
An entry that an earlier edit masked to −inf (a GIST-flagged false negative) gets no bonus and stays
−inf: masking first, weighting what is left.

Example::

    >>> import torch
    >>> from lightning_select.rules.contrastive import EmbeddingOutput, build_logits
    >>> a, p = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    >>> logits = build_logits(EmbeddingOutput(a, p, temperature=0.5))    # AP = [[1, .6], [0, .8]]
    >>> stats = apply_hardness(logits, alpha=2.0)                         # + 2·s off the diagonal
    >>> [[round(v, 4) for v in row] for row in logits.logits().tolist()]
    [[2.0, 2.4], [0.0, 1.6]]
    >>> int(stats["negatives"]), int(stats["weighted"]), round(float(stats["bonus_sum"]), 4)
    (2, 2, 1.2)
"""

from __future__ import annotations

import re
from typing import Literal, Optional

import torch
from torch import Tensor

from lightning_select.rules.contrastive import ContrastiveLogits, EmbeddingOutput, build_logits

HardnessMode = Literal["in_batch_negatives", "hard_negatives", "all_negatives"]
HARDNESS_MODES = ("in_batch_negatives", "hard_negatives", "all_negatives")
#: The running totals :func:`apply_hardness` returns (fp64 scalars), in this order.
HARDNESS_FIELDS = ("negatives", "weighted", "masked", "bonus_sum", "bonus_sq_sum", "weight_sum")
_HARD_NEGATIVE_BLOCK = re.compile(r"an\d+")


def hardness_bonus(scores: Tensor, alpha: float, negatives: Tensor) -> Tensor:
    """``[B, C]`` logit bonus: ``α·stopgrad(scores)`` where ``negatives`` is True, 0 elsewhere."""
    return torch.where(negatives, alpha * scores.detach(), torch.zeros((), dtype=scores.dtype, device=scores.device))


def hardness_logits(scores: Tensor, temperature: float, alpha: float, negatives: Tensor,
                    mask: Optional[Tensor] = None) -> Tensor:
    """``[B, C]`` logits of one block: ``s/τ + α·stopgrad(s)`` on ``negatives``, −inf where ``mask``.

    The tensor form of the rule. ``negatives`` should exclude the positives; a masked entry stays
    −inf whatever ``negatives`` says."""
    z = scores / temperature + hardness_bonus(scores, alpha, negatives)
    return z if mask is None else z.masked_fill(mask, float("-inf"))


def negative_masks(logits: ContrastiveLogits, mode: HardnessMode = "in_batch_negatives",
                   same_type_blocks: bool = False) -> dict[str, Tensor]:
    """``{block name: [B, C] bool}``: the entries ``mode`` calls negatives, before any masking.

    Blocks ``ap``, ``an<k>`` and (with ``same_type_blocks``) ``aa``/``pp`` take part; other blocks
    (none are built by this library) are left out. The row's own column (``target``; the diagonal of
    ``aa``) is never a negative, except the own hard negative in modes ``hard_negatives`` and
    ``all_negatives``; nor is an extra positive (``LogitBlock.positive``, GIST's ``attract`` mode)."""
    if mode not in HARDNESS_MODES:
        raise ValueError(f"Expected `mode` in {HARDNESS_MODES}, but got {mode!r}.")
    rows = torch.arange(logits.target.shape[0], device=logits.target.device)
    out: dict[str, Tensor] = {}
    for block in logits.blocks:
        hard = _HARD_NEGATIVE_BLOCK.fullmatch(block.name) is not None
        if block.name not in ("ap", "aa", "pp") and not hard:
            continue
        own = torch.zeros(block.scores.shape, dtype=torch.bool, device=block.scores.device)
        own[rows, rows if block.name == "aa" else logits.target] = True
        nothing = torch.zeros_like(own)
        if hard:
            out[block.name] = {"in_batch_negatives": ~own, "hard_negatives": own,
                               "all_negatives": ~nothing}[mode]
        elif block.name == "ap" or same_type_blocks:
            out[block.name] = nothing if mode == "hard_negatives" else ~own
        if block.name in out and block.positive is not None:  # GIST's attracted false negatives are positives
            out[block.name] = out[block.name] & ~block.positive
    return out


def apply_hardness(logits: ContrastiveLogits, alpha: float, mode: HardnessMode = "in_batch_negatives",
                   same_type_blocks: bool = False) -> dict[str, Tensor]:
    """Add the hardness bonus in place (``LogitBlock.add_bias``) and return what it did.

    Every negative of :func:`negative_masks` that is not masked gets ``α·stopgrad(s)``; masked ones
    (e.g. by :func:`~lightning_select.rules.gist.apply_gist`, which must run first) stay −inf.

    Returns:
        fp64 scalars (:data:`HARDNESS_FIELDS`): ``negatives`` (entries ``mode`` calls negatives),
        ``weighted`` (of those, the unmasked ones that got the bonus), ``masked`` (the masked ones),
        ``bonus_sum``/``bonus_sq_sum`` (Σ and Σ² of the bonus over weighted entries) and
        ``weight_sum`` (Σ ``exp(bonus)``, the equivalent weights in the softmax denominator); plus
        ``bonus_max`` (−inf when nothing was weighted), which is not a sum.
    """
    device = logits.target.device
    totals = torch.zeros(len(HARDNESS_FIELDS), dtype=torch.float64, device=device)
    bonus_max = torch.tensor(float("-inf"), dtype=torch.float64, device=device)
    for name, negatives in negative_masks(logits, mode, same_type_blocks).items():
        block = logits.block(name)
        masked = negatives & block.mask if block.mask is not None else torch.zeros_like(negatives)
        weighted = negatives & ~masked
        bonus = hardness_bonus(block.scores, alpha, weighted)
        block.add_bias(bonus)
        b = bonus.double()[weighted]
        totals += torch.stack([negatives.sum().double(), weighted.sum().double(), masked.sum().double(), b.sum(),
                               b.square().sum(), b.exp().sum()])
        if b.numel():
            bonus_max = torch.maximum(bonus_max, b.max())
    return {**dict(zip(HARDNESS_FIELDS, totals.unbind())), "bonus_max": bonus_max}


def hardness_loss(anchor: Tensor, positive: Tensor, negatives: Optional[Tensor] = None, *, alpha: float,
                  temperature: float = 0.05, mode: HardnessMode = "in_batch_negatives") -> Tensor:
    """``[B]`` per-row hardness-weighted MNRL losses for one process. Their mean is sentence-transformers'
    ``MultipleNegativesRankingLoss(scale=1/τ, hardness_mode=mode, hardness_strength=α)``."""
    logits = build_logits(EmbeddingOutput(anchor, positive, negatives, temperature))
    apply_hardness(logits, alpha, mode)
    return logits.per_row_loss()
