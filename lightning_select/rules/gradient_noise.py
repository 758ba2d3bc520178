"""Gradient-noise tests for adaptive batch sizes (AdAdaGrad's norm and augmented inner-product tests).

A step's gradient ``ḡ`` is the mean of ``N`` micro-batch gradients ``h_j`` (micro-batches of equal size
``m``; the per-sample variance is ``m`` times the micro-batch variance, so every statistic below is the
same in per-sample units). From ``M ≤ N`` of the ``h_j`` (under DDP only the unsynchronised ones are
seen, see :class:`~lightning_select.policies.AdaptiveBatchSize`) and ``ḡ``:

* **norm test** (Byrd et al., 2012): ``Var(h) / N ≤ η²·‖ḡ‖²``, statistic ``T = Var(h) / (N·‖ḡ‖²)``;
* **inner-product test** (Bollapragada et al., 2018): ``Var(⟨h, ḡ⟩) / N ≤ θ²·‖ḡ‖⁴``;
* **orthogonality test**: ``E‖h − (⟨h, ḡ⟩/‖ḡ‖²)·ḡ‖² / N ≤ ν²·‖ḡ‖²``; the *augmented* inner-product
  test is the inner-product and orthogonality tests together.

Each variance is estimated from the sums ``Σ‖h_j‖²``, ``Σ⟨h_j, ḡ⟩``, ``Σ(⟨h_j, ḡ⟩ − ‖ḡ‖²)²`` and
``Σ(‖h_j‖² − ⟨h_j, ḡ⟩²/‖ḡ‖²)`` over the ``M`` seen micro-batches, divided by ``M·(1 − 1/N)``: each seen
``h_j`` is one of the ``N`` that make up ``ḡ``, so ``E‖h_j − ḡ‖² = (1 − 1/N)·σ²``; with ``M = N`` this is
the usual ``1/(N − 1)`` estimator. A statistic is proportional to ``1/N``, so the number of micro-batches
that would pass a test with threshold ``c`` is ``⌈N·T / c²⌉`` (:func:`required_micro_batches`).

Example::

    >>> import torch
    >>> h = torch.tensor([[1.0, 0.0], [3.0, 0.0]])  # two micro-batch gradients, ḡ = (2, 0)
    >>> g = h.mean(0)
    >>> stats = gradient_noise_statistics(h.pow(2).sum(1).sum(), (h @ g).sum(), torch.tensor(2.0),
    ...                                   g.pow(2).sum(), torch.tensor(2.0))
    >>> float(stats["norm"])  # Var = ((1-2)² + (3-2)²) / (2 - 1) = 2;  T = 2 / (2 · 4)
    0.25
    >>> int(required_micro_batches(stats["norm"], 0.25, torch.tensor(2.0)))  # ⌈2 · 0.25 / 0.0625⌉
    8
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def gradient_noise_statistics(sum_sq_norms: Tensor, sum_inner: Tensor, count: Tensor, mean_sq_norm: Tensor,
                              total: Tensor, sum_inner_dev_sq: Optional[Tensor] = None,
                              sum_orthogonal: Optional[Tensor] = None) -> dict[str, Tensor]:
    """The norm test's statistic and, given their sums, the inner-product and orthogonality statistics.

    All arguments are tensors of one shape (e.g. ``[steps]``); the outputs have it too. A step with
    ``count < 1``, ``total < 2``, ``‖ḡ‖² = 0`` or a non-finite input gives NaN (no evidence).

    Args:
        sum_sq_norms: ``Σ_j ‖h_j‖²`` over the ``M`` seen micro-batch gradients.
        sum_inner: ``Σ_j ⟨h_j, ḡ⟩``.
        count: ``M``, the number of seen micro-batch gradients.
        mean_sq_norm: ``‖ḡ‖²``, the squared norm of the step's mean gradient.
        total: ``N``, the number of micro-batch gradients that make up ``ḡ`` (all ranks).
        sum_inner_dev_sq: ``Σ_j (⟨h_j, ḡ⟩ − ‖ḡ‖²)²`` (inner-product test), or None.
        sum_orthogonal: ``Σ_j (‖h_j‖² − ⟨h_j, ḡ⟩² / ‖ḡ‖²)`` (orthogonality test), or None.

    Returns:
        ``{"norm": T_norm, "variance": Var(h)}`` plus ``"inner_product"`` and ``"orthogonality"`` when
        their sums are given.

    Example::

        >>> import torch
        >>> h = torch.tensor([[1.0, 1.0], [1.0, -1.0], [1.0, 0.0]]); g = h.mean(0)
        >>> c, a, g2 = h @ g, h.pow(2).sum(1), g.pow(2).sum()
        >>> s = gradient_noise_statistics(a.sum(), c.sum(), torch.tensor(3.0), g2, torch.tensor(3.0),
        ...                               (c - g2).pow(2).sum(), (a - c.pow(2) / g2).sum())
        >>> [round(float(s[k]), 4) for k in ("norm", "inner_product", "orthogonality")]
        [0.3333, 0.0, 0.3333]
    """
    count, total = count.float(), total.float()
    valid = (count >= 1) & (total >= 2) & (mean_sq_norm > 0)
    denominator = (count * (1.0 - 1.0 / total)).clamp_min(1e-12)
    scale = total * mean_sq_norm
    nan = torch.full_like(scale, float("nan"))
    variance = (sum_sq_norms - 2.0 * sum_inner + count * mean_sq_norm) / denominator
    out = {"variance": torch.where(valid, variance, nan), "norm": torch.where(valid, variance / scale, nan)}
    if sum_inner_dev_sq is not None:
        out["inner_product"] = torch.where(valid, sum_inner_dev_sq / denominator / (scale * mean_sq_norm), nan)
    if sum_orthogonal is not None:
        out["orthogonality"] = torch.where(valid, sum_orthogonal / denominator / scale, nan)
    for key, value in out.items():  # a non-finite input (an fp16 overflow) is no evidence either
        out[key] = torch.where(torch.isfinite(value), value, nan)
    return out


def required_micro_batches(statistic: Tensor, threshold: float, total: Tensor) -> Tensor:
    """``⌈N·T / c²⌉``: how many micro-batches make a test with statistic ``T`` at ``N`` pass at threshold ``c``.

    The statistic scales as ``1/N``, so at ``N' = N·T/c²`` micro-batches it equals ``c²``.

    Example::

        >>> import torch
        >>> required_micro_batches(torch.tensor([0.5, 0.01]), 0.5, torch.tensor(4.0)).tolist()
        [8.0, 1.0]
    """
    return torch.ceil(total.float() * statistic / threshold ** 2 - 1e-6).clamp_min(1.0)
