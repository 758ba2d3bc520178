"""Offline hard-negative mining: brute-force references, the guide margin rule, the negatives file,
the datamodules' ``negatives_path`` and a GIST fit on mined negatives.

Tests marked ``data`` read ``../shared/data`` (or ``$LIGHTNING_SELECT_DATA``); outside CI they skip
when it is missing, with ``CI`` set they fail. Nothing here downloads anything.
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from test_text_data import STUDENT, _write_tiny_quora, require, shared_data

from lightning_select import GuidedNegatives, SelectionEngine
from lightning_select.data import QuoraDuplicatesDataModule, SickDataModule
from lightning_select.mining import (
    fill_missing_negatives,
    gold_false_negative_share,
    main,
    mine_hard_negatives,
    read_mined_negatives,
    select_negatives,
    text_ids,
    texts_fingerprint,
    write_mined_negatives,
)


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _unit(x: torch.Tensor) -> np.ndarray:
    x = x.double().numpy()
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _brute_mine(anchor, corpus, pos, k, pool, a_text=None, c_text=None, ga=None, gc=None, margin=0.0,
                strategy="absolute"):
    """Row by row in float64: the documented rule, written out with loops."""
    sims = _unit(anchor) @ _unit(corpus).T
    g = None if ga is None else _unit(ga) @ _unit(gc).T
    out = []
    for i in range(sims.shape[0]):
        searched = list(np.argsort(-sims[i], kind="stable")[: pool + 1])
        cands, seen = [], set()
        for c in searched:
            if c == pos[i]:
                continue
            if c_text is not None:
                if c_text[c] in (c_text[pos[i]], a_text[i]) or c_text[c] in seen:
                    continue
                seen.add(c_text[c])
            cands.append(c)
        cands = cands[:pool]
        if g is not None:
            t = g[i, pos[i]]
            theta = t - margin if strategy == "absolute" else t - abs(t) * margin
            cands = [c for c in cands if not g[i, c] > theta]
        row = cands[:k]
        out.append(row + [-1] * (k - len(row)))
    return out


# ------------------------------------------------------------------------------------- mining rule
@pytest.mark.parametrize("k,pool", [(1, 5), (3, 8), (4, 4)])
def test_mining_matches_a_brute_force_on_random_data(k, pool):
    anchors, corpus = _randn(50, 8, seed=0), _randn(60, 8, seed=1)
    pos = torch.randint(0, 60, (50,), generator=torch.Generator().manual_seed(2))
    for backend in ("auto", "torch"):  # auto: faiss when installed
        mined = mine_hard_negatives(anchors, corpus, pos, k, candidate_pool=pool, backend=backend)
        assert mined.ids.tolist() == _brute_mine(anchors, corpus, pos.tolist(), k, pool)
        assert mined.stats["false_negatives_dropped"] == 0 and mined.stats["rows_short"] == 0
    sims = torch.nn.functional.normalize(anchors, dim=1) @ torch.nn.functional.normalize(corpus, dim=1).T
    assert torch.allclose(mined.scores, sims.gather(1, mined.ids), atol=1e-5)


@pytest.mark.parametrize("strategy,margin", [("absolute", 0.1), ("relative", 0.05), ("absolute", -0.05)])
def test_mining_with_texts_and_a_guide_matches_the_brute_force(strategy, margin):
    n, m = 80, 90
    anchors, corpus = _randn(n, 6, seed=3), _randn(m, 6, seed=4)
    ga, gc = anchors + 0.6 * _randn(n, 6, seed=5), corpus + 0.6 * _randn(m, 6, seed=6)
    pos = torch.arange(n)
    rng = np.random.default_rng(0)  # repeated texts: 25 distinct corpus texts, some equal to anchor texts
    a_words = [f"t{rng.integers(40)}" for _ in range(n)]
    c_words = [f"t{rng.integers(25)}" for _ in range(m)]
    a_text, c_text = text_ids(a_words, c_words)
    mined = mine_hard_negatives(anchors, corpus, pos, 2, candidate_pool=10, anchor_text_ids=a_text,
                                corpus_text_ids=c_text, guide_anchor=ga, guide_corpus=gc, margin=margin,
                                margin_strategy=strategy)
    expected = _brute_mine(anchors, corpus, pos.tolist(), 2, 10, a_text.tolist(), c_text.tolist(), ga, gc, margin,
                           strategy)
    assert mined.ids.tolist() == expected
    assert mined.stats["repeated_text"] > 0 and mined.stats["false_negatives_dropped"] > 0
    got = mined.ids[mined.ids >= 0]
    rows = (mined.ids >= 0).nonzero()[:, 0]
    assert not bool((c_text[got] == c_text[pos[rows]]).any()) and not bool((c_text[got] == a_text[rows]).any())


def test_the_own_positive_is_never_a_negative_even_when_it_is_the_nearest():
    anchors = _randn(200, 16, seed=7)
    corpus = anchors + 0.01 * _randn(200, 16, seed=8)  # each positive is its anchor's nearest entry
    mined = mine_hard_negatives(anchors, corpus, torch.arange(200), 5, candidate_pool=10)
    assert not bool((mined.ids == torch.arange(200).unsqueeze(1)).any())
    assert mined.stats["excluded_positive"] == 200 and bool((mined.ids >= 0).all())


def _line(cos: float) -> list[float]:
    return [cos, math.sqrt(1 - cos * cos)]


@pytest.mark.parametrize("t,margin,strategy,kept", [
    # t = 0.5, candidates at guide cosine 0.48, 0.42, 0.30 (miner order = this order)
    (0.5, 0.1, "absolute", [3]),   # θ = 0.5 − 0.1 = 0.40: drops 0.48 and 0.42
    (0.5, 0.1, "relative", [2]),   # θ = 0.5 − 0.05 = 0.45: drops 0.48 only
    (0.5, 0.0, "absolute", [1]),   # θ = t (GIST's default): only candidates above the positive go
    # t = −0.2, candidates at −0.25, −0.5, −0.9
    (-0.2, 0.5, "absolute", [3]),   # θ = −0.7: drops −0.25 and −0.5
    (-0.2, 0.5, "relative", [2]),   # θ = −0.2 − 0.1 = −0.3: drops −0.25 only
])
def test_absolute_and_relative_margins_against_hand_computation(t, margin, strategy, kept):
    cands = [0.48, 0.42, 0.30] if t > 0 else [-0.25, -0.5, -0.9]
    guide_corpus = torch.tensor([_line(t)] + [_line(c) for c in cands])  # entry 0 is the positive
    guide_anchor = torch.tensor([[1.0, 0.0]])
    scores = torch.tensor([[0.99, 0.9, 0.8, 0.7]])  # the miner ranks positive, then candidates in order
    ids = torch.tensor([[0, 1, 2, 3]])
    mined = select_negatives(scores, ids, torch.tensor([0]), 1, candidate_pool=3, guide_anchor=guide_anchor,
                             guide_corpus=guide_corpus, margin=margin, margin_strategy=strategy)
    assert mined.ids.tolist() == [kept]
    assert mined.stats["false_negatives_dropped"] == kept[0] - 1


def test_rows_with_too_few_candidates_get_minus_one_and_are_counted():
    scores, ids = torch.tensor([[0.9, 0.8, 0.7], [0.9, 0.8, 0.7]]), torch.tensor([[0, 1, 2], [1, 0, 2]])
    mined = select_negatives(scores, ids, torch.tensor([0, 1]), 3, candidate_pool=3)
    assert mined.ids.tolist() == [[1, 2, -1], [0, 2, -1]]
    assert torch.isnan(mined.scores[:, 2]).all() and mined.stats["rows_short"] == 2
    assert mined.stats["rows_empty"] == 0 and mined.stats["candidates"] == 4


def test_a_margin_that_drops_every_candidate_is_an_error_naming_it():
    anchors, corpus = _randn(20, 4, seed=9), _randn(20, 4, seed=10)
    with pytest.raises(ValueError, match=r"margin=1\.5 \(absolute\) drops every one of the \d+ candidates"):
        mine_hard_negatives(anchors, corpus, torch.arange(20), 1, candidate_pool=5, guide_anchor=anchors,
                            guide_corpus=corpus, margin=1.5, margin_strategy="absolute")


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_negatives=0), "`num_negatives`"), (dict(candidate_pool=0), "`candidate_pool`"),
    (dict(num_negatives=4, candidate_pool=3), "`candidate_pool` >= `num_negatives`"),
    (dict(margin_strategy="percent"), "`margin_strategy`"), (dict(margin=float("nan")), "`margin`"),
    (dict(guide_anchor=torch.ones(6, 2)), "both `guide_anchor` and `guide_corpus`"),
    (dict(anchor_text_ids=torch.arange(6)), "both `anchor_text_ids` and `corpus_text_ids`"),
    (dict(positive_ids=torch.tensor([0, 1, 2, 3, 4, 9])), "`positive_ids` in \\[0, 8\\)"),
    (dict(positive_ids=torch.arange(5)), "`positive_ids` to be \\[6\\]"),
    (dict(method="ivf"), "`method`"),
    (dict(guide_anchor=torch.ones(6, 2), guide_corpus=torch.ones(8, 3)), "`guide_anchor` \\[6, G\\]"),
])
def test_mining_options_are_validated(kwargs, match):
    args = dict(anchor_embeddings=_randn(6, 3, seed=0), corpus_embeddings=_randn(8, 3, seed=1),
                positive_ids=torch.arange(6), num_negatives=1, candidate_pool=3) | kwargs
    with pytest.raises(ValueError, match=match):
        mine_hard_negatives(**args)


def test_text_ids_and_gold_share():
    a, c = text_ids(["x", "y", "x"], ["y", "z"])
    assert a.tolist() == [0, 1, 0] and c.tolist() == [1, 2]
    assert gold_false_negative_share(torch.tensor([[1, -1], [2, 0], [0, 1]]), torch.tensor([0, 0, 1])) == 2 / 5


# ------------------------------------------------------------------------------------- the negatives file
def test_the_negatives_file_round_trips_and_refuses_another_dataset(tmp_path):
    anchors, positives = ["a", "b", "c"], ["x", "y", "z"]
    fp = texts_fingerprint(anchors, positives)
    path = write_mined_negatives(tmp_path / "neg.npz", torch.tensor([[1, 2], [2, -1], [0, 1]]), fingerprint=fp,
                                 options={"margin": 0.05, "miner": "guide"})
    ids, options = read_mined_negatives(path, 3, fp)
    assert ids.tolist() == [[1, 2], [2, -1], [0, 1]] and ids.dtype == np.int64
    assert options == {"margin": 0.05, "miner": "guide"}
    with pytest.raises(ValueError, match="mined for 3 training pairs, but this dataset has 4; re-mine"):
        read_mined_negatives(path, 4, fp)
    other = texts_fingerprint(anchors, ["x", "y", "w"])
    with pytest.raises(ValueError, match=f"fingerprint {fp[:12]}…, this dataset's is {other[:12]}….*re-mine"):
        read_mined_negatives(path, 3, other)
    with pytest.raises(FileNotFoundError, match="No negatives file.*re-mine"):
        read_mined_negatives(tmp_path / "missing.npz", 3, fp)
    with pytest.raises(ValueError, match="ending in .npz"):
        write_mined_negatives(tmp_path / "neg.txt", torch.zeros(3, 1), fingerprint=fp)
    np.savez(tmp_path / "bad.npz", negative_ids=np.array([[5], [0], [0]]), num_samples=np.int64(3),
             fingerprint=np.str_(fp), options=np.str_("{}"))
    with pytest.raises(ValueError, match=r"ids outside \[-1, 3\)"):
        read_mined_negatives(tmp_path / "bad.npz", 3, fp)
    np.savez(tmp_path / "partial.npz", negative_ids=np.zeros((3, 1), dtype=np.int64))
    with pytest.raises(ValueError, match="lacks \\['num_samples', 'fingerprint', 'options'\\]"):
        read_mined_negatives(tmp_path / "partial.npz", 3, fp)
    (tmp_path / "garbage.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable .npz"):
        read_mined_negatives(tmp_path / "garbage.npz", 3, fp)


def test_missing_negatives_fall_back_to_a_seeded_random_other_pair():
    anchors, positives = ["a0", "a1", "a2", "a3", "a4"], ["p0", "p1", "p1", "a1", "p4"]
    ids = np.array([[2], [-1], [-1], [0], [-1]])
    filled, count = fill_missing_negatives(ids, anchors, positives, seed=3)
    again, _ = fill_missing_negatives(ids, anchors, positives, seed=3)
    assert count == 3 and np.array_equal(filled, again) and (filled >= 0).all()
    for i in (1, 2, 4):
        j = int(filled[i, 0])
        assert j != i and positives[j] not in (positives[i], anchors[i])  # row 1: not 2 (p1) nor 3 (a1)
    assert filled[0, 0] == 2 and filled[3, 0] == 0  # mined ids are left alone
    with pytest.raises(ValueError, match="training pair 0"):
        fill_missing_negatives(np.array([[-1], [0]]), ["a", "b"], ["p", "p"], seed=0)


# ------------------------------------------------------------------------------------- datamodules
def test_quora_datamodule_adds_the_mined_negative_columns(tmp_path):
    _write_tiny_quora(tmp_path)
    kwargs = dict(data_dir=str(tmp_path), batch_size=4, test_clusters=2, max_train_pairs=6, seed=1)
    plain = QuoraDuplicatesDataModule(**kwargs)
    plain.setup()
    table = plain.train_set.dataset
    n = len(table)
    ids = np.array([[(i + 1) % n, -1] for i in range(n)])
    path = write_mined_negatives(tmp_path / "neg.npz", ids, fingerprint=texts_fingerprint(table.anchors,
                                                                                          table.positives))
    dm = QuoraDuplicatesDataModule(negatives_path=str(path), **kwargs)
    dm.setup()
    for i in range(n):
        item = dm.train_set[i]
        assert item["negative_0"] == table.positives[(i + 1) % n]
        assert item["negative_1"] not in (item["positive"], item["anchor"])
    batch = next(iter(dm.train_dataloader()))
    assert len(batch["negative_0"]) == 4 and len(batch["negative_1"]) == 4
    wrong = QuoraDuplicatesDataModule(negatives_path=str(path), **(kwargs | {"max_train_pairs": 5}))
    with pytest.raises(ValueError, match=f"mined for {n} training pairs, but this dataset has 5"):
        wrong.setup()


@pytest.mark.data
def test_quora_datamodule_with_a_student_mined_file(tmp_path):
    require("text_pairs/quora/quora_duplicate_questions.tsv.gz")
    from lightning_select.models import StaticEmbeddingEncoder

    kwargs = dict(data_dir=str(shared_data()), batch_size=32, max_train_pairs=3000, test_clusters=300)
    dm = QuoraDuplicatesDataModule(**kwargs)
    dm.setup()
    table = dm.train_set.dataset
    with torch.no_grad():
        emb = StaticEmbeddingEncoder.from_pretrained(str(require(STUDENT)))(table.anchors + table.positives)
    a_text, c_text = text_ids(table.anchors, table.positives)
    n = len(table.anchors)
    mined = mine_hard_negatives(emb[:n], emb[n:], torch.arange(n), 1, candidate_pool=20, anchor_text_ids=a_text,
                                corpus_text_ids=c_text)
    path = write_mined_negatives(tmp_path / "quora.npz", mined.ids,
                                 fingerprint=texts_fingerprint(table.anchors, table.positives))
    with_negs = QuoraDuplicatesDataModule(negatives_path=str(path), **kwargs)
    with_negs.setup()
    items = [with_negs.train_set[i] for i in range(n)]
    assert all(it["negative_0"] not in (it["positive"], it["anchor"]) for it in items)
    assert sum(it["negative_0"] == table.positives[j] for it, j in zip(items, mined.ids[:, 0].tolist())) >= n - 5
    share = gold_false_negative_share(mined.ids, dm.train_clusters)
    assert 0.0 <= share < 0.5  # mined from other pairs: mostly true negatives, some gold duplicates
    with pytest.raises(ValueError, match="fingerprint"):
        QuoraDuplicatesDataModule(negatives_path=str(path), **(kwargs | {"test_clusters": 301})).setup()


@pytest.mark.data
def test_cli_mines_sick_and_gist_masks_the_mined_negatives_online(tmp_path, trainer_kwargs, capsys):
    data = str(require("text_pairs/sick2014").parent.parent)
    out = tmp_path / "sick.npz"
    stats = main(["--dataset", "sick", "--data-dir", data, "--out", str(out), "--miner", "student",
                  "--no-guide-filter", "--candidate-pool", "10", "--method", "exact"])
    assert out.is_file() and stats["anchors"] > 1000 and "wrote" in capsys.readouterr().out
    _, options = read_mined_negatives(out, int(stats["anchors"]), _sick_fingerprint(data))
    assert options["miner"] == "student" and options["candidate_pool"] == 10

    from lightning_select.models import StaticEmbeddingEncoder, TextEmbeddingModule

    student_path = str(Path(data) / "models" / "minilm-l6-m2v-128d")
    guide = StaticEmbeddingEncoder.from_pretrained(student_path).requires_grad_(False)  # a cheap stand-in guide
    seen = {}

    class Spy(TextEmbeddingModule):
        def training_step(self, batch, batch_idx):
            seen["batch"] = batch
            return super().training_step(batch, batch_idx)

    gist = GuidedNegatives(guide, "anchor", "positive", negative_columns=["negative_0"], margin=0.1)
    trainer = pl.Trainer(callbacks=[SelectionEngine(), gist], max_steps=2, limit_val_batches=0, **trainer_kwargs)
    trainer.fit(Spy(student_path=student_path, negative_keys=("negative_0",)),
                SickDataModule(data_dir=data, batch_size=32, negatives_path=str(out)))
    batch = seen["batch"]
    with torch.no_grad():
        ga, gp, gn = (torch.nn.functional.normalize(guide(batch[k]), dim=1)
                      for k in ("anchor", "positive", "negative_0"))
    theta = (ga * gp).sum(1) - 0.1
    expected = (ga @ gn.T) > theta.unsqueeze(1)
    assert torch.equal(gist.last_masks["an0"], expected) and bool(expected.any())


def _sick_fingerprint(data: str) -> str:
    dm = SickDataModule(data_dir=data)
    dm.setup()
    return texts_fingerprint(dm.train_set.dataset.anchors, dm.train_set.dataset.positives)
