"""``NeighbourExclusionBatchSampler``: no guide-neighbour pair in a batch, coverage, DDP, resume, state."""

from __future__ import annotations

import itertools
from functools import partial

import pytest
import torch

from lightning_select.samplers import NeighbourExclusionBatchSampler, NoDuplicatesBatchSampler, neighbour_pairs
from lightning_select.samplers.factory import batch_sampler_loader


def _clustered(n: int = 200, clusters: int = 25, seed: int = 0) -> torch.Tensor:
    """Tight clusters: members of one cluster are neighbours at threshold 0.9, other pairs mostly not."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, 16, generator=g)
    labels = torch.randint(0, clusters, (n,), generator=g)
    return centres[labels] + 0.1 * torch.randn(n, 16, generator=g)


def _sampler(emb: torch.Tensor, **kwargs) -> NeighbourExclusionBatchSampler:
    args = dict(batch_size=16, threshold=0.9, seed=3) | kwargs
    s = NeighbourExclusionBatchSampler(emb.shape[0], **args)
    s.set_embeddings(emb)
    return s


def _pair_set(pairs: torch.Tensor) -> set[tuple[int, int]]:
    return {tuple(p) for p in pairs.tolist()}


def _pairs_in(batch: list[int], pairs: set[tuple[int, int]]) -> int:
    return sum((min(i, j), max(i, j)) in pairs for i, j in itertools.combinations(batch, 2))


def test_no_batch_holds_a_neighbour_pair_and_every_sample_appears_once():
    emb = _clustered()  # 25 clusters of ~8: every sample has ~7 neighbours, 13 batches
    s = _sampler(emb)
    pairs = _pair_set(s.pairs)
    assert len(pairs) > 500 and s.pairs.tolist() == neighbour_pairs(emb, 0.9).tolist()
    for epoch in range(3):
        s.set_epoch(epoch)
        batches = list(s)
        assert len(batches) == len(s) == 13  # ceil(200 / 16), known before the pairs
        assert sorted(i for b in batches for i in b) == list(range(200))
        assert all(len(b) <= 16 and _pairs_in(b, pairs) == 0 for b in batches)
        assert s.collisions() == 0 and s.stats()["collided"] == 0


def test_dense_neighbourhoods_keep_the_batch_count_and_count_the_collisions():
    """A clique of 6 in 3 batches cannot be separated: 3 batches stay, and the collisions are counted."""
    pairs = torch.tensor(list(itertools.combinations(range(6), 2)))
    s = NeighbourExclusionBatchSampler(12, 4, threshold=0.5, seed=1)
    assert len(s) == 3  # before the pairs exist
    s.set_pairs(pairs)
    for epoch in range(3):
        s.set_epoch(epoch)
        batches = list(s)
        assert len(batches) == 3 and sorted(i for b in batches for i in b) == list(range(12))
        per_batch = [sum(i < 6 for i in b) for b in batches]
        assert s.collisions() == sum(c for c in per_batch if c > 1) > 0  # independent count
    free = NoDuplicatesBatchSampler([(0,)] * 6 + [(i,) for i in range(1, 7)], 4, seed=1)
    assert len(free) == 6  # the duplicate-free sampler opens a batch per clique member instead


def test_fewest_collisions_and_the_repairing_swap():
    from lightning_select.samplers.greedy import greedy_batches

    ids = [{i} for i in range(8)]
    # 0-1-2-3 a clique, 4..7 free; two batches of 4. First-fit: [0, 4, 5, 6] (full) and [1, 7] (2 and 3 collide);
    # 2 and 3 then go to the only batch with room, and no swap separates them (any y moved into batch 2 meets 1).
    clique = [set(range(4)) - {i} for i in range(4)] + [set()] * 4
    assert greedy_batches([0, 1, 4, 5, 6, 2, 7, 3], 4, clique, marks=ids, num_batches=2) == [[0, 4, 5, 6],
                                                                                             [1, 7, 2, 3]]
    # 0~1 and 2~3: first-fit gives [4, 5, 0] and [2, 1]; 3 collides with 2 and swaps with 4 (the first y that works)
    pairs = [{1}, {0}, {3}, {2}, set(), set()]
    assert greedy_batches([4, 5, 0, 2, 1, 3], 3, pairs, marks=ids[:6], num_batches=2) == [[3, 5, 0], [2, 1, 4]]
    # the least-collided batch with room wins over the earliest: first-fit closes [0, 4] and [1, 3] short, and 2
    # (neighbour of 0, 1 and 4) meets two samples in the first batch but one in the second
    blocked = [{1, 2, 3}, {0, 2}, {0, 1, 4}, {0}, {2}]
    assert greedy_batches([0, 1, 2, 3, 4], 3, blocked, marks=ids[:5], num_batches=2) == [[0, 4], [1, 3, 2]]


def test_epochs_differ_and_are_seeded():
    emb = _clustered()
    a, b = _sampler(emb), _sampler(emb)
    first = list(a)
    assert first == list(b)
    a.set_epoch(1)
    assert list(a) != first
    assert list(_sampler(emb, seed=4)) != first


def test_with_key_pairs_it_reproduces_the_duplicate_free_sampler():
    """Shared greedy fill: 'shares a key' pairs give NoDuplicatesBatchSampler's batches (when it opens no extra one)."""
    g = torch.Generator().manual_seed(1)
    keys = [(int(k),) for k in torch.randint(0, 100, (120,), generator=g)]  # 52 samples share a key
    pairs = [(i, j) for i, j in itertools.combinations(range(120), 2) if keys[i] == keys[j]]
    for epoch in range(3):
        nd = NoDuplicatesBatchSampler(keys, batch_size=8, seed=5)
        ne = NeighbourExclusionBatchSampler(120, 8, threshold=0.5, seed=5)
        ne.set_pairs(torch.tensor(pairs))
        nd.set_epoch(epoch)
        ne.set_epoch(epoch)
        assert len(nd) == len(ne) == 15  # no extra batch needed: the fills agree exactly
        assert list(ne) == list(nd)


