"""Per-sample training dynamics: the per-row values of one training pass and their reductions over epochs.

Per row of one training step (``logits [B, C]``, class ``targets [B]``), all from the ordinary
training forward pass:

* :func:`true_class_probability`: ``p_y = softmax(z)_y``;
* :func:`predicted_correct`: ``argmax z == y``;
* :func:`aum_margin`: ``z_y − max_{j≠y} z_j`` (the margin whose mean over training is the AUM);
* :func:`el2n`: ``‖softmax(z) − onehot(y)‖₂``.

Reductions over a sample's presentations (``[N, E]`` matrices, one column per presentation, NaN where
the sample was not presented), as defined by dataset cartography (Swayamdipta et al., 2020),
forgetting events (Toneva et al., 2019) and the area under the margin (Pleiss et al., 2020):

* :func:`cartography`: confidence (mean of ``p_y``), variability (its standard deviation, ddof 0) and
  correctness (the fraction of presentations predicted correctly);
* :func:`forgetting_events`: the number of correct → wrong flips between consecutive presentations,
  ``+inf`` for a sample never predicted correctly (never learned), NaN for one never presented;
* :func:`area_under_margin`: the mean margin.

:func:`cartography_from_sums` gives the same cartography values from running sums (what an
incremental table keeps), and :func:`roc_auc` ranks a statistic against known mislabelled samples.

Example::

    >>> import torch
    >>> logits, y = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 3.0]]), torch.tensor([0, 1])
    >>> predicted_correct(logits, y).tolist(), aum_margin(logits, y).tolist()
    ([True, False], [2.0, -2.0])
"""

from __future__ import annotations

import torch
from torch import Tensor


def _check_rows(logits: Tensor, targets: Tensor) -> None:
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(f"Expected `logits` of shape [B, C] with C >= 2, but got {tuple(logits.shape)}.")
    if targets.dim() != 1 or targets.shape[0] != logits.shape[0]:
        raise ValueError(f"Expected `targets` of shape [{logits.shape[0]}] (one class per row), but got "
                         f"{tuple(targets.shape)}.")


def true_class_probability(logits: Tensor, targets: Tensor) -> Tensor:
    """``[B]`` float32 softmax probability of each row's target class (computed as ``exp(log_softmax)``).

    Example::

        >>> round(float(true_class_probability(torch.tensor([[0.0, 0.0]]), torch.tensor([1]))[0]), 4)
        0.5
    """
    _check_rows(logits, targets)
    log_p = torch.log_softmax(logits.detach().float(), dim=1)
    return log_p.gather(1, targets.long().view(-1, 1)).squeeze(1).exp()


def predicted_correct(logits: Tensor, targets: Tensor) -> Tensor:
    """``[B]`` bool: the arg-max class (the first one on ties) is the target.

    Example::

        >>> predicted_correct(torch.tensor([[1.0, 1.0], [0.0, 2.0]]), torch.tensor([1, 1])).tolist()
        [False, True]
    """
    _check_rows(logits, targets)
    return logits.detach().argmax(dim=1) == targets.long()


def aum_margin(logits: Tensor, targets: Tensor) -> Tensor:
    """``[B]`` float32 margin ``z_y − max_{j≠y} z_j``: positive when the target wins, negative when another class does.

    Example::

        >>> aum_margin(torch.tensor([[3.0, 1.0, 2.0]]), torch.tensor([2])).tolist()
        [-1.0]
    """
    _check_rows(logits, targets)
    z = logits.detach().float()
    y = targets.long().view(-1, 1)
    assigned = z.gather(1, y).squeeze(1)
    others = z.scatter(1, y, float("-inf")).amax(dim=1)
    return assigned - others


def el2n(logits: Tensor, targets: Tensor) -> Tensor:
    """``[B]`` float32 error L2 norm ``‖softmax(z) − onehot(y)‖₂`` (Paul et al., 2021), in ``[0, √2]``.

    Example::

        >>> round(float(el2n(torch.tensor([[0.0, 0.0]]), torch.tensor([0]))[0]), 4)  # ‖(−0.5, 0.5)‖
        0.7071
    """
    _check_rows(logits, targets)
    p = torch.softmax(logits.detach().float(), dim=1)
    onehot = torch.zeros_like(p).scatter_(1, targets.long().view(-1, 1), 1.0)
    return (p - onehot).norm(dim=1)


# ---------------------------------------------------------------------------- reductions over presentations
def _presented(values: Tensor) -> tuple[Tensor, Tensor]:
    if values.dim() != 2:
        raise ValueError(f"Expected an [N, E] matrix (one column per presentation), but got {tuple(values.shape)}.")
    seen = ~values.isnan()
    return seen, seen.sum(dim=1)


def cartography(p_true: Tensor, correct: Tensor) -> dict[str, Tensor]:
    """Dataset cartography from ``[N, E]`` per-presentation values (NaN where not presented).

    ``confidence`` = mean of ``p_true``, ``variability`` = its standard deviation with ddof 0,
    ``correctness`` = mean of ``correct`` (0/1). All ``[N]`` float64, NaN for a sample never presented.

    Example::

        >>> p = torch.tensor([[0.2, 0.6, float("nan")]])
        >>> c = torch.tensor([[0.0, 1.0, float("nan")]])
        >>> {k: round(float(v), 3) for k, v in cartography(p, c).items()}
        {'confidence': 0.4, 'variability': 0.2, 'correctness': 0.5}
    """
    if p_true.shape != correct.shape:
        raise ValueError(f"Expected `p_true` and `correct` of one shape, but got {tuple(p_true.shape)} and "
                         f"{tuple(correct.shape)}.")
    seen, n = _presented(p_true.double())
    p = p_true.double().nan_to_num(0.0)
    count = n.double()
    mean = p.sum(dim=1) / count
    var = (((p - mean.view(-1, 1)) * seen).square().sum(dim=1) / count)
    correctness = correct.double().nan_to_num(0.0).mul(seen).sum(dim=1) / count
    return {"confidence": mean, "variability": var.sqrt(), "correctness": correctness}


