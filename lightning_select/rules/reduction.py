"""Globally normalised weighted reduction of per-sample losses.

Under DDP every rank returns ``(ℓ·w).sum() · W / Σ_ranks w.sum()``. DDP averages gradients over the
W ranks, so the effective gradient is ``∇ Σ_all ℓ·w / Σ_all w``: the weighted mean over the global
batch, whatever the per-rank subset sizes. A per-rank mean would bias the gradient when ranks keep
different numbers of samples, and an empty rank would silently halve it.

Example::

    >>> import torch
    >>> losses = torch.tensor([1.0, 2.0, 3.0])
    >>> float(weighted_global_mean(losses, torch.tensor([1.0, 1.0, 2.0])))
    2.25
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor


def weighted_global_mean(
    losses: Tensor,
    weights: Optional[Tensor],
    world_size: int = 1,
    all_reduce_sum: Optional[Callable[[Tensor], Tensor]] = None,
) -> Tensor:
    """``(losses·weights).sum() · world_size / all_reduce_sum(weights.sum())``.

    Args:
        losses: ``[b]`` per-sample losses (carry the gradient).
        weights: ``[b]`` non-negative weights (treated as constants: detached); None means all ones.
        world_size: number of ranks W.
        all_reduce_sum: sums a scalar tensor over ranks; identity when omitted (single process).

    Returns:
        A scalar. It is exactly 0 (never NaN) when the global weight sum is 0.
    """
    numerator, total = weighted_sum_parts(losses, weights)
    if all_reduce_sum is not None and world_size > 1:
        total = all_reduce_sum(total.clone())
    return normalise(numerator, total, world_size)


def weighted_sum_parts(losses: Tensor, weights: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """``(Σ ℓ·w, Σ w)`` with ``w`` detached; ``weights=None`` means all ones (``Σ w = b``)."""
    if weights is None:
        return losses.sum(), losses.new_tensor(float(losses.numel())).detach()
    weights = weights.detach().to(losses.dtype)
    return (losses * weights).sum(), weights.sum()


def normalise(numerator: Tensor, global_weight_sum: Tensor, world_size: int) -> Tensor:
    """``numerator · W / Σ_all w``, exactly 0 when the global weight sum is 0."""
    return numerator * world_size / global_weight_sum.clamp_min(torch.finfo(numerator.dtype).tiny)


def effective_sample_size(weights: Tensor) -> Tensor:
    """Kish's effective sample size ``(Σw)² / Σw²`` (0 for all-zero weights)."""
    w = weights.detach().float()
    return w.sum().square() / w.square().sum().clamp_min(torch.finfo(torch.float32).tiny)
