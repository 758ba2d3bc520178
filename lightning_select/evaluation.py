"""Evaluation helpers: retrieval by relevance matrix, STS Spearman, and false-negative detection.

Example::

    >>> import torch
    >>> e = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    >>> rel = torch.tensor([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]], dtype=torch.bool)
    >>> retrieval_report(e, rel)
    {'ndcg@10': 1.0, 'mrr@10': 1.0, 'recall@1': 1.0, 'recall@10': 1.0}
    >>> fnd = false_negative_detection(torch.tensor([[True, False]]), torch.tensor([[True, True]]))
    >>> fnd["precision"], fnd["recall"]
    (1.0, 0.5)
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.functional import spearman_corrcoef
from torchmetrics import Metric
from torchmetrics.retrieval import RetrievalMRR, RetrievalNormalizedDCG, RetrievalRecall

_CHUNK_ENTRIES = 4_000_000  # query-by-document scores held at once


def retrieval_scores(cosines: Tensor) -> Tensor:
    """Cosines as torchmetrics retrieval scores: shifted into ``[1, 3]``, in float64 (float32 on MPS).

    torchmetrics >= 1.8 counts a document with a score <= 0 as not retrieved (recall, MRR, ...); the
    shift keeps every ranking, and float64 keeps nearby cosines apart.

    Example::

        >>> retrieval_scores(torch.tensor([-1.0, 0.0, 1.0])).tolist()
        [1.0, 2.0, 3.0]
    """
    return cosines.to(torch.float32 if cosines.device.type == "mps" else torch.float64) + 2.0


def _relevance_rows(relevant: Tensor, rows: Tensor) -> Tensor:
    """``[c, N]`` relevance of the query rows (from a bool matrix or a label vector), self excluded."""
    if relevant.dim() == 1:
        rel = relevant[rows].view(-1, 1) == relevant.view(1, -1)
    else:
        rel = relevant[rows].bool().clone()
    rel[torch.arange(rows.shape[0], device=rel.device), rows] = False
    return rel


def retrieval_report(
    embeddings: Tensor,
    relevant: Tensor,
    ks: Sequence[int] = (1, 10),
    chunk_size: Optional[int] = None,
) -> dict[str, float]:
    """Leave-one-out retrieval: every item with a relevant other item queries all *other* items.

    Scores are cosine similarities. Metrics come from ``torchmetrics.retrieval`` (binary
    relevance), averaged over the queries: ``ndcg@10``, ``mrr@10`` and ``recall@k`` for every ``k``
    in ``ks`` (relevant items in the top ``k`` over all relevant items of the query); ties are
    broken arbitrarily. Items without a relevant other item are not queries (they are still
    documents).

    Queries are processed in chunks of ``chunk_size`` (default: about 4M scores at a time), and
    torchmetrics only gets each query's top ``max(10, *ks)`` documents plus its relevant ones,
    which leaves every metric unchanged; ``N`` of ~10k takes seconds. The cosines are shifted to
    ``[1, 3]`` first, because recent torchmetrics versions count a document scored ``<= 0`` as not
    retrieved.

    Args:
        embeddings: ``[N, D]`` embeddings (need not be normalised).
        relevant: ``[N, N]`` bool, ``relevant[i, j]`` = item ``j`` is relevant to query ``i`` (the
            diagonal is ignored); or ``[N]`` integer labels, where the same label means relevant.
        ks: cut-offs of ``recall@k``.
        chunk_size: queries per chunk.

    Returns:
        ``{"ndcg@10", "mrr@10", "recall@k"...}`` as floats; all NaN when no item is a query.

    Example::

        >>> e = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.8, 0.2], [0.3, 0.7]])
        >>> r = retrieval_report(e, torch.tensor([0, 0, 1, 1]), ks=(1,))
        >>> r["recall@1"], round(r["mrr@10"], 3)
        (0.0, 0.417)
    """
    if embeddings.dim() != 2:
        raise ValueError(f"Expected `embeddings` of shape [N, D], but got {tuple(embeddings.shape)}.")
    n = embeddings.shape[0]
    as_matrix = relevant.dim() == 2 and tuple(relevant.shape) == (n, n)
    if not (as_matrix or (relevant.dim() == 1 and relevant.shape[0] == n)):
        raise ValueError(
            f"Expected `relevant` to be a [{n}, {n}] bool matrix or [{n}] labels, but got {tuple(relevant.shape)}."
        )
    if relevant.dim() == 2 and relevant.dtype != torch.bool:
        raise ValueError(f"Expected a bool relevance matrix, but got dtype {relevant.dtype}. Use `relevant.bool()`.")
    if not ks or any(not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"Expected `ks` to be positive ints, but got {ks!r}.")
    names = ["ndcg@10", "mrr@10"] + [f"recall@{k}" for k in ks]
    device = embeddings.device
    relevant = relevant.to(device)
    e = F.normalize(embeddings.detach().float(), dim=-1)

    if relevant.dim() == 1:
        _, inverse, sizes = torch.unique(relevant, return_inverse=True, return_counts=True)
        counts = sizes[inverse] - 1
    else:
        counts = relevant.sum(1) - relevant.diagonal().long()
    queries = torch.nonzero(counts > 0).flatten()
    if queries.numel() == 0:
        return {name: math.nan for name in names}

    metrics: dict[str, Metric] = {
        "ndcg@10": RetrievalNormalizedDCG(top_k=10),
        "mrr@10": RetrievalMRR(top_k=10),
        **{f"recall@{k}": RetrievalRecall(top_k=k) for k in ks},
    }
    chunk = chunk_size or max(1, _CHUNK_ENTRIES // max(n, 1))
    totals = dict.fromkeys(names, 0.0)
    depth = min(max(10, *ks), n - 1)
    for start in range(0, queries.numel(), chunk):
        rows = queries[start : start + chunk]
        c = rows.shape[0]
        on_self = (torch.arange(c, device=device), rows)
        scores = e[rows] @ e.T
        scores[on_self] = float("-inf")
        target = _relevance_rows(relevant, rows)
        # Only the top `depth` documents and the relevant ones change a metric @<=depth, so torchmetrics
        # gets just those: identical values, far fewer scores to sort.
        keep = target.clone()
        keep.scatter_(1, scores.topk(depth, dim=1).indices, True)
        keep[on_self] = False
        group = torch.arange(c, device=device).view(-1, 1).expand(c, n)
        preds = retrieval_scores(scores[keep])
        target, group = target[keep], group[keep]
        for name, metric in metrics.items():
            metric.to(device)
            metric.update(preds, target, indexes=group)
            totals[name] += float(metric.compute()) * c
            metric.reset()
    return {name: totals[name] / queries.numel() for name in names}


def sts_spearman(emb1: Tensor, emb2: Tensor, gold_scores: Tensor) -> float:
    """Spearman correlation between pairwise cosine similarities and gold scores (STS protocol).

    Args:
        emb1: ``[N, D]`` embeddings of the first sentences.
        emb2: ``[N, D]`` embeddings of the second sentences.
        gold_scores: ``[N]`` gold similarity scores.

    Example::

        >>> a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
        >>> b = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
        >>> round(sts_spearman(a, b, torch.tensor([5.0, 3.0, 0.5])), 4)
        1.0
    """
    if emb1.dim() != 2 or emb1.shape != emb2.shape:
        raise ValueError(
            f"Expected `emb1` and `emb2` to be [N, D] of one shape, but got {tuple(emb1.shape)} and "
            f"{tuple(emb2.shape)}."
        )
    if gold_scores.shape != (emb1.shape[0],):
        raise ValueError(f"Expected `gold_scores` of shape [{emb1.shape[0]}], but got {tuple(gold_scores.shape)}.")
    cos = F.cosine_similarity(emb1.detach().double(), emb2.detach().double(), dim=-1)
    return float(spearman_corrcoef(cos.cpu(), gold_scores.detach().double().cpu()))


def false_negative_detection(flagged: Tensor, candidate_is_positive: Tensor) -> dict[str, float]:
    """Precision and recall of flagged in-batch negatives against gold false negatives.

    Counts are summed over all entries (micro-averaged). ``0/0`` is NaN: precision is NaN when
    nothing is flagged, recall is NaN when there is no gold false negative (a NaN propagates
    through averages, instead of silently counting as perfect or as zero).

    Args:
        flagged: ``[B, C]`` bool, candidates that a policy flagged (e.g. masked) as false negatives.
        candidate_is_positive: ``[B, C]`` bool, candidates that really are positives of the anchor
            (the target column itself should be False in both).

    Returns:
        ``{"precision", "recall", "flagged", "gold"}``; the last two are the counts (as floats).

    Example::

        >>> f = torch.tensor([[False, True, True], [False, False, False]])
        >>> g = torch.tensor([[False, True, False], [True, False, False]])
        >>> false_negative_detection(f, g)
        {'precision': 0.5, 'recall': 0.5, 'flagged': 2.0, 'gold': 2.0}
    """
    if flagged.shape != candidate_is_positive.shape:
        raise ValueError(
            f"Expected `flagged` and `candidate_is_positive` of one shape, but got {tuple(flagged.shape)} and "
            f"{tuple(candidate_is_positive.shape)}."
        )
    if flagged.dtype != torch.bool or candidate_is_positive.dtype != torch.bool:
        raise ValueError(
            f"Expected bool tensors, but got {flagged.dtype} and {candidate_is_positive.dtype}. Use `.bool()`."
        )
    hits = float((flagged & candidate_is_positive).sum())
    n_flagged = float(flagged.sum())
    n_gold = float(candidate_is_positive.sum())
    return {
        "precision": hits / n_flagged if n_flagged else math.nan,
        "recall": hits / n_gold if n_gold else math.nan,
        "flagged": n_flagged,
        "gold": n_gold,
    }