def cartography_from_sums(count: Tensor, sum_p: Tensor, sum_p2: Tensor, correct_count: Tensor) -> dict[str, Tensor]:
    """The :func:`cartography` values from running sums: ``n``, ``Σp``, ``Σp²`` and the number of correct presentations.

    ``variability = sqrt(max(Σp²/n − (Σp/n)², 0))`` (the clamp absorbs rounding; use float64 sums).
    NaN where ``n = 0``.

    Example::

        >>> out = cartography_from_sums(torch.tensor([2]), torch.tensor([0.8], dtype=torch.float64),
        ...                             torch.tensor([0.4], dtype=torch.float64), torch.tensor([1]))
        >>> {k: round(float(v), 3) for k, v in out.items()}
        {'confidence': 0.4, 'variability': 0.2, 'correctness': 0.5}
    """
    n = count.double()
    n_safe = torch.where(n > 0, n, torch.ones_like(n))
    mean = sum_p.double() / n_safe
    var = (sum_p2.double() / n_safe - mean.square()).clamp_min(0.0)
    nan = torch.full_like(mean, float("nan"))
    unseen = n == 0
    return {"confidence": torch.where(unseen, nan, mean), "variability": torch.where(unseen, nan, var.sqrt()),
            "correctness": torch.where(unseen, nan, correct_count.double() / n_safe)}


def forgetting_events(correct: Tensor) -> Tensor:
    """``[N]`` float64 count of correct → wrong flips between consecutive presentations of each sample.

    ``correct`` is ``[N, E]`` with 1/0 per presentation and NaN where the sample was not presented
    (skipped: "consecutive" means consecutive presentations). A sample never predicted correctly
    gets ``+inf`` (never learned: the most forgettable), one never presented NaN.

    Example::

        >>> nan = float("nan")
        >>> forgetting_events(torch.tensor([[1.0, 0.0, nan, 1.0, 0.0], [0.0, 0.0, 0.0, nan, nan],
        ...                                 [nan, nan, nan, nan, nan], [0.0, 1.0, 1.0, 1.0, 1.0]])).tolist()
        [2.0, inf, nan, 0.0]
    """
    seen, n = _presented(correct.double())
    c = correct.double()
    # move each row's presented values to the front, in order, so that consecutive presentations are adjacent
    order = torch.argsort((~seen).to(torch.int8), dim=1, stable=True)
    packed = c.gather(1, order)
    valid = seen.gather(1, order)
    flips = (packed[:, :-1] == 1) & (packed[:, 1:] == 0) & valid[:, 1:]
    events = flips.sum(dim=1).double()
    ever = ((c == 1) & seen).any(dim=1)
    events = torch.where(ever, events, torch.full_like(events, float("inf")))
    return torch.where(n > 0, events, torch.full_like(events, float("nan")))


def area_under_margin(margins: Tensor) -> Tensor:
    """``[N]`` float64 AUM: the mean over presentations of the :func:`aum_margin` (NaN if never presented).

    Example::

        >>> area_under_margin(torch.tensor([[1.0, -3.0, float("nan")]])).tolist()
        [-1.0]
    """
    _, n = _presented(margins.double())
    return margins.double().nan_to_num(0.0).sum(dim=1) / n.double()


def roc_auc(scores: Tensor, labels: Tensor) -> float:
    """Binary ROC-AUC of ``scores`` (higher = more likely positive) against bool/0-1 ``labels``.

    Rank-based (the Mann-Whitney U statistic): ``(Σ ranks of positives − P(P+1)/2) / (P·N)``, with tied
    scores given their average rank, so a tie between a positive and a negative counts one half.
    Infinite scores are ranked like any other value. Raises ``ValueError`` for NaN scores or when
    either class is absent. To rank samples by a statistic that is *low* for positives (AUM,
    confidence), pass its negation.

    Example::

        >>> roc_auc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1]))
        0.75
        >>> roc_auc(torch.tensor([1.0, 1.0]), torch.tensor([0, 1]))
        0.5
    """
    s = torch.as_tensor(scores).double().reshape(-1)
    y = torch.as_tensor(labels).reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"Expected one label per score, but got {s.numel()} scores and {y.numel()} labels.")
    if bool(s.isnan().any()):
        raise ValueError(f"roc_auc got {int(s.isnan().sum())} NaN scores; drop the samples without a value first.")
    y = y.bool() if y.dtype == torch.bool else y != 0
    positives = int(y.sum())
    negatives = y.numel() - positives
    if positives == 0 or negatives == 0:
        raise ValueError(f"roc_auc needs both classes, but got {positives} positives and {negatives} negatives.")
    sorted_s, order = s.sort()
    _, counts = torch.unique_consecutive(sorted_s, return_counts=True)
    ends = counts.cumsum(0).double()
    average = (ends - counts.double() + 1 + ends) / 2  # mean of the 1-based ranks start..end of each tie group
    ranks = torch.empty_like(s)
    ranks[order] = average.repeat_interleave(counts)
    u = float(ranks[y].sum()) - positives * (positives + 1) / 2
    return u / (positives * negatives)
