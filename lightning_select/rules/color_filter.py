"""CoLoR-Filter (Brandfonbrener et al., NeurIPS 2024, "CoLoR-Filter: Conditional Loss Reduction
Filtering for Targeted Language Model Pre-training").

Offline data selection with two fixed auxiliary models: a *prior* model, and the *conditional*
model, which is the prior fine-tuned on a small sample of the target distribution. The score of a
candidate ``x`` is its conditional loss reduction::

    score(x) = loss_prior(x) − loss_conditional(x)

A high score means that the target data reduced the candidate's loss the most, so the candidate
looks like the target. The global top ``1/τ`` of the candidates by score are kept (``τ`` is the
selection ratio: ``τ = 4`` keeps 25%). The public implementation (color-filter-olmo,
``scripts/select_index_np.py``) keeps ``int(N / τ)`` candidates, the floor, and so does
:func:`keep_size`; it keeps at least one. Ties go to the lower index (the public implementation's
``argsort`` leaves their order unspecified), and NaN scores rank last.

Example::

    >>> import torch
    >>> prior = torch.tensor([2.0, 1.0, 3.0, 0.5, 1.5])
    >>> conditional = torch.tensor([1.0, 1.25, 0.5, 0.5, 1.5])
    >>> scores = color_scores(prior, conditional)
    >>> scores.tolist()
    [1.0, -0.25, 2.5, 0.0, 0.0]
    >>> mask = top_fraction_mask(scores, keep_of(tau=2.5))      # int(5 / 2.5) = 2 kept
    >>> mask.tolist()
    [True, False, True, False, False]
    >>> selection_weights(scores, mask).tolist()                  # the paper: plain training on the kept
    [1.0, 0.0, 1.0, 0.0, 0.0]
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from lightning_select.rules.reducible_loss import _ranked


def color_scores(prior_loss: Tensor, conditional_loss: Tensor) -> Tensor:
    """``[N]`` conditional loss reductions ``prior_loss − conditional_loss`` in fp32, detached.

    Example::

        >>> color_scores(torch.tensor([2.0, 0.5]), torch.tensor([0.5, 1.0])).tolist()
        [1.5, -0.5]
    """
    if prior_loss.shape != conditional_loss.shape or prior_loss.dim() != 1:
        raise ValueError(f"Expected prior and conditional losses of the same [N] shape, but got "
                         f"{tuple(prior_loss.shape)} and {tuple(conditional_loss.shape)}.")
    return prior_loss.detach().float() - conditional_loss.detach().float().to(prior_loss.device)


def keep_of(tau: Optional[float] = None, keep: Optional[float] = None) -> float:
    """The kept fraction from exactly one of ``tau`` (> 1: keep ``1/τ``) and ``keep`` (in (0, 1]).

    ``τ = 1`` would keep every candidate, which is no selection; pass ``keep=1.0`` for that on purpose
    (a control arm).

    Example::

        >>> keep_of(tau=4), keep_of(keep=0.3)
        (0.25, 0.3)
        >>> keep_of(tau=1)
        Traceback (most recent call last):
        ...
        ValueError: CoLoR-Filter: expected the selection ratio `tau` > 1 (tau=4 keeps 1/4 of the candidates), but got 1; tau=1 keeps everything: drop the filter, or pass keep=1.0 for an explicit control.
    """
    if (tau is None) == (keep is None):
        raise ValueError(f"CoLoR-Filter: pass exactly one of `tau` (the selection ratio, e.g. 4 keeps 25%) and "
                         f"`keep` (the kept fraction in (0, 1]), but got tau={tau!r}, keep={keep!r}.")
    if tau is not None:
        if isinstance(tau, bool) or not isinstance(tau, (int, float)):
            raise TypeError(f"CoLoR-Filter: expected `tau` to be a real number, but got {tau!r} ({type(tau).__name__}).")
        if not (math.isfinite(tau) and tau > 1):
            raise ValueError(f"CoLoR-Filter: expected the selection ratio `tau` > 1 (tau=4 keeps 1/4 of the "
                             f"candidates), but got {tau!r}; tau=1 keeps everything: drop the filter, or pass "
                             f"keep=1.0 for an explicit control.")
        return 1.0 / float(tau)
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise TypeError(f"CoLoR-Filter: expected `keep` to be a real number, but got {keep!r} ({type(keep).__name__}).")
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"CoLoR-Filter: expected the kept fraction `keep` in (0, 1], but got {keep!r}; "
                         f"e.g. keep=0.25 (the same as tau=4).")
    return float(keep)


def keep_size(keep: float, n: int) -> int:
    """``⌊keep·n⌋`` (at least 1 when ``n > 0``), robust to float round-off (``0.1·30`` is 3, not 2).

    Example::

        >>> keep_size(0.25, 1149), keep_size(0.1, 30), keep_size(1 / 64, 10), keep_size(1.0, 7), keep_size(0.5, 0)
        (287, 3, 1, 7, 0)
    """
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"Expected `keep` in (0, 1], but got {keep}.")
    if n <= 0:
        return 0
    return min(n, max(1, math.floor(round(keep * n, 9))))


def top_fraction_mask(scores: Tensor, keep: float, groups: Optional[Tensor] = None) -> Tensor:
    """``[N]`` bool mask of the global top :func:`keep_size` ``(keep, N)`` scores (ties: lower index first).

    With ``groups`` (``[N]`` integer labels) the top :func:`keep_size` ``(keep, n_g)`` of each group are kept
    instead (a stratified selection, not in the paper: the kept total can differ from ``⌊keep·N⌋`` by
    less than the number of groups).

    Example::

        >>> top_fraction_mask(torch.tensor([1.0, 3.0, 3.0, 2.0, float("nan")]), 0.5).tolist()
        [False, True, True, False, False]
        >>> top_fraction_mask(torch.tensor([1.0, 3.0, 3.0, 2.0]), 0.5, groups=torch.tensor([0, 0, 1, 1])).tolist()
        [False, True, True, False]
    """
    if scores.dim() != 1:
        raise ValueError(f"Expected [N] scores, but got shape {tuple(scores.shape)}.")
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if groups is None:
        mask[_ranked(scores)[: keep_size(keep, scores.numel())]] = True
        return mask
    if groups.shape != scores.shape or groups.is_floating_point():
        raise ValueError(f"Expected [N] integer groups of the scores' shape {tuple(scores.shape)}, but got "
                         f"{groups.dtype} {tuple(groups.shape)}.")
    for group in groups.unique():
        members = (groups == group).nonzero().flatten()
        mask[members[_ranked(scores[members])[: keep_size(keep, members.numel())]]] = True
    return mask


def selection_weights(scores: Tensor, mask: Tensor, temperature: Optional[float] = None) -> Tensor:
    """``[N]`` float32 weights: 0 outside ``mask``; on the kept, 1 (``temperature=None``, the paper's
    plain training on the subset) or ``softmax(score / temperature)`` over the kept, rescaled to mean 1.

    The softmax weighting is not in the paper: it is an option for a soft preference among the kept.

    Example::

        >>> s, m = torch.tensor([2.0, 0.0, 1.0]), torch.tensor([True, False, True])
        >>> [round(v, 4) for v in selection_weights(s, m, temperature=1.0).tolist()]
        [1.4621, 0.0, 0.5379]
    """
    if mask.dtype != torch.bool or mask.shape != scores.shape:
        raise ValueError(f"Expected a bool mask of the scores' shape {tuple(scores.shape)}, but got "
                         f"{mask.dtype} {tuple(mask.shape)}.")
    weights = torch.zeros(scores.shape, dtype=torch.float32, device=scores.device)
    if temperature is None:
        weights[mask] = 1.0
        return weights
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"Expected a positive finite `temperature` (or None for uniform weights), but got {temperature}.")
    kept = scores[mask].detach().float()
    if kept.numel():
        weights[mask] = torch.softmax(kept / temperature, dim=0) * kept.numel()
    return weights
