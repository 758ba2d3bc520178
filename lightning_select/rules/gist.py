"""Guided in-batch false-negative filtering (GISTEmbed), the same math as sentence-transformers'
``GISTEmbedLoss``.

A frozen *guide* embeds the raw inputs of each row. For anchor row ``i`` the guide's own
anchor–positive similarity ``t_i = c(a'_i, p'_{o+i})`` sets a cut-off

* ``"absolute"``: ``θ_i = t_i − m``
* ``"relative"``: ``θ_i = t_i − |t_i|·m``  (correct for ``t_i < 0``, unlike ``t_i(1−m)``)

and every in-batch candidate whose guide similarity is strictly greater than ``θ_i`` is a flagged
false negative: its logit becomes −inf before the softmax. Blocks of row ``i`` (each divided by τ):
``AP = c(a_i, p_j)`` (the row's own positive is never masked), ``AA = c(a_i, a_j)`` if
``contrast_anchors``, ``PP = c(p_{o+i}, p_j)`` if ``contrast_positives``, and one ``AN_k = c(a_i,
n_kj)`` per hard-negative column (the row's own hard negative is *not* protected). The per-row
loss is ``logsumexp(z_i) − z_{i,o+i}``.

Deliberate, optional differences from the reference (all off by default): ``mask_self`` masks the
self-similarities of AA and PP even when the guide calls them exact duplicates (the reference's
strict ``>`` keeps them when ``t_i = 1``).

Example::

    >>> import torch
    >>> a, p = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.5, 3**0.5 / 2], [0.0, 1.0]])
    >>> ga, gp = torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[0.6, 0.8], [0.8, 0.6]])
    >>> losses = gist_loss(a, p, guide_anchor=ga, guide_positive=gp, temperature=0.1,
    ...                    contrast_anchors=False, contrast_positives=False)
    >>> [round(v, 6) + 0.0 for v in losses.tolist()]
    [0.0, 0.232628]
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_select.rules.contrastive import ContrastiveLogits, EmbeddingOutput, build_logits

MarginStrategy = Literal["absolute", "relative"]
MARGIN_STRATEGIES = ("absolute", "relative")
FalseNegativeMode = Literal["drop", "attract"]
FALSE_NEGATIVE_MODES = ("drop", "attract")


# ----------------------------------------------------------------------------------------------- pure rule
def gist_thresholds(guide_positive_scores: Tensor, margin: float, margin_strategy: MarginStrategy) -> Tensor:
    """Per-row cut-off ``θ_i`` from the guide's anchor–positive similarity ``t_i``."""
    t = guide_positive_scores
    if margin_strategy == "absolute":
        return t - margin
    if margin_strategy == "relative":
        return t - t.abs() * margin
    raise ValueError(f"Expected `margin_strategy` in {MARGIN_STRATEGIES}, but got {margin_strategy!r}.")


def false_negative_mask(guide_scores: Tensor, thresholds: Tensor) -> Tensor:
    """``[B, C]`` bool: candidate ``j`` of row ``i`` is a flagged false negative iff ``g_ij > θ_i`` (strict)."""
    return guide_scores > thresholds.unsqueeze(1)


def _unit(x: Tensor) -> Tensor:
    return F.normalize(x.float(), dim=-1)


