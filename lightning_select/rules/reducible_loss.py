"""RHO-LOSS selection (Mindermann et al., ICML 2022, "Prioritized Training on Points that are
Learnable, Worth Learning, and Not Yet Learnt").

The score of a sample is its *reducible* loss: its training loss under the current model minus its
*irreducible* loss, the loss of a model trained on held-out data (precomputed once per sample).
Noisy or ambiguous samples have a high loss under both models, so their reducible loss stays low
and they are rarely selected; learnt samples have a low training loss and are skipped as well.

From a loaded batch of ``n`` samples, the deterministic top ``⌈keep·n⌉`` reducible losses are kept
(ties broken by position, lower first), and trained with a plain mean: biased by design.

Under DDP, :func:`global_top_fraction` keeps the top ``⌈keep·W·B⌉`` of all ranks' scores; every rank
computes the same threshold from the same gathered tensor and returns its own share.

Example::

    >>> import torch
    >>> r = reducible_loss(torch.tensor([2.0, 1.0, 3.0, 0.5]), torch.tensor([1.5, 0.1, 0.2, 0.4]))
    >>> [round(v, 2) for v in r.tolist()]
    [0.5, 0.9, 2.8, 0.1]
    >>> top_fraction(r, 0.5).tolist()
    [1, 2]
    >>> gathered = torch.tensor([[0.5, 0.9], [2.8, 0.1]])   # [W=2, B=2]
    >>> global_top_fraction(gathered[0], gathered, 0, 0.5).tolist(), global_top_fraction(gathered[1], gathered, 1, 0.5).tolist()
    ([1], [0])
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor


def reducible_loss(losses: Tensor, irreducible: Tensor) -> Tensor:
    """``[B]`` ``losses − irreducible`` in fp32 (detached): the RHO-LOSS score."""
    if losses.shape != irreducible.shape:
        raise ValueError(f"Expected losses and irreducible losses of the same shape, but got {tuple(losses.shape)} "
                         f"and {tuple(irreducible.shape)}.")
    return losses.detach().float() - irreducible.detach().float().to(losses.device)


def keep_count(keep: float, n: int) -> int:
    """``⌈keep·n⌉`` (at least 1 when ``n > 0``), robust to float round-off (``0.1·320`` is 32, not 33).

    Example::

        >>> keep_count(0.1, 320), keep_count(0.1, 125), keep_count(1.0, 7), keep_count(0.3, 0)
        (32, 13, 7, 0)
    """
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"Expected `keep` in (0, 1], but got {keep}.")
    if n <= 0:
        return 0
    return min(n, max(1, math.ceil(round(keep * n, 9))))


def _ranked(scores: Tensor) -> Tensor:
    """Positions sorted by descending score; ties by ascending position (a stable sort). NaN ranks last."""
    s = scores.detach().float().nan_to_num(nan=float("-inf"))
    return torch.sort(s, descending=True, stable=True).indices


def top_fraction(scores: Tensor, keep: float) -> Tensor:
    """Sorted ``int64`` positions of the deterministic top ``⌈keep·n⌉`` scores (ties: lower position first).

    Example::

        >>> top_fraction(torch.tensor([1.0, 3.0, 3.0, 2.0]), 0.5).tolist()
        [1, 2]
    """
    if scores.dim() != 1:
        raise ValueError(f"Expected [n] scores, but got shape {tuple(scores.shape)}.")
    k = keep_count(keep, scores.numel())
    return _ranked(scores)[:k].sort().values


def global_top_fraction(local_scores: Tensor, gathered_scores: Tensor, rank: int, keep: float,
                        counts: Optional[Tensor] = None) -> Tensor:
    """This rank's sorted positions of the global top ``⌈keep·W·B⌉`` of ``gathered_scores`` ``[W, B]``.

    Every rank calls it with the same gathered tensor, so every rank computes the same global
    selection (ties broken by global position ``rank·B + position``) and returns its own share;
    ranks may then keep different counts. ``local_scores`` must be row ``rank`` of the gathered
    tensor (it is checked). ``counts`` (``[W]``, optional): the number of valid leading entries of
    each row, for ranks with fewer than ``B`` rows (the rest is padding and never kept); the global
    count is then ``⌈keep·Σ counts⌉``.

    Example::

        >>> g = torch.tensor([[5.0, 1.0, 4.0], [3.0, 2.0, 0.0]])
        >>> global_top_fraction(g[0], g, 0, 0.5).tolist(), global_top_fraction(g[1], g, 1, 0.5).tolist()
        ([0, 2], [0])
    """
    if gathered_scores.dim() != 2 or not 0 <= rank < gathered_scores.shape[0]:
        raise ValueError(f"Expected gathered scores [W, B] and a rank in [0, W), but got shape "
                         f"{tuple(gathered_scores.shape)} and rank {rank}.")
    width = gathered_scores.shape[1]
    n_local = local_scores.numel() if counts is None else int(counts[rank])
    if n_local != local_scores.numel() or not torch.equal(
            local_scores.detach().float().cpu(), gathered_scores[rank, :n_local].detach().float().cpu()):
        raise ValueError(f"local_scores must equal row {rank} of gathered_scores.")
    flat = gathered_scores.detach().float().clone()
    valid = torch.ones_like(flat, dtype=torch.bool)
    if counts is not None:
        valid = torch.arange(width, device=flat.device).unsqueeze(0) < counts.to(flat.device).view(-1, 1)
    flat = flat.nan_to_num(nan=float("-inf")).reshape(-1)
    valid = valid.reshape(-1)
    k = keep_count(keep, int(valid.sum()))
    order = _ranked(flat)
    order = order[valid[order]][:k]  # padding never counts, whatever its value
    mine = order[order // width == rank] % width
    return mine.sort().values.to(local_scores.device)


def threshold_of(scores: Tensor, keep: float) -> float:
    """The smallest kept score of :func:`top_fraction` (NaN for no scores)."""
    if scores.numel() == 0:
        return float("nan")
    k = keep_count(keep, scores.numel())
    return float(scores.detach().float().nan_to_num(nan=float("-inf")).sort(descending=True).values[k - 1])
