"""EATA's anti-forgetting regulariser (Niu et al., ICML 2022, Eqns. 8-9): a diagonal Fisher penalty.

Before adaptation, the importance of each parameter is estimated as the diagonal of the Fisher
information: the mean, over ``K`` batches of in-distribution samples, of the squared gradient of the
batch loss, ``ω = (1/K) Σ_k (∇_θ L_k)²``. EATA's loss ``L_k`` is the cross-entropy of the model's
output against its own pseudo-label (the argmax), averaged over the batch
(:func:`pseudo_label_cross_entropy`); its public code uses ``fisher_size = 2000`` samples in batches
of 64. During adaptation the loss gets the penalty ``α Σ_i ω_i (θ_i − θ̃_i)²`` (``α = 2000`` in the
paper), with ``θ̃`` the parameters before adaptation, so that parameters which mattered for the
in-distribution predictions move little. These rules know nothing about steps, ranks or Lightning;
:class:`~lightning_select.policies.entropy_selection.EntropySelection` wraps them.

Example::

    >>> import torch
    >>> w = torch.tensor([1.0, -2.0], requires_grad=True)
    >>> x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    >>> sums, count = accumulate_fisher([w], lambda batch: (batch @ w).square().mean(), [x, 2 * x])
    >>> fisher = [s / count for s in sums]
    >>> fisher[0].tolist()  # gradients (1, -2) and (4, -8): mean of the squares
    [8.5, 34.0]
    >>> float(fisher_penalty([w], [torch.zeros(2)], fisher, alpha=0.5).detach())  # 0.5·(8.5·1 + 34·4)
    72.25
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def pseudo_label_cross_entropy(logits: Tensor) -> Tensor:
    """EATA's Fisher loss: the batch mean of ``cross_entropy(logits, argmax(logits))`` (fp32, scalar).

    The targets are the model's own predictions, so no label is needed.

    Example::

        >>> import math
        >>> round(float(pseudo_label_cross_entropy(torch.tensor([[0.0, 0.0], [2.0, 0.0]]))), 6)
        0.410038
        >>> round((math.log(2) + math.log(1 + math.exp(-2))) / 2, 6)  # targets 0 (a tie) and 0
        0.410038
    """
    logits = logits.float()
    return F.cross_entropy(logits, logits.detach().argmax(dim=-1))


def squared_gradients(params: Sequence[Tensor], loss: Tensor) -> list[Tensor]:
    """``(∂ loss / ∂ p)²`` for each of ``params`` (fp32; zeros for a parameter the loss does not use).

    Uses ``torch.autograd.grad``, so nothing is accumulated into ``p.grad`` (and DDP's gradient hooks
    do not fire).

    Example::

        >>> p = torch.tensor([3.0], requires_grad=True)
        >>> squared_gradients([p], (2 * p).sum())[0].tolist()
        [4.0]
    """
    grads = torch.autograd.grad(loss, list(params), allow_unused=True)
    return [torch.zeros_like(p, dtype=torch.float32) if g is None else g.detach().float().square()
            for p, g in zip(params, grads)]


def diagonal_fisher(batch_grads: Iterable[Sequence[Tensor]]) -> list[Tensor]:
    """EATA's diagonal Fisher from per-batch gradients: ``ω_i = (1/K) Σ_k g_{k,i}²`` (fp32).

    ``batch_grads`` holds, for each of ``K ≥ 1`` batches, the gradient of that batch's loss with
    respect to every parameter (same order and shapes in every batch).

    Example::

        >>> diagonal_fisher([[torch.tensor([1.0, 2.0])], [torch.tensor([3.0, 0.0])]])[0].tolist()
        [5.0, 2.0]
    """
    sums: Optional[list[Tensor]] = None
    count = 0
    for grads in batch_grads:
        squares = [g.detach().float().square() for g in grads]
        sums = squares if sums is None else [s + q for s, q in zip(sums, squares)]
        count += 1
    if sums is None:
        raise ValueError("diagonal_fisher needs the gradients of at least one batch, but got none.")
    return [s / count for s in sums]


def accumulate_fisher(params: Sequence[Tensor], loss_fn: Callable[[Any], Tensor], batches: Iterable[Any],
                      max_batches: Optional[int] = None) -> tuple[list[Tensor], int]:
    """Run ``loss_fn`` over (at most ``max_batches`` of) ``batches``: ``(Σ_k (∇ L_k)², K)``.

    The sums and the count are returned separately, so that callers can add them up over several
    sources (e.g. the ranks of a DDP run) before dividing: the Fisher is ``sums[i] / K``, which equals
    :func:`diagonal_fisher` of the per-batch gradients. ``K`` is 0 when ``batches`` is empty.

    Example::

        >>> p = torch.tensor([1.0], requires_grad=True)
        >>> sums, k = accumulate_fisher([p], lambda b: b * p.sum(), [1.0, 2.0, 3.0], max_batches=2)
        >>> sums[0].tolist(), k
        ([5.0], 2)
    """
    sums = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    count = 0
    for batch in itertools.islice(batches, max_batches):  # never fetches a batch beyond max_batches
        for s, q in zip(sums, squared_gradients(params, loss_fn(batch))):
            s.add_(q)
        count += 1
    return sums, count


def fisher_penalty(params: Sequence[Tensor], anchors: Sequence[Tensor], fisher: Sequence[Tensor],
                   alpha: float) -> Tensor:
    """EATA's anti-forgetting penalty ``alpha · Σ_i ω_i (θ_i − θ̃_i)²`` (fp32 scalar, differentiable in θ).

    Args:
        params: the current parameters ``θ`` (carry the gradient).
        anchors: the parameters before adaptation ``θ̃`` (constants), same shapes.
        fisher: the importances ``ω`` (e.g. :func:`diagonal_fisher`), same shapes.
        alpha: the trade-off ``α ≥ 0`` (EATA: 2000).

    Example::

        >>> theta = torch.tensor([1.0, 3.0], requires_grad=True)
        >>> float(fisher_penalty([theta], [torch.tensor([0.0, 1.0])], [torch.tensor([2.0, 0.5])], 10.0).detach())
        40.0
    """
    if len(params) != len(anchors) or len(params) != len(fisher):
        raise ValueError(f"fisher_penalty needs one anchor and one Fisher tensor per parameter, but got "
                         f"{len(params)} parameters, {len(anchors)} anchors and {len(fisher)} Fisher tensors.")
    total: Optional[Tensor] = None
    for p, a, w in zip(params, anchors, fisher):
        term = (w.to(p.device, torch.float32) * (p.float() - a.to(p.device, torch.float32)).square()).sum()
        total = term if total is None else total + term
    if total is None:
        return torch.zeros(())
    return alpha * total