def apply_gist(
    logits: ContrastiveLogits,
    guide_anchor: Tensor,
    guide_positive: Tensor,
    guide_negatives: Optional[Tensor] = None,
    *,
    margin: float = 0.0,
    margin_strategy: MarginStrategy = "absolute",
    contrast_anchors: bool = True,
    contrast_positives: bool = True,
    mask_self: bool = False,
    false_negatives: FalseNegativeMode = "drop",
) -> dict[str, Tensor]:
    """Edit MNRL logits in place into GIST logits and return the guide scores of every block.

    ``false_negatives="drop"`` is GIST: flagged candidates leave the softmax. ``"attract"`` is the
    attraction variant of false-negative cancellation (Huynh et al., 2022): flagged candidates become
    extra positives of their row (multi-positive InfoNCE, see
    :class:`~lightning_select.rules.contrastive.ContrastiveLogits`); the self-pairs of AA and PP
    (``a_i·a_i``, ``p_i·p_i``: a constant 1, not a candidate) are still removed whenever flagged.

    Args:
        logits: from :func:`~lightning_select.contrastive.build_logits` (possibly with gathered
            candidates); its ``embeddings`` hold the unit ``anchor`` ``[B, D]``, ``positive``
            ``[C, D]`` and ``negatives`` ``[C, K, D]`` candidates, and ``target`` gives ``o+i``.
        guide_anchor: ``[B, G]`` guide embeddings of the anchors.
        guide_positive: ``[C, G]`` guide embeddings of every positive candidate.
        guide_negatives: ``[C, K, G]`` guide embeddings of every hard-negative candidate.

    Returns:
        ``{"threshold": θ [B], "ap"/"aa"/"pp"/"an{k}": guide scores [B, C_block]}``.
    """
    if false_negatives not in FALSE_NEGATIVE_MODES:
        raise ValueError(f"Expected `false_negatives` in {FALSE_NEGATIVE_MODES}, but got {false_negatives!r}.")
    rows = torch.arange(logits.target.shape[0], device=logits.target.device)

    def route(name: str, flagged: Tensor, self_column: Optional[Tensor] = None) -> None:
        block = logits.block(name)
        if false_negatives == "drop":
            block.add_mask(flagged)
            return
        self_pair = torch.zeros_like(flagged)
        if self_column is not None:
            self_pair[rows, self_column] = True
        block.add_mask(flagged & self_pair)
        block.add_positive(flagged & ~self_pair)

    with torch.autocast(device_type=guide_anchor.device.type, enabled=False):
        ga, gp = _unit(guide_anchor), _unit(guide_positive)
        g_ap = ga @ gp.T
        theta = gist_thresholds(g_ap[rows, logits.target], margin, margin_strategy)
        scores = {"threshold": theta, "ap": g_ap}
        route("ap", false_negative_mask(g_ap, theta))
        a = logits.embeddings["anchor"]
        p_all = logits.embeddings["positive"]
        if contrast_anchors:
            g_aa = ga @ ga.T
            mask = false_negative_mask(g_aa, theta)
            if mask_self:
                mask[rows, rows] = True
            logits.add_block("aa", a @ a.T)
            route("aa", mask, rows)
            scores["aa"] = g_aa
        if contrast_positives:
            p_own, gp_own = p_all[logits.target], gp[logits.target]
            g_pp = gp_own @ gp.T
            mask = false_negative_mask(g_pp, theta)
            if mask_self:
                mask[rows, logits.target] = True
            logits.add_block("pp", p_own @ p_all.T)
            route("pp", mask, logits.target)
            scores["pp"] = g_pp
        if guide_negatives is not None:
            gn = _unit(guide_negatives)
            for k in range(gn.shape[1]):
                g_an = ga @ gn[:, k].T
                route(f"an{k}", false_negative_mask(g_an, theta))
                scores[f"an{k}"] = g_an
    # keep the canonical block order AP | AA | PP | AN (matches the reference's concatenation)
    order = {"ap": 0, "aa": 1, "pp": 2}
    logits.blocks.sort(key=lambda b: order.get(b.name, 3))
    return scores


def gist_loss(
    anchor: Tensor,
    positive: Tensor,
    negatives: Optional[Tensor] = None,
    *,
    guide_anchor: Tensor,
    guide_positive: Tensor,
    guide_negatives: Optional[Tensor] = None,
    temperature: float = 0.01,
    margin: float = 0.0,
    margin_strategy: MarginStrategy = "absolute",
    contrast_anchors: bool = True,
    contrast_positives: bool = True,
    mask_self: bool = False,
    false_negatives: FalseNegativeMode = "drop",
) -> Tensor:
    """``[B]`` per-row GIST losses for one process (no gathering). Mean them for ``GISTEmbedLoss``
    (with ``false_negatives="drop"``, the default)."""
    logits = build_logits(EmbeddingOutput(anchor, positive, negatives, temperature))
    if guide_negatives is not None and guide_negatives.dim() == 2:
        guide_negatives = guide_negatives.unsqueeze(1)
    apply_gist(
        logits, guide_anchor, guide_positive, guide_negatives, margin=margin, margin_strategy=margin_strategy,
        contrast_anchors=contrast_anchors, contrast_positives=contrast_positives, mask_self=mask_self,
        false_negatives=false_negatives,
    )
    return logits.per_row_loss()


