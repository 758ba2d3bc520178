"""Dynamic Bad Pair Mining (DBPM): flag positive pairs whose loss history is abnormal, and bound their weight.

Each positive pair ``i`` has a history of per-epoch losses ``ℓ_i^(e)``. After a warm-up, its summary
``m_i`` (:func:`history_mean`) is compared with the distribution of the summaries over all pairs
(mean ``μ``, standard deviation ``σ`` with ddof 0, :func:`dbpm_flags`):

* **noisy** pairs (the model aligns them too easily, e.g. near-identical views): ``m_i ≤ μ − β_np·σ``;
* **faulty** pairs (they never align, e.g. a wrong positive): ``m_i ≥ μ + β_fp·σ``.

Flagged pairs are down-weighted with :func:`dbpm_weights`, ``exp(−(ℓ − μ)² / 2σ²)``: a Gaussian
*kernel*, which lies in ``(0, 1]`` whatever ``σ``. The reference implementation multiplies by the
Gaussian *density* ``exp(−(ℓ − μ)² / 2σ²) / (σ√(2π))`` instead, whose peak ``1/(σ√(2π))`` exceeds 1
when ``σ < 1/√(2π) ≈ 0.399``: it then *up*-weights the very pairs it flagged.

Example::

    >>> import torch
    >>> m = torch.tensor([1.0] * 10 + [1.2] * 10 + [0.6, 2.0])  # per-pair mean losses
    >>> flags, mu, sigma = dbpm_flags(m, beta_np=2.0, beta_fp=3.0)
    >>> flags.tolist()[-3:], round(mu, 3), round(sigma, 3)
    ([0, 1, 2], 1.118, 0.239)
    >>> [round(w, 4) for w in dbpm_weights(torch.tensor([1.118, 0.6, 2.0]), flags[-3:], mu, sigma).tolist()]
    [1.0, 0.0946, 0.0011]
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

OK, NOISY, FAULTY = 0, 1, 2


def history_mean(sum_loss: Tensor, count: Tensor, sum_weighted: Tensor, sum_weights: Tensor,
                 history: Literal["mean", "weighted"] = "mean") -> Tensor:
    """``[N]`` float64 summary ``m_i`` of each pair's loss history from running sums (NaN when never seen).

    ``"mean"``: ``Σ_e ℓ^(e) / n``. ``"weighted"``: a linear recency weighting, ``Σ_e (e+1)·ℓ^(e) / Σ_e (e+1)``
    over the epochs ``e`` (0-based) in which the pair was presented, so epoch 9 counts ten times as much
    as epoch 0 and the early, still-untrained epochs fade as training goes on. The caller keeps
    ``sum_weighted = Σ (e+1)·ℓ`` and ``sum_weights = Σ (e+1)``.

    Example::

        >>> s = lambda *v: torch.tensor(v, dtype=torch.float64)
        >>> history_mean(s(4.0), s(2), s(1 * 3.0 + 2 * 1.0), s(3.0), "weighted").tolist()  # losses 3, 1 in epochs 0, 1
        [1.6666666666666667]
    """
    if history not in ("mean", "weighted"):
        raise ValueError(f"Expected `history` to be 'mean' or 'weighted', but got {history!r}.")
    num, den = (sum_loss, count) if history == "mean" else (sum_weighted, sum_weights)
    den = den.double()
    return torch.where(den > 0, num.double() / den.clamp_min(1e-300), torch.full_like(den, float("nan")))


def dbpm_flags(mean_loss: Tensor, beta_np: float = 2.0, beta_fp: float = 3.0) -> tuple[Tensor, float, float]:
    """``(flags [N] int64, μ, σ)``: 0 ok, 1 noisy (``m ≤ μ − β_np·σ``), 2 faulty (``m ≥ μ + β_fp·σ``).

    ``μ`` and ``σ`` (ddof 0) are taken over the pairs with a finite ``m``; pairs with NaN (never seen)
    are 0 and do not count. With fewer than two such pairs, or ``σ = 0``, nothing is flagged.

    Example::

        >>> dbpm_flags(torch.tensor([0.0, 1.0, float("nan")]), 0.5, 0.5)[0].tolist()
        [1, 2, 0]
    """
    if not (beta_np > 0 and beta_fp > 0):
        raise ValueError(f"Expected `beta_np` > 0 and `beta_fp` > 0, but got {beta_np} and {beta_fp}.")
    m = mean_loss.double()
    valid = torch.isfinite(m)
    flags = torch.zeros(m.shape, dtype=torch.long)
    if int(valid.sum()) < 2:
        return flags, float("nan"), float("nan")
    values = m[valid]
    mu = float(values.mean())
    sigma = float((values - mu).square().mean().sqrt())
    if sigma == 0.0:
        return flags, mu, sigma
    flags[valid & (m <= mu - beta_np * sigma)] = NOISY
    flags[valid & (m >= mu + beta_fp * sigma)] = FAULTY
    return flags, mu, sigma


def dbpm_weights(losses: Tensor, flags: Tensor, mu: float, sigma: float, min_weight: float = 1e-3) -> Tensor:
    """``[B]`` weights: ``max(exp(−(ℓ − μ)² / 2σ²), min_weight)`` for flagged rows (``flags > 0``), 1 otherwise.

    Always in ``[min_weight, 1]`` (``0 < min_weight ≤ 1``): a flagged pair is never up-weighted, and the
    floor keeps a far-out pair from vanishing entirely (``exp`` underflows to 0 beyond ~13σ in float32).
    ``σ`` must be positive and finite (:func:`dbpm_flags` flags nothing otherwise).

    Example::

        >>> w = dbpm_weights(torch.tensor([1.0, 1.0, 5.0]), torch.tensor([0, 1, 2]), mu=1.0, sigma=0.1)
        >>> w.tolist()  # the density at ℓ = μ would be 1/(0.1·√(2π)) ≈ 3.99
        [1.0, 1.0, 0.0010000000474974513]
    """
    if not 0.0 < min_weight <= 1.0:
        raise ValueError(f"Expected `min_weight` in (0, 1], but got {min_weight}.")
    if losses.shape != flags.shape:
        raise ValueError(f"Expected one flag per loss, but got {tuple(flags.shape)} flags for {tuple(losses.shape)} losses.")
    ones = torch.ones_like(losses.detach(), dtype=torch.float32)
    if not (math.isfinite(sigma) and sigma > 0):
        return ones
    z = (losses.detach().double() - mu) / sigma
    kernel = torch.exp(-0.5 * z.square()).clamp_min(min_weight).float()
    return torch.where(flags.to(losses.device) > 0, kernel, ones)
