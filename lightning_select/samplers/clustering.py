"""Clustering helpers for batch composition: duplicate clusters by union-find (transitive closure).

Example::

    >>> quora_clusters([1, 2, 3, 5], [2, 3, 4, 6], [1, 1, 0, 1])
    {1: 0, 2: 0, 3: 0, 4: 1, 5: 2, 6: 2}
"""

from __future__ import annotations

from typing import Any

import numpy as np


def cluster_arrays(qid1: Any, qid2: Any, is_duplicate: Any) -> tuple[np.ndarray, np.ndarray]:
    """Unique question ids (sorted) and the cluster id of each, clusters numbered by smallest qid."""
    q1 = np.asarray(qid1, dtype=np.int64).ravel()
    q2 = np.asarray(qid2, dtype=np.int64).ravel()
    dup = np.asarray(is_duplicate).ravel().astype(bool)
    if not (q1.shape == q2.shape == dup.shape):
        raise ValueError(
            f"Expected `qid1`, `qid2` and `is_duplicate` of equal length, but got {q1.shape[0]}, {q2.shape[0]} "
            f"and {dup.shape[0]}."
        )
    uniq, inverse = np.unique(np.concatenate([q1, q2]), return_inverse=True)
    n = q1.shape[0]
    left, right = inverse[:n][dup].tolist(), inverse[n:][dup].tolist()
    parent = list(range(uniq.shape[0]))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]  # path halving
            x = parent[x]
        return x

    for a, b in zip(left, right):
        ra, rb = find(a), find(b)
        if ra != rb:  # the smaller root wins, so every root is its component's smallest member
            if ra < rb:
                parent[rb] = ra
            else:
                parent[ra] = rb
    roots = np.fromiter((find(i) for i in range(len(parent))), dtype=np.int64, count=len(parent))
    _, cluster = np.unique(roots, return_inverse=True)
    return uniq, cluster.astype(np.int64)


def quora_clusters(qid1: Any, qid2: Any, is_duplicate: Any) -> dict[int, int]:
    """Transitive closure of duplicate pairs: a cluster id for every question id.

    Union-find with path halving over the pairs marked duplicate. Every question id that occurs in
    ``qid1`` or ``qid2`` gets an id; a question without duplicates is a cluster of its own.
    Clusters are numbered ``0..C-1`` in the order of their smallest question id. All 404k Quora
    rows take about a second.

    Args:
        qid1: question ids of the first question of each pair (any 1-D integer array-like).
        qid2: question ids of the second question of each pair.
        is_duplicate: truthy where the pair is a duplicate.

    Returns:
        ``{question id: cluster id}``.

    Example::

        >>> quora_clusters([10, 11, 12], [11, 13, 14], [1, 1, 0])
        {10: 0, 11: 0, 12: 1, 13: 0, 14: 2}
    """
    uniq, cluster = cluster_arrays(qid1, qid2, is_duplicate)
    return dict(zip(uniq.tolist(), cluster.tolist()))
