"""Selection rules of Selective-Backprop (Jiang et al. 2019), Composer's variant, and a uniform baseline.

Pure tensor functions: losses and an explicit :class:`torch.Generator` in, probabilities, keep-masks
or sorted positions out. The callbacks are
:class:`~lightning_select.policies.selective_backprop.SelectiveBackprop` and
:class:`~lightning_select.policies.uniform_subset.UniformSubset`.

* :func:`selective_backprop_probabilities`: the paper's ``P = max(floor, F(ℓ)^β)``, with ``F`` the
  percentile of each loss among the last ``R`` losses (scipy's ``percentileofscore(kind="rank")``,
  as in the authors' code), vectorised with ``searchsorted``.
* :func:`bernoulli_keep`: one independent draw per sample.
* :func:`composer_keep`: MosaicML Composer's rank rule (``int(keep·N)`` rows without replacement).
* :func:`uniform_keep`: a uniform subset of fixed size (the fair baseline at the same kept fraction).
* :func:`push_history`: the ring buffer of recent losses that ``F`` is measured against.

Example::

    >>> import torch
    >>> history = torch.tensor([0.1, 0.2, 0.3, 0.4, float("nan")])   # NaN = empty slot
    >>> selective_backprop_probabilities(torch.tensor([0.05, 0.3, 9.0]), history, beta=1.0)
    tensor([0.0000, 0.7500, 1.0000])
"""

from __future__ import annotations

import torch
from torch import Tensor


def loss_percentiles(losses: Tensor, history_losses: Tensor) -> Tensor:
    """``F(ℓ)`` in [0, 1] (float64): the percentile rank of each loss among the finite entries of ``history_losses``.

    The definition of scipy's ``percentileofscore(history, ℓ, kind="rank") / 100``: with ``L`` the
    number of history values below ``ℓ`` and ``E`` the number equal to it, ``F = (2L + E + [E > 0]) / 2n``
    (ties get the mean of their ranks; a loss that is itself in the history counts itself). NaN
    slots are ignored. With an empty history every ``F`` is 1. A NaN loss gets ``F = 1``.

    Example::

        >>> loss_percentiles(torch.tensor([1.0, 2.0, 2.5]), torch.tensor([1.0, 2.0, 2.0, 3.0])).tolist()
        [0.25, 0.625, 0.75]
    """
    history = history_losses.detach().reshape(-1)
    history = history[~history.isnan()].to(losses.device, torch.float32).sort().values
    n = history.numel()
    x = losses.detach().reshape(-1).float()
    if n == 0:
        return torch.ones(x.shape, dtype=torch.float64, device=x.device).reshape(losses.shape)
    below = torch.searchsorted(history, x)  # L
    at_most = torch.searchsorted(history, x, right=True)  # L + E
    f = (below + at_most + (at_most > below)).double() / (2 * n)  # (2L + E + [E > 0]) / 2n
    return f.masked_fill_(x.isnan(), 1.0).reshape(losses.shape)


def selective_backprop_probabilities(losses: Tensor, history_losses: Tensor, beta: float = 3.0,
                                     floor: float = 0.0) -> Tensor:
    """Selective-Backprop's selection probability ``P(ℓ) = max(floor, F(ℓ)^β)`` (float32, like ``losses``' shape).

    ``F`` is :func:`loss_percentiles` against ``history_losses`` (``[R]``, NaN = empty slot). With
    ``β = 3`` and losses spread like the history, ``E[P] = ∫ u³ du = 1/(β+1) = 1/4``: the paper keeps
    about a quarter. A NaN loss gets ``P = 1``, so that it reaches the engine's ``nan_policy``.

    Example::

        >>> history = torch.arange(1.0, 11.0)          # losses 1 .. 10
        >>> selective_backprop_probabilities(torch.tensor([10.0, 5.0, 0.0]), history, beta=2.0, floor=0.1)
        tensor([1.0000, 0.2500, 0.1000])
    """
    f = loss_percentiles(losses, history_losses)
    return f.pow(float(beta)).clamp_min(float(floor)).to(torch.float32)


