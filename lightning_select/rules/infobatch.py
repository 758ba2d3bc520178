"""InfoBatch's pruning rule (Qin et al., ICLR 2024): drop part of the well-learned samples, up-weight the rest.

The *well-learned* samples are the seen samples whose score (their most recent training loss) is
below the mean score of the seen samples. Exactly ``k = max(1, round((1 − r) · n_low))`` of the
``n_low`` well-learned samples are kept, chosen uniformly without replacement, and each gets the
weight ``n_low / k`` (the inverse of its inclusion probability ``k / n_low``; ``1 / (1 − r)`` up to
the rounding of ``k``). Every other sample is kept with weight 1; samples without a score (NaN, not
yet seen) are always kept and never counted in the mean. So for any per-sample values ``ℓ``,
``E[Σ_kept w_i ℓ_i] = Σ_i ℓ_i`` exactly: the pruned epoch's weighted sum is an unbiased estimate
of the full epoch's sum.

Example::

    >>> import torch
    >>> scores = torch.tensor([0.1, 0.2, 0.3, 0.4, 5.0, float("nan")])   # mean of the seen: 1.2
    >>> plan = infobatch_plan(scores, prune=0.5, generator=torch.Generator().manual_seed(0))
    >>> plan.well_learned, plan.kept_well_learned, int(plan.keep.sum())
    (4, 2, 4)
    >>> bool(plan.keep[4]) and bool(plan.keep[5]), plan.weights[plan.keep & (scores < 1.2)].tolist()
    (True, [2.0, 2.0])
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class InfoBatchPlan:
    """One epoch's pruning decision over ``N`` samples.

    Attributes:
        keep: ``[N]`` bool, the samples the epoch trains.
        weights: ``[N]`` float32 loss weights: ``n_low / k`` for the kept well-learned samples, 1 for the
            other kept samples, 0 for the pruned ones.
        well_learned: ``n_low``, the number of seen samples scoring below the mean.
        kept_well_learned: ``k``, how many of them are kept.
        threshold: the mean score of the seen samples (NaN when none is seen).
    """

    keep: Tensor
    weights: Tensor
    well_learned: int
    kept_well_learned: int
    threshold: float

    @property
    def kept(self) -> int:
        """Samples trained in the epoch: ``N − n_low + k``."""
        return int(self.keep.numel()) - self.well_learned + self.kept_well_learned


def kept_well_learned(well_learned: int, prune: float) -> int:
    """``k = max(1, round((1 − r) · n_low))`` (half rounds up; 0 when ``n_low = 0``): how many well-learned
    samples an epoch keeps. Pruning all of them would make the estimate biased, so at least one is kept.

    Example::

        >>> [kept_well_learned(n, 0.5) for n in (0, 1, 2, 3, 7)], kept_well_learned(10, 0.0)
        ([0, 1, 1, 2, 4], 10)
    """
    if well_learned <= 0:
        return 0
    return max(1, math.floor(round((1.0 - prune) * well_learned, 9) + 0.5))


def well_learned_mask(scores: Tensor) -> tuple[Tensor, float]:
    """``(mask, mean)``: the seen samples (non-NaN scores) scoring strictly below the mean of the seen scores
    (computed in float64). No seen sample: an all-False mask and NaN."""
    seen = ~torch.isnan(scores)
    if not bool(seen.any()):
        return torch.zeros_like(seen), float("nan")
    mean = float(scores[seen].double().mean())
    return seen & (scores.double() < mean), mean


def infobatch_plan(scores: Tensor, prune: float, generator: torch.Generator) -> InfoBatchPlan:
    """The epoch's kept samples and weights from the scores at its start (see the module docs).

    Args:
        scores: ``[N]`` float, each sample's most recent training loss, NaN for samples not yet seen.
        prune: ``r`` in ``[0, 1)``, the share of the well-learned samples pruned.
        generator: the CPU generator of the uniform choice (one ``randperm(n_low)`` is drawn from it).
    """
    if scores.dim() != 1 or not scores.is_floating_point():
        raise ValueError(f"infobatch_plan: expected a 1-d float tensor of scores, but got {scores.dtype} "
                         f"{tuple(scores.shape)}.")
    if not 0.0 <= prune < 1.0:
        raise ValueError(f"infobatch_plan: expected `prune` in [0, 1), but got {prune!r}.")
    scores = scores.detach().cpu()
    low, mean = well_learned_mask(scores)
    low_idx = low.nonzero().flatten()
    n_low = int(low_idx.numel())
    k = kept_well_learned(n_low, prune)
    keep = ~low
    weights = keep.float()
    if n_low:
        chosen = low_idx[torch.randperm(n_low, generator=generator)[:k]]
        keep[chosen] = True
        weights[chosen] = n_low / k
    return InfoBatchPlan(keep=keep, weights=weights, well_learned=n_low, kept_well_learned=k, threshold=mean)


def full_plan(num_samples: int) -> InfoBatchPlan:
    """Every sample kept with weight 1 (the anneal epochs, and epochs without any score)."""
    return InfoBatchPlan(keep=torch.ones(num_samples, dtype=torch.bool), weights=torch.ones(num_samples),
                         well_learned=0, kept_well_learned=0, threshold=float("nan"))
