"""Hard-example weighting rules: the focal loss, online hard-example mining (OHEM), loss-softmax
weights, and a cap on weight ratios.

Pure tensor functions (fp32 or fp64 in, detached weights or masks out); they know nothing about
steps, ranks or Lightning. The callbacks are
:class:`~lightning_select.policies.focal_weighting.FocalWeighting`,
:class:`~lightning_select.policies.ohem.OHEM` and
:class:`~lightning_select.policies.loss_softmax_weighting.LossSoftmaxWeighting`.

* :func:`focal_weights`: ``w = α_t (1 − p_t)^γ``, so that ``w·CE = FL = −α_t (1 − p_t)^γ log p_t``
  per sample (Lin et al., ICCV 2017, "Focal Loss for Dense Object Detection").
* :func:`focal_gradient_weights`: the weights whose weighted cross-entropy has *the focal loss's
  gradient*. ``FL`` is a function of ``p_t`` alone, and ``∇_z p_t = −p_t ∇_z CE`` for softmax
  logits ``z``, so ``∇_z FL = α_t (1 − p_t)^γ (1 + γ p_t CE / (1 − p_t)) ∇_z CE``. With the weights
  treated as constants (as the engine does), ``Σ w·CE`` with :func:`focal_weights` has the focal
  loss's *value* but drops the term that comes from differentiating ``(1 − p_t)^γ``; with these
  weights it has the focal loss's *gradient*, exactly.
* :func:`ohem_mask`: the deterministic top ``⌈keep·n⌉`` losses of a batch (Shrivastava et al., CVPR
  2016), or of every rank's batch together; it reuses the top-k of
  :mod:`~lightning_select.rules.reducible_loss` (ties: the lower position, then the lower rank).
* :func:`loss_softmax_weights`: ``w = n·softmax(ℓ/T)`` (mean 1). With constant weights,
  ``∇ Σ softmax(ℓ/T)_i ℓ_i = ∇ T·log mean exp(ℓ/T)``: the gradient of the tilted (log-sum-exp) risk
  (Li et al., ICLR 2021, "Tilted Empirical Risk Minimization", tilt ``t = 1/T``).
* :func:`bound_weights`: clip the weights so that ``max(w) ≤ r·mean(w)`` holds *after* clipping,
  solved exactly, then rescale to the original total.

Example::

    >>> import torch
    >>> logits, targets = torch.tensor([[2.0, 0.0], [0.0, 0.0]]), torch.tensor([0, 1])
    >>> [round(v, 4) for v in focal_weights(logits, targets, gamma=2.0).tolist()]
    [0.0142, 0.25]
    >>> ohem_mask(torch.tensor([0.3, 2.0, 0.1, 1.0]), keep=0.5).tolist()
    [False, True, False, True]
    >>> loss_softmax_weights(torch.tensor([0.0, 0.0]), temperature=1.0).tolist()
    [1.0, 1.0]
    >>> [round(v, 4) for v in bound_weights(torch.tensor([8.0, 1.0, 1.0, 1.0, 1.0]), max_ratio=2.0).tolist()]
    [4.8, 1.8, 1.8, 1.8, 1.8]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_select.rules.reducible_loss import global_top_fraction, top_fraction

Alpha = Union[None, float, Sequence[float], Tensor]


def _log_pt(logits: Tensor, targets: Tensor) -> Tensor:
    """``[B]`` ``log softmax(logits)[i, targets[i]]`` in fp32 (fp64 stays fp64), detached."""
    if logits.dim() != 2 or targets.dim() != 1 or targets.shape[0] != logits.shape[0]:
        raise ValueError(f"Expected logits [B, C] and targets [B], but got {tuple(logits.shape)} and "
                         f"{tuple(targets.shape)}.")
    if targets.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.bool):
        raise ValueError(f"Expected integer class targets, but got dtype {targets.dtype}.")
    z = logits.detach()
    z = z if z.dtype == torch.float64 else z.float()
    targets = targets.to(z.device).long()
    if targets.numel() and bool(((targets < 0) | (targets >= z.shape[1])).any()):  # one host read per call
        raise ValueError(f"Expected targets in [0, {z.shape[1]}), but got values in "
                         f"[{int(targets.min())}, {int(targets.max())}].")
    return F.log_softmax(z, dim=1).gather(1, targets.unsqueeze(1)).squeeze(1)


def _alpha_t(alpha: Alpha, targets: Tensor, num_classes: int, like: Tensor) -> Union[float, Tensor]:
    """``α_t``: 1 for None, the constant for a float, ``alpha[targets]`` for ``C`` per-class values."""
    if alpha is None:
        return 1.0
    if isinstance(alpha, (int, float)) and not isinstance(alpha, bool):
        if not alpha > 0:
            raise ValueError(f"Expected `alpha` > 0, but got {alpha}.")
        return float(alpha)
    table = torch.as_tensor(alpha, dtype=like.dtype, device=like.device).detach()
    if table.dim() != 1 or table.numel() != num_classes:
        raise ValueError(f"Expected `alpha` to be None, a number or {num_classes} per-class values (one per logit), "
                         f"but got shape {tuple(table.shape)}.")
    if bool((table < 0).any()) or not bool(torch.isfinite(table).all()):
        raise ValueError(f"Expected finite per-class `alpha` values >= 0, but got {table.tolist()}.")
    return table[targets.to(like.device).long()]


def focal_weights(logits: Tensor, targets: Tensor, gamma: float, alpha: Alpha = None) -> Tensor:
    """``[B]`` ``w = α_t (1 − p_t)^γ`` (detached), so that ``w·CE`` is the focal loss's value per sample.

    ``p_t = softmax(logits)[i, targets[i]]``; ``1 − p_t`` is computed as ``−expm1(log p_t)``, accurate
    for confident predictions. ``alpha``: None (``α_t = 1``, no class weighting: the default for
    multi-class softmax), a number (a constant factor: it only scales the loss), or ``C`` per-class
    values (``α_t = alpha[target]``). The paper's ``α = 0.25`` belongs to its *binary sigmoid*
    formulation (``α`` for the foreground, ``1 − α`` for the background); for two softmax classes
    the same thing is ``alpha=[1 − α, α]``.

    Example::

        >>> z, y = torch.tensor([[0.0, 0.0], [3.0, 0.0]]), torch.tensor([1, 1])
        >>> w = focal_weights(z, y, gamma=2.0, alpha=[0.75, 0.25])
        >>> [round(v, 4) for v in w.tolist()]          # 0.25 · (1 − p_t)²
        [0.0625, 0.2268]
        >>> focal_weights(z, y, gamma=0.0).tolist()      # γ = 0: plain cross-entropy
        [1.0, 1.0]
    """
    if gamma < 0:
        raise ValueError(f"Expected `gamma` >= 0, but got {gamma}.")
    log_pt = _log_pt(logits, targets)
    q = (-torch.expm1(log_pt)).clamp(0.0, 1.0)  # 1 − p_t, accurate near p_t = 1
    return q.pow(gamma) * _alpha_t(alpha, targets, logits.shape[1], log_pt)


def focal_gradient_weights(logits: Tensor, targets: Tensor, gamma: float, alpha: Alpha = None) -> Tensor:
    """``[B]`` weights ``w`` (detached) with ``∇_z Σ w·CE = ∇_z Σ FL``: the focal loss's exact gradient.

    ``w = α_t (1 − p_t)^γ (1 + γ p_t CE / (1 − p_t))``, with ``CE = −log p_t`` and
    ``CE/(1 − p_t) → 1`` as ``p_t → 1``. Always ``≥`` :func:`focal_weights`; equal for ``γ = 0``.
    It holds for any loss that is the softmax cross-entropy of ``logits`` against ``targets``.

    Example::

        >>> z = torch.tensor([[1.0, -1.0, 0.5]], requires_grad=True)
        >>> y = torch.tensor([0])
        >>> log_pt = torch.log_softmax(z, 1)[0, 0]
        >>> focal = -(1 - log_pt.exp()) ** 2 * log_pt
        >>> (exact,) = torch.autograd.grad(focal, z)
        >>> w = focal_gradient_weights(z, y, gamma=2.0)
        >>> (weighted,) = torch.autograd.grad(w * torch.nn.functional.cross_entropy(z, y, reduction="none"), z)
        >>> bool(torch.allclose(exact, weighted, atol=1e-6))
        True
    """
    if gamma < 0:
        raise ValueError(f"Expected `gamma` >= 0, but got {gamma}.")
    log_pt = _log_pt(logits, targets)
    q = (-torch.expm1(log_pt)).clamp(0.0, 1.0)  # 1 − p_t, accurate near p_t = 1
    p = log_pt.exp()
    ratio = torch.where(q > 0, -log_pt / q.clamp_min(torch.finfo(q.dtype).tiny), torch.ones_like(q))
    return q.pow(gamma) * (1 + gamma * p * ratio) * _alpha_t(alpha, targets, logits.shape[1], log_pt)


def focal_loss(logits: Tensor, targets: Tensor, gamma: float, alpha: Alpha = None) -> Tensor:
    """``[B]`` focal loss values ``−α_t (1 − p_t)^γ log p_t`` (detached), for logging.

    Example::

        >>> round(float(focal_loss(torch.tensor([[0.0, 0.0]]), torch.tensor([0]), gamma=2.0)), 4)  # 0.25·ln 2
        0.1733
    """
    return -focal_weights(logits, targets, gamma, alpha) * _log_pt(logits, targets)


def ohem_mask(losses: Tensor, keep: float, gathered: Optional[Tensor] = None, rank: int = 0,
              counts: Optional[Tensor] = None) -> Tensor:
    """``[n]`` bool mask of the hard examples: the deterministic top ``⌈keep·n⌉`` losses (at least one).

    Rounding: the ceiling (robust to float round-off: ``0.1·320`` keeps 32), as RHO-LOSS does, so a
    batch never keeps fewer than ``keep`` of its rows. Ties go to the lower position; NaN ranks last.

    With ``gathered`` (``[W, B]``, every rank's losses, e.g. from
    :func:`~lightning_select.core.distributed.all_gather_rows`, ``counts`` the valid length of each
    row), the top ``⌈keep·Σ counts⌉`` of *all* ranks' losses is kept (ties: lower rank, then lower
    position) and this ``rank``'s share is returned; ranks may then keep different counts.

    Example::

        >>> ohem_mask(torch.tensor([1.0, 3.0, 3.0, 2.0]), keep=0.25).tolist()    # ⌈1⌉ = 1; tie: lower position
        [False, True, False, False]
        >>> g = torch.tensor([[5.0, 1.0, 4.0], [3.0, 2.0, 0.0]])
        >>> ohem_mask(g[0], 0.5, g, rank=0).tolist(), ohem_mask(g[1], 0.5, g, rank=1).tolist()
        ([True, False, True], [True, False, False])
    """
    if losses.dim() != 1:
        raise ValueError(f"Expected [n] losses, but got shape {tuple(losses.shape)}.")
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"Expected `keep` in (0, 1], but got {keep}.")
    if gathered is None:
        positions = top_fraction(losses, keep)
    else:
        positions = global_top_fraction(losses, gathered, rank, keep, counts)
    mask = torch.zeros(losses.shape, dtype=torch.bool, device=losses.device)
    mask[positions.to(losses.device)] = True
    return mask


def loss_softmax_weights(losses: Tensor, temperature: float) -> Tensor:
    """``[n]`` ``w = n·softmax(ℓ/T)`` (detached, mean 1): harder samples weigh exponentially more.

    ``T → ∞`` gives uniform weights; ``T → 0`` puts all the weight on the largest loss.

    Example::

        >>> w = loss_softmax_weights(torch.tensor([0.0, 1.0, 2.0]), temperature=1.0)
        >>> [round(v, 4) for v in w.tolist()], round(float(w.mean()), 6)
        ([0.2701, 0.7342, 1.9957], 1.0)
    """
    if not temperature > 0:
        raise ValueError(f"Expected `temperature` > 0, but got {temperature}.")
    x = losses.detach()
    x = x if x.dtype == torch.float64 else x.float()
    if x.numel() == 0:
        return x.clone()
    return torch.softmax(x / temperature, dim=0) * x.numel()


def bound_weights(weights: Tensor, max_ratio: float) -> Tensor:
    """Cap every weight at ``max_ratio`` × the mean weight, exactly, keeping the total (detached).

    Finds the clip level ``τ`` with ``τ = r·mean(min(w, τ))`` (``r = max_ratio``), clips
    ``w ← min(w, τ)`` and rescales to the original sum. The clipped weights' ratio ``max/mean`` is then
    exactly ``r`` (and rescaling does not change a ratio), so no iteration is needed. The root is
    unique: ``f(τ) = τ − r·mean(min(w, τ))`` is convex with ``f(0) = 0``; it is found among the
    sorted weights in one vectorised pass (``O(n log n)``). Weights already within the bound are
    returned unchanged (a no-op). Order and ties are kept: a clip never reorders two weights.

    When more than ``n·(1 − 1/r)`` of the weights are zero, no clip of the positive weights can meet
    the bound (making them all equal gives the least ratio, ``n / #positive``); the positive weights
    are then made equal, and the ratio stays above ``r``. Weights with a NaN or an infinity are returned
    unchanged (a non-finite loss is for the caller's NaN handling, e.g. the engine's ``nan_policy``).

    Example::

        >>> w = bound_weights(torch.tensor([10.0, 10.0, 1.0, 1.0]), max_ratio=1.5)
        >>> w.tolist(), float(w.max() / w.mean())
        ([8.25, 8.25, 2.75, 2.75], 1.5)
        >>> bound_weights(torch.tensor([2.0, 1.0]), max_ratio=2.0).tolist()   # within the bound: unchanged
        [2.0, 1.0]
    """
    if not max_ratio >= 1.0:
        raise ValueError(f"Expected `max_ratio` >= 1 (the largest allowed max/mean weight ratio), but got {max_ratio}.")
    if weights.dim() != 1:
        raise ValueError(f"Expected [n] weights, but got shape {tuple(weights.shape)}.")
    w = weights.detach()
    n = w.numel()
    if n == 0:
        return w.clone()
    if not bool(torch.isfinite(w).all()):  # left to the caller's NaN handling (the engine's nan_policy)
        return w.clone()
    if bool((w < 0).any()):
        raise ValueError("Expected non-negative weights.")
    v = w.double().sort(descending=True).values
    total = v.sum()
    if float(total) <= 0 or float(v[0]) <= max_ratio * float(total) / n:
        return w.clone()
    tail = v.flip(0).cumsum(0).flip(0)  # tail[j] = Σ_{i ≥ j} v_i
    j = torch.arange(n, dtype=torch.float64, device=v.device)
    f = v - max_ratio * (j * v + tail) / n  # f(τ) at τ = v_j: the first j values clipped to v_j
    positive = int((v > 0).sum())
    below = ((f <= 0) & (v > 0)).nonzero()
    m = int(below[0]) if below.numel() else -1
    if m >= 1 and n - max_ratio * m > 0:
        tau = max_ratio * float(tail[m]) / (n - max_ratio * m)
    else:  # infeasible with this many zeros: make the positive weights equal (the least ratio reachable)
        tau = float(v[positive - 1])
    clipped = w.double().clamp_max(tau)
    return (clipped * (total / clipped.sum())).to(w.dtype)