def bernoulli_keep(probabilities: Tensor, generator: torch.Generator) -> Tensor:
    """``[N]`` bool keep-mask: row ``i`` kept with probability ``probabilities[i]``, independently.

    The uniforms are drawn on the generator's device (CPU for ``StepContext.generator``), so the
    draw does not depend on where ``probabilities`` live. ``P = 1`` is always kept, ``P = 0`` never.

    Example::

        >>> bernoulli_keep(torch.tensor([1.0, 0.0, 1.0]), torch.Generator().manual_seed(0))
        tensor([ True, False,  True])
    """
    u = torch.rand(probabilities.shape, generator=generator, device=generator.device)
    return u.to(probabilities.device) < probabilities


def composer_keep(losses: Tensor, keep: float, generator: torch.Generator) -> Tensor:
    """MosaicML Composer's Selective-Backprop rule: sorted positions of ``int(keep·N)`` rows.

    Rank the batch by loss (ascending, stable), give rank ``r`` the percentile ``p_r = (r + 0.5)/N``
    and draw ``int(keep·N)`` rows without replacement with weights ``p_r^(1/keep − 1)``
    (``torch.multinomial``: successive draws, like Composer's ``np.random.choice``). With
    ``keep = 1/(β+1)`` the weights are the paper's ``F^β``. No reweighting: biased towards high losses.

    Example::

        >>> positions = composer_keep(torch.tensor([0.1, 5.0, 0.2, 4.0]), 0.5, torch.Generator().manual_seed(0))
        >>> positions.tolist(), positions.dtype
        ([1, 3], torch.int64)
    """
    n = losses.numel()
    count = int(keep * n)
    if count == 0:
        return torch.zeros(0, dtype=torch.long, device=losses.device)
    order = torch.argsort(losses.detach().reshape(-1).cpu(), stable=True)
    percentiles = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    weights = percentiles.pow(1.0 / keep - 1.0)
    drawn = torch.multinomial(weights, count, replacement=False, generator=generator)
    return order[drawn].sort().values.to(losses.device)


def uniform_keep(n: int, keep: float, generator: torch.Generator) -> Tensor:
    """Sorted positions of ``max(1, int(round(keep·n)))`` of ``n`` rows, uniformly without replacement.

    Every row is kept with probability ``k/n`` and every ``k``-subset is equally likely, so the mean
    loss of the subset is an unbiased estimate of the batch's mean loss. Empty for ``n = 0``.

    Example::

        >>> uniform_keep(8, 0.5, torch.Generator().manual_seed(0)).numel()
        4
    """
    if n <= 0:
        return torch.zeros(0, dtype=torch.long)
    count = min(n, max(1, round(keep * n)))
    return torch.randperm(n, generator=generator)[:count].sort().values


def push_history(history: Tensor, position: int, values: Tensor) -> int:
    """Write ``values`` into the ring buffer ``history`` (in place) from slot ``position``; returns the next slot.

    The oldest entries are overwritten first; with more values than slots, only the last
    ``len(history)`` are kept. Vectorised (one indexed write).

    Example::

        >>> buffer = torch.full((4,), float("nan"))
        >>> push_history(buffer, 3, torch.tensor([1.0, 2.0]))
        1
        >>> buffer
        tensor([2., nan, nan, 1.])
    """
    size = history.numel()
    values = values.detach().reshape(-1).to(history.device, history.dtype)
    m = values.numel()
    after = (position + m) % size
    if m > size:  # only the last `size` values survive; they start where the earlier ones would have ended
        position, values = (position + m - size) % size, values[m - size:]
    slots = (position + torch.arange(values.numel(), device=history.device)) % size
    history[slots] = values
    return after
