"""Evaluation helpers against independent brute-force / scipy computations (no shared data needed)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from lightning_select.evaluation import false_negative_detection, retrieval_report, sts_spearman


def brute_force_retrieval(emb: np.ndarray, rel: np.ndarray, ks=(1, 10)) -> dict[str, float]:
    """Plain-python leave-one-out nDCG@10, MRR@10 and recall@k with binary relevance."""
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    sims = unit @ unit.T
    n = len(emb)
    per_query: dict[str, list[float]] = {"ndcg@10": [], "mrr@10": [], **{f"recall@{k}": [] for k in ks}}
    for q in range(n):
        others = [j for j in range(n) if j != q]
        relevant = {j for j in others if rel[q, j]}
        if not relevant:
            continue
        ranking = sorted(others, key=lambda j: -sims[q, j])
        dcg = sum(1.0 / math.log2(r + 2) for r, j in enumerate(ranking[:10]) if j in relevant)
        ideal = sum(1.0 / math.log2(r + 2) for r in range(min(10, len(relevant))))
        per_query["ndcg@10"].append(dcg / ideal)
        first = next((r for r, j in enumerate(ranking[:10]) if j in relevant), None)
        per_query["mrr@10"].append(0.0 if first is None else 1.0 / (first + 1))
        for k in ks:
            per_query[f"recall@{k}"].append(len(relevant.intersection(ranking[:k])) / len(relevant))
    return {name: float(np.mean(v)) for name, v in per_query.items()}


@pytest.mark.parametrize("chunk_size", [None, 7])
def test_retrieval_report_matches_brute_force(chunk_size):
    g = torch.Generator().manual_seed(0)
    n = 45
    emb = torch.randn(n, 6, generator=g)  # many negative cosines: they must still count as retrieved
    rel = torch.rand(n, n, generator=g) < 0.08
    rel = rel | rel.T
    rel[torch.arange(n), torch.arange(n)] = True  # the diagonal must be ignored
    rel[3] = False
    rel[:, 3] = False  # item 3 has nothing relevant: a document, not a query
    ours = retrieval_report(emb, rel, ks=(1, 5, 10), chunk_size=chunk_size)
    ref = brute_force_retrieval(emb.numpy().astype(np.float64), rel.numpy(), ks=(1, 5, 10))
    assert set(ours) == {"ndcg@10", "mrr@10", "recall@1", "recall@5", "recall@10"}
    for name, value in ref.items():
        assert ours[name] == pytest.approx(value, abs=1e-6), name


def test_retrieval_report_with_labels_equals_the_relevance_matrix():
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(60, 5, generator=g)
    labels = torch.randint(0, 12, (60,), generator=g)
    rel = labels[:, None] == labels[None, :]
    assert retrieval_report(emb, labels) == pytest.approx(retrieval_report(emb, rel))
    assert retrieval_report(emb, labels) == pytest.approx(brute_force_retrieval(emb.double().numpy(), rel.numpy()))


def test_retrieval_report_without_queries_is_nan_and_validates_inputs():
    out = retrieval_report(torch.randn(4, 3), torch.arange(4))
    assert all(math.isnan(v) for v in out.values())
    with pytest.raises(ValueError, match=r"\[3, 3\] bool matrix"):
        retrieval_report(torch.randn(3, 2), torch.zeros(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool relevance"):
        retrieval_report(torch.randn(3, 2), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="ks"):
        retrieval_report(torch.randn(3, 2), torch.arange(3), ks=(0,))


def test_sts_spearman_matches_scipy_with_tied_gold_scores():
    g = torch.Generator().manual_seed(2)
    e1, e2 = torch.randn(200, 16, generator=g), torch.randn(200, 16, generator=g)
    cos = torch.nn.functional.cosine_similarity(e1, e2)
    gold = torch.round((cos + torch.randn(200, generator=g) * 0.3) * 2) / 2  # few distinct values: ties
    expected = spearmanr(cos.numpy(), gold.numpy()).statistic
    assert sts_spearman(e1, e2, gold) == pytest.approx(expected, abs=1e-5)
    with pytest.raises(ValueError, match="gold_scores"):
        sts_spearman(e1, e2, gold[:10])


def test_false_negative_detection_hand_example():
    flagged = torch.tensor([[False, True, True, False], [False, False, True, True]])
    gold = torch.tensor([[False, True, False, True], [False, False, True, False]])
    out = false_negative_detection(flagged, gold)
    assert out == {"precision": 2 / 4, "recall": 2 / 3, "flagged": 4.0, "gold": 3.0}
    none = false_negative_detection(torch.zeros(2, 2, dtype=torch.bool), torch.zeros(2, 2, dtype=torch.bool))
    assert math.isnan(none["precision"]) and math.isnan(none["recall"]) and none["flagged"] == 0.0
    with pytest.raises(ValueError, match="one shape"):
        false_negative_detection(flagged, gold[:1])
    with pytest.raises(ValueError, match="bool"):
        false_negative_detection(flagged.int(), gold)
