"""Nearest-neighbour search (faiss exact / HNSW, torch fallback) and threshold neighbour pairs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_select.samplers import search
from lightning_select.samplers.search import faiss_available, nearest_neighbours, neighbour_lists, neighbour_pairs

#: faiss is in the `mining` and `test` extras; without it only the torch fallback is tested.
needs_faiss = pytest.mark.skipif(not faiss_available(), reason="needs faiss-cpu ('lightning_select[mining]')")
BACKENDS = [pytest.param("faiss", marks=needs_faiss), "torch"]


def _random(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def _brute_topk(q: np.ndarray, c: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    cn = c / np.linalg.norm(c, axis=1, keepdims=True)
    sims = qn.astype(np.float64) @ cn.astype(np.float64).T
    ids = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, ids, 1), ids


def _recall(approx: torch.Tensor, exact: torch.Tensor) -> float:
    hits = sum(len(set(a) & set(e)) for a, e in zip(approx.tolist(), exact.tolist()))
    return hits / exact.numel()


# ------------------------------------------------------------------------------------- exact search
@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_search_matches_a_float64_brute_force(backend):
    q, c = _random(60, 24, 0), _random(700, 24, 1)
    scores, ids = nearest_neighbours(q, c, k=7, backend=backend, batch_size=16)
    ref_scores, ref_ids = _brute_topk(q.numpy(), c.numpy(), 7)
    assert scores.dtype == torch.float32 and ids.dtype == torch.int64 and ids.shape == (60, 7)
    assert np.array_equal(ids.numpy(), ref_ids)
    np.testing.assert_allclose(scores.numpy(), ref_scores, atol=1e-5)


@needs_faiss
def test_faiss_exact_equals_torch_exact():
    q, c = _random(300, 64, 2), _random(3000, 64, 3)
    fs, fi = nearest_neighbours(q, c, k=20, backend="faiss")
    ts, ti = nearest_neighbours(q, c, k=20, backend="torch", batch_size=128)
    assert torch.equal(fi, ti)
    assert torch.allclose(fs, ts, atol=1e-5)


@needs_faiss
def test_rows_are_normalised_so_scale_does_not_matter():
    q, c = _random(20, 8, 4), _random(100, 8, 5)
    scale = torch.rand(100, 1, generator=torch.Generator().manual_seed(0)) * 50 + 0.1
    _, ids = nearest_neighbours(q, c, k=5, backend="torch")
    scores, scaled_ids = nearest_neighbours(q * 3, c * scale, k=5, backend="faiss")
    assert torch.equal(ids, scaled_ids) and float(scores.max()) <= 1.0 + 1e-6


# ------------------------------------------------------------------------------------- HNSW
#: Documented recall bounds of the default HNSW parameters (M=32, efConstruction=200, efSearch=128).
#: Measured recall@10: 1.000 on the 4k Gaussian vectors in 32-D below, 0.9996 on student embeddings of
#: the 4802 SICK training sentences, and 0.06 with the tiny beam of the control test.
RANDOM_RECALL_BOUND, REAL_RECALL_BOUND = 0.95, 0.99


@needs_faiss
def test_hnsw_recall_on_random_data():
    x = _random(4000, 32, 6)
    q = x[:500] + 0.1 * _random(500, 32, 7)
    _, exact = nearest_neighbours(q, x, k=10, method="exact")
    _, approx = nearest_neighbours(q, x, k=10, method="hnsw")
    assert _recall(approx, exact) >= RANDOM_RECALL_BOUND


@needs_faiss
def test_hnsw_with_a_tiny_beam_has_lower_recall():
    """The bound above is a property of the defaults: efSearch 1 and M 2 lose neighbours (the test can fail)."""
    x = _random(4000, 32, 6)
    _, exact = nearest_neighbours(x[:500], x, k=10, method="exact")
    _, weak = nearest_neighbours(x[:500], x, k=10, method="hnsw", hnsw_m=2, ef_construction=2, ef_search=1)
    assert _recall(weak, exact) < RANDOM_RECALL_BOUND


@needs_faiss
@pytest.mark.data
def test_hnsw_recall_on_real_sentence_embeddings():
    from test_text_data import STUDENT, require

    from lightning_select.data import load_sick
    from lightning_select.models import StaticEmbeddingEncoder

    data = require("text_pairs/sick2014").parent.parent
    a, b, _ = load_sick(str(data), "train")
    texts = list(dict.fromkeys(a + b))
    with torch.no_grad():
        emb = StaticEmbeddingEncoder.from_pretrained(str(require(STUDENT)))(texts)
    _, exact = nearest_neighbours(emb, emb, k=10, method="exact")
    _, approx = nearest_neighbours(emb, emb, k=10, method="hnsw")
    assert len(texts) > 4000
    assert _recall(approx, exact) >= REAL_RECALL_BOUND


# ------------------------------------------------------------------------------------- pairs
def _brute_pairs(x: np.ndarray, threshold: float, m: int) -> set[tuple[int, int]]:
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = xn.astype(np.float64) @ xn.astype(np.float64).T
    out = set()
    for i in range(len(x)):
        others = [j for j in np.argsort(-sims[i], kind="stable") if j != i][:m]
        out |= {(min(i, j), max(i, j)) for j in others if sims[i, j] > threshold}
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("threshold,m", [(0.5, 200), (0.3, 3), (0.6, 1)])
def test_neighbour_pairs_match_a_dense_brute_force(backend, threshold, m):
    x = _random(150, 6, 8)
    pairs = neighbour_pairs(x, threshold, max_neighbours=m, backend=backend)
    got = {tuple(p) for p in pairs.tolist()}
    assert got == _brute_pairs(x.numpy(), threshold, m) and len(got) > 0
    assert len(got) == pairs.shape[0] and bool((pairs[:, 0] < pairs[:, 1]).all())
    assert pairs.tolist() == sorted(pairs.tolist())


def test_neighbour_pairs_with_all_neighbours_are_every_pair_above_the_threshold():
    x = _random(80, 5, 9)
    xn = torch.nn.functional.normalize(x, dim=1)
    sims = xn @ xn.T
    i, j = torch.triu_indices(80, 80, 1)
    expected = {(a, b) for a, b, s in zip(i.tolist(), j.tolist(), sims[i, j].tolist()) if s > 0.7}
    got = {tuple(p) for p in neighbour_pairs(x, 0.7, max_neighbours=79).tolist()}
    assert got == expected


def test_neighbour_pairs_edge_cases_and_lists():
    assert neighbour_pairs(torch.ones(1, 3), 0.5).shape == (0, 2)
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])  # exact duplicates: every pair
    assert neighbour_pairs(x, 0.99, max_neighbours=2).tolist() == [[0, 1], [0, 2], [1, 2]]
    assert neighbour_lists(torch.tensor([[0, 1], [0, 2]]), 3) == [[1, 2], [0], [0]]


# ------------------------------------------------------------------------------------- options and fallbacks
@pytest.mark.parametrize("kwargs,match", [
    (dict(k=0), "`k`"), (dict(k=11), "corpus size 10"), (dict(method="ivf"), "`method`"),
    (dict(backend="annoy"), "`backend`"), (dict(method="hnsw", backend="torch"), "needs the faiss backend"),
    (dict(batch_size=0), "`batch_size`"), (dict(ef_search=0), "`ef_search`"),
])
def test_search_options_are_validated(kwargs, match):
    args = dict(queries=_random(3, 4, 0), corpus=_random(10, 4, 1), k=2) | kwargs
    with pytest.raises(ValueError, match=match):
        nearest_neighbours(**args)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="same dimension"):
        nearest_neighbours(_random(3, 4, 0), _random(10, 5, 1), k=2)
    bad = _random(10, 4, 1)
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="`corpus` holds NaN"):
        nearest_neighbours(_random(3, 4, 0), bad, k=2)
    with pytest.raises(ValueError, match="`queries`"):
        nearest_neighbours(torch.zeros(3), bad, k=2)
    with pytest.raises(ValueError, match="`threshold`"):
        neighbour_pairs(_random(5, 3, 0), 1.5)
    with pytest.raises(ValueError, match="`max_neighbours`"):
        neighbour_pairs(_random(5, 3, 0), 0.5, max_neighbours=0)


def test_without_faiss_auto_falls_back_to_torch_and_hnsw_says_how_to_install(monkeypatch):
    monkeypatch.setattr(search, "faiss_available", lambda: False)
    q, c = _random(10, 4, 0), _random(50, 4, 1)
    _, ids = nearest_neighbours(q, c, k=3)
    assert torch.equal(ids, nearest_neighbours(q, c, k=3, backend="torch")[1])
    with pytest.raises(ImportError, match="pip install faiss-cpu"):
        nearest_neighbours(q, c, k=3, method="hnsw")
    with pytest.raises(ImportError, match="needs faiss"):
        nearest_neighbours(q, c, k=3, backend="faiss")