def test_drop_last_keeps_only_full_batches():
    s = _sampler(_clustered(), drop_last=True)
    batches = list(s)
    assert len(batches) == len(s) == 12 and all(len(b) == 16 for b in batches)  # floor(200 / 16)
    assert len({i for b in batches for i in b}) == 192


def test_ddp_ranks_get_equal_counts_and_distinct_batches():
    emb = _clustered(n=203)
    full = _sampler(emb, batch_size=8)
    global_batches = list(full)
    ranks = [_sampler(emb, batch_size=8, num_replicas=2, rank=r) for r in range(2)]
    per_rank = [list(s) for s in ranks]
    padded = global_batches + global_batches[: len(global_batches) % 2]  # wrapped to a multiple of 2
    assert len(per_rank[0]) == len(per_rank[1]) == len(ranks[0]) == len(padded) // 2
    assert per_rank[0] == padded[0::2] and per_rank[1] == padded[1::2]
    assert all(a != b for a, b in zip(*per_rank))
    seen = {i for b in per_rank[0] + per_rank[1] for i in b}
    assert seen == set(range(203))


def test_skip_batches_resumes_mid_epoch():
    s = _sampler(_clustered())
    s.set_epoch(2)
    full = list(s)
    s.skip_batches(3)
    assert list(s) == full[3:]
    assert list(s) == full  # the skip applies to one iteration only


def test_state_round_trip_rebuilds_the_batches_without_embeddings():
    s = _sampler(_clustered())
    s.set_epoch(1)
    expected = list(s)
    fresh = NeighbourExclusionBatchSampler(200, 16, threshold=0.9, seed=3)
    fresh.load_state_dict(s.state_dict())
    fresh.set_epoch(1)
    assert list(fresh) == expected and torch.equal(fresh.pairs, s.pairs)
    other = NeighbourExclusionBatchSampler(200, 16, threshold=0.8, seed=3)
    with pytest.raises(ValueError, match="'threshold': 0.9"):
        other.load_state_dict(s.state_dict())
    bad = s.state_dict()
    bad["structure"]["pairs"] = torch.tensor([[5, 3]])
    with pytest.raises(ValueError, match="does not belong to this training set"):
        NeighbourExclusionBatchSampler(200, 16, threshold=0.9, seed=3).load_state_dict(bad)


def test_stats_count_pairs_and_samples_with_a_neighbour():
    emb = torch.tensor([[1.0, 0.0], [1.0, 0.01], [0.0, 1.0], [0.01, 1.0], [-1.0, -1.0]])
    s = NeighbourExclusionBatchSampler(5, 2, threshold=0.95)
    assert s.stats() == {}
    s.set_embeddings(emb)
    assert s.pairs.tolist() == [[0, 1], [2, 3]]
    assert s.stats() == {"num_pairs": 2.0, "with_neighbour": 4 / 5, "collided": 0.0}


def test_it_refuses_to_iterate_without_a_structure_and_bad_options():
    s = NeighbourExclusionBatchSampler(10, 2, threshold=0.9)
    assert len(s) == 5
    with pytest.raises(RuntimeError, match="set_embeddings"):
        list(s)
    for kwargs, match in [(dict(threshold=1.5), "`threshold`"), (dict(threshold=True), "`threshold`"),
                          (dict(threshold=0.9, max_neighbours=0), "`max_neighbours`"),
                          (dict(threshold=0.9, method="lsh"), "`method`")]:
        with pytest.raises(ValueError, match=match):
            NeighbourExclusionBatchSampler(10, 2, **kwargs)
    with pytest.raises(ValueError, match=r"shape \[10, D\]"):
        s.set_embeddings(torch.ones(9, 3))
    with pytest.raises(ValueError, match=r"0 <= i < j < 10"):
        s.set_pairs(torch.tensor([[0, 10]]))
    with pytest.raises(ValueError, match=r"\[P, 2\] integer"):
        s.set_pairs(torch.tensor([[0.0, 1.0]]))


def test_factory_contract_through_a_loader():
    data = [{"x": float(i)} for i in range(40)]
    loader = batch_sampler_loader(data, partial(NeighbourExclusionBatchSampler, threshold=0.99), 4, 0, 1, 0)
    emb = torch.randn(40, 3, generator=torch.Generator().manual_seed(0))
    loader.batch_sampler.set_embeddings(emb)
    xs = sorted(int(x) for b in loader for x in b["x"].tolist())
    assert xs == list(range(40))


def test_hnsw_method_gives_the_exact_pairs_on_clustered_data():
    pytest.importorskip("faiss")
    emb = _clustered(n=300)
    exact = _sampler(emb)
    approx = _sampler(emb, method="hnsw")
    assert torch.equal(approx.pairs, exact.pairs)
