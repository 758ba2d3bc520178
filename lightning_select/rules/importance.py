"""Importance sampling with unbiased weights (Katharopoulos & Fleuret, 2018, "Not All Samples Are
Created Equal").

From a presampled batch of ``B`` samples, draw ``b`` *with replacement* with probabilities
``p_i ∝ score_i`` and weight each draw by ``1 / (B·p_i)``. Then ``(1/b) Σ_j w_j ℓ_j`` is an unbiased
estimate of the presampled batch's mean loss, whatever the scores. Drawing *without* replacement
with these weights is biased (a bug one public library ships), so it is not offered.

For softmax cross-entropy the score is ``‖softmax(z) − onehot(y)‖₂``, an upper bound on the norm of
the loss's gradient with respect to the logits (and, up to a constant, to the last layer). The
switch-on rule: importance sampling pays only while the estimated variance reduction
``τ = (1 − ‖g − u‖² / ‖g‖²)^(−1/2)`` (``g`` the sampling distribution, ``u`` the uniform one),
smoothed with an EMA of 0.9, exceeds the cost ratio ``(B + 3b) / (3b)``.

Example::

    >>> import torch
    >>> logits, y = torch.tensor([[4.0, 0.0], [0.0, 0.0]]), torch.tensor([0, 1])
    >>> [round(v, 4) for v in gradient_norm_bound(logits, y).tolist()]
    [0.0254, 0.7071]
    >>> positions, weights = importance_resample(torch.tensor([1.0, 3.0]), 4, torch.Generator().manual_seed(0))
    >>> positions.numel(), sorted(set(round(w, 3) for w in weights.tolist())) <= [0.667, 2.0]
    (4, True)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def gradient_norm_bound(logits: Tensor, targets: Tensor) -> Tensor:
    """``[B]`` ``‖softmax(logits) − onehot(targets)‖₂`` in fp32: the per-sample importance score."""
    probs = logits.detach().float().softmax(dim=-1)
    return (probs - F.one_hot(targets.long(), probs.shape[-1]).float()).norm(dim=-1)


def sampling_probabilities(scores: Tensor, smoothing: float = 0.0) -> Tensor:
    """``p ∝ score + smoothing·mean(score)``; uniform when every score is 0. Negative scores are an error."""
    s = scores.detach().float()
    if bool((s < 0).any()) or not bool(torch.isfinite(s).all()):
        raise ValueError("Importance scores must be finite and non-negative.")
    s = s + smoothing * s.mean()
    total = s.sum()
    return torch.full_like(s, 1.0 / s.numel()) if float(total) <= 0 else s / total


def importance_resample(scores: Tensor, count: int, generator: torch.Generator,
                        smoothing: float = 0.0) -> tuple[Tensor, Tensor]:
    """Draw ``count`` positions with replacement, ``p ∝ scores``; return them (sorted) and ``1/(B·p)``."""
    p = sampling_probabilities(scores, smoothing)
    positions = torch.multinomial(p.cpu(), count, replacement=True, generator=generator).sort().values
    positions = positions.to(scores.device)
    return positions, 1.0 / (p.numel() * p[positions])


def variance_reduction(probabilities: Tensor) -> Tensor:
    """``τ = (1 − ‖g − u‖² / ‖g‖²)^(−1/2)`` for the sampling distribution ``g`` (1 when uniform).

    Example::

        >>> float(variance_reduction(torch.full((4,), 0.25)))
        1.0
    """
    g = probabilities.detach().float()
    u = torch.full_like(g, 1.0 / g.numel())
    ratio = (g - u).square().sum() / g.square().sum().clamp_min(torch.finfo(torch.float32).tiny)
    return (1.0 - ratio).clamp_min(torch.finfo(torch.float32).eps).rsqrt()
