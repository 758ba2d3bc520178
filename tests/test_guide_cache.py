"""The guide-embedding cache shared by DDP ranks: sharding, reopening, invalidation, concurrent writers.

The rank protocol of ``GuideLookup`` runs here with threads standing in for ranks (a fake trainer
whose ``barrier``/``all_gather`` synchronise the threads); tests/test_ddp.py runs it under real DDP.
"""

import json
import multiprocessing as mp
import threading
from types import SimpleNamespace

import pytest
import torch

from lightning_select import GuideEmbeddingCache, SelectionError
from lightning_select.guides import lookup as lookup_module
from lightning_select.guides.lookup import GuideLookup, shard_rows

N, C, G = 23, 2, 5


def table(n=N, c=C, g=G, seed=0):
    return torch.randn(n, c, g, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- sharding arithmetic
@pytest.mark.parametrize("n", [0, 1, 2, 5, 23, 64])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_shards_are_disjoint_complete_and_balanced(n, world):
    rows = torch.arange(100, 100 + n)  # any row ids (e.g. only the missing ones)
    shards = [shard_rows(rows, r, world) for r in range(world)]
    flat = torch.cat(shards)
    assert flat.numel() == n and set(flat.tolist()) == set(rows.tolist())  # disjoint and complete
    sizes = [s.numel() for s in shards]
    assert max(sizes) - min(sizes) <= 1 and max(sizes) == -(-n // world)  # padded exchange width = ceil(n/W)
    assert shard_rows(torch.tensor([4, 9, 11, 30, 31]), 1, 2).tolist() == [9, 30]


def test_shard_rejects_a_bad_rank():
    with pytest.raises(ValueError, match="rank"):
        shard_rows(torch.arange(4), 2, 2)


# --------------------------------------------------------------------------- disk cache files
def test_disk_cache_reopened_by_a_second_object_sees_the_rows_of_the_first(tmp_path):
    full = table()
    first = GuideEmbeddingCache(N, C, directory=tmp_path, fingerprint="fp")
    rows = torch.tensor([0, 3, 7, 22])
    for c in range(C):
        first.store(c, rows, full[rows, c])
    first.flush()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["filled.npy", "meta.json", "values.npy"]  # no temp file
    assert json.loads((tmp_path / "meta.json").read_text()) == {
        "num_samples": N, "num_columns": C, "dim": G, "dtype": "torch.float32", "fingerprint": "fp"}

    second = GuideEmbeddingCache(N, C, directory=tmp_path, fingerprint="fp")
    assert torch.equal(second.filled.all(1).nonzero().squeeze(1), rows)
    assert torch.equal(second.values[rows], full[rows])
    calls = []
    out = second.get_or_compute(1, torch.tensor([7, 3]), lambda r: calls.append(r) or torch.zeros(len(r), G))
    assert calls == [] and torch.equal(out, full[[7, 3], 1])
    assert torch.equal(second.missing_rows(), torch.tensor([i for i in range(N) if i not in rows.tolist()]))


@pytest.mark.parametrize("change", ["fingerprint", "num_samples", "dtype"])
def test_mismatching_cache_is_discarded_and_rebuilt(tmp_path, change):
    old = GuideEmbeddingCache(N, C, directory=tmp_path, fingerprint="old")
    old.store(0, torch.arange(N), table()[:, 0])
    old.flush()
    kw = {"num_samples": N, "num_columns": C, "dtype": torch.float32, "fingerprint": "old"}
    kw.update({"fingerprint": "new"} if change == "fingerprint" else
              {"num_samples": N + 1} if change == "num_samples" else {"dtype": torch.float16})
    match = "the guide changed" if change == "fingerprint" else "shape or dtype differs"
    with pytest.warns(RuntimeWarning, match=match):
        new = GuideEmbeddingCache(directory=tmp_path, **kw)
    assert new.values is None and not new.filled.any() and not (tmp_path / "meta.json").exists()
    fresh = torch.ones(2, 3)  # rebuilt with another dimension, too
    new.store(1, torch.tensor([0, 1]), fresh)
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["fingerprint"] == kw["fingerprint"] and meta["num_samples"] == kw["num_samples"] and meta["dim"] == 3
    again = GuideEmbeddingCache(directory=tmp_path, **kw)
    assert again.filled.sum() == 2 and torch.equal(again.values[:2, 1].float(), fresh)


def test_non_creator_never_discards_nor_creates(tmp_path):
    creator = GuideEmbeddingCache(N, C, directory=tmp_path, fingerprint="a", shared=True, creator=True)
    creator.store(0, torch.tensor([1]), torch.ones(1, G))
    other = GuideEmbeddingCache(N, C, directory=tmp_path, fingerprint="b", shared=True, creator=False)
    assert other.values is None and (tmp_path / "meta.json").exists()  # left for the creator to judge
    with pytest.raises(SelectionError, match="only its creator"):
        other.store(0, torch.tensor([2]), torch.ones(1, G))
    with pytest.raises(SelectionError, match="No valid guide-embedding cache"):
        other.reopen()
    with pytest.raises(SelectionError, match="No valid guide-embedding cache"):
        GuideEmbeddingCache(N, C, directory=tmp_path / "empty", shared=True, creator=False).reopen()


def test_two_cache_objects_on_one_directory_see_each_others_rows(tmp_path):
    full = table()
    a = GuideEmbeddingCache(N, C, directory=tmp_path, fingerprint="fp", shared=True, creator=True)
    a.store(0, torch.tensor([0]), full[[0], 0])  # the creator allocates the files
    b = GuideEmbeddingCache(N, C, directory=tmp_path, fingerprint="fp", shared=True, creator=False)
    for i in range(N):  # interleaved disjoint writers, each writing whole rows
        cache = a if i % 2 == 0 else b
        for c in range(C):
            cache.store(c, torch.tensor([i]), full[[i], c])
    for cache in (a, b):  # both mappings are of the same pages: no reopen needed on one machine
        assert cache.filled.all() and torch.equal(cache.values, full)
    a.flush(), b.flush()
    assert torch.equal(GuideEmbeddingCache(N, C, directory=tmp_path, fingerprint="fp").values, full)


def _worker(directory, rank, world, start):
    full = table()
    cache = GuideEmbeddingCache(N, C, directory=directory, fingerprint="fp", shared=True, creator=False)
    cache.reopen()
    start.wait()  # both processes write at the same time
    for i in shard_rows(torch.arange(N), rank, world).tolist():
        for c in range(C):
            cache.store(c, torch.tensor([i]), full[[i], c])
    cache.flush()


def test_concurrent_processes_writing_disjoint_rows_produce_a_complete_cache(tmp_path):
    full = table()
    creator = GuideEmbeddingCache(N, C, directory=tmp_path, fingerprint="fp", shared=True, creator=True)
    creator.store(0, torch.tensor([0]), full[[0], 0])  # create the files (row 0 partly: the workers redo it)
    creator.flush()
    ctx = mp.get_context("spawn")
    start = ctx.Barrier(2)
    procs = [ctx.Process(target=_worker, args=(str(tmp_path), r, 2, start)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    merged = GuideEmbeddingCache(N, C, directory=tmp_path, fingerprint="fp")
    assert merged.filled.all() and torch.equal(merged.values, full)


# --------------------------------------------------------------------------- the rank protocol (threads)
class ThreadGroup:
    """``barrier`` and ``all_gather`` (stacked, like Lightning's) for ``world`` threads."""

    def __init__(self, world):
        self.world, self._barrier, self._slots = world, threading.Barrier(world, timeout=60), [None] * world
        self.barriers = [0] * world

    def strategy(self, rank):
        def barrier(name=None):
            self.barriers[rank] += 1
            self._barrier.wait()

        def all_gather(tensor):
            self._slots[rank] = tensor.clone()
            self._barrier.wait()
            out = torch.stack(list(self._slots))
            self._barrier.wait()
            return out

        return SimpleNamespace(barrier=barrier, all_gather=all_gather)


class RowGuide(torch.nn.Module):
    """A linear guide that records which sample rows it embedded (column 0 of x holds the row id)."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, G)
        gen = torch.Generator().manual_seed(1)
        torch.nn.init.normal_(self.linear.weight, generator=gen)
        torch.nn.init.normal_(self.linear.bias, generator=gen)
        self.rows = []

    def forward(self, x):
        self.rows += x[:, 0].long().tolist()
        return self.linear(x)


class Rows(torch.utils.data.Dataset):
    def __init__(self, n=N):
        self.x = torch.cat([torch.arange(n).float().unsqueeze(1), torch.randn(n, 3)], 1)
        self.xb = torch.cat([self.x[:, :1], self.x[:, 1:] * 2], 1)  # column "b": same row id, other features

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"a": self.x[i], "b": self.xb[i]}


def run_ranks(world, cache, tmp_path, precompute=True, guides=None, dataset=None, fingerprint="fp"):
    """Open the cache on ``world`` thread-ranks at once; returns their lookups and the group."""
    group, dataset = ThreadGroup(world), dataset or Rows()
    guides = guides or [RowGuide() for _ in range(world)]
    for g in guides[1:]:
        g.load_state_dict(guides[0].state_dict())
    lookups = [GuideLookup(g, ["a", "b"], cache=cache, cache_dir=str(tmp_path / "cache"), precompute=precompute,
                           fingerprint=fingerprint) for g in guides]
    errors = []

    def rank(r):
        trainer = SimpleNamespace(world_size=world, num_nodes=1, node_rank=0, local_rank=r, global_rank=r,
                                  is_global_zero=r == 0, strategy=group.strategy(r))
        try:
            lookups[r].open_cache(trainer, dataset, torch.device("cpu"))
        except BaseException as err:  # noqa: BLE001
            errors.append(err)
            group._barrier.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    if errors:
        raise errors[0]
    return lookups, group, dataset


def expected_table(guide, dataset):
    with torch.no_grad():
        return torch.stack([guide.linear(dataset.x), guide.linear(dataset.xb)], 1)


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_disk_precompute_embeds_every_row_once_into_one_cache(tmp_path, world):
    lookups, group, data = run_ranks(world, "disk", tmp_path)
    rows = [lk.guide.rows for lk in lookups]
    # each rank embedded its shard (both columns), nothing twice
    for r in range(world):
        assert sorted(set(rows[r])) == shard_rows(torch.arange(N), r, world).tolist()
        assert len(rows[r]) == 2 * len(set(rows[r]))  # columns "a" and "b": one pass each
    assert sum(len(set(x)) for x in rows) == N
    expected = expected_table(lookups[0].guide, data)
    for lk in lookups:
        assert lk.cache.filled.all() and torch.allclose(lk.cache.values, expected, atol=1e-6)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["filled.npy", "meta.json", "values.npy"]
    assert len(set(group.barriers)) == 1  # every rank passed the same barriers

    # a second DDP run reuses the cache: no guide calls at all, same barriers
    again, group2, _ = run_ranks(world, "disk", tmp_path, dataset=data)
    assert all(lk.guide.rows == [] for lk in again) and group2.barriers == group.barriers
    assert torch.equal(again[1].cache.values, lookups[0].cache.values)


def test_sharded_precompute_only_embeds_the_missing_rows(tmp_path):
    data = Rows()
    single = GuideLookup(RowGuide(), ["a", "b"], cache="disk", cache_dir=str(tmp_path / "cache"), fingerprint="fp",
                         precompute=False)
    one = SimpleNamespace(world_size=1, is_global_zero=True)
    single.open_cache(one, data, torch.device("cpu"))
    single._embed_rows(data, torch.arange(0, N, 3), torch.device("cpu"))  # a third of the rows, single process
    single.flush()
    missing = torch.tensor([i for i in range(N) if i % 3])
    lookups, _, _ = run_ranks(2, "disk", tmp_path, guides=[RowGuide(), RowGuide()], dataset=data)
    assert sorted(set(lookups[0].guide.rows)) == shard_rows(missing, 0, 2).tolist()
    assert sorted(set(lookups[1].guide.rows)) == shard_rows(missing, 1, 2).tolist()
    assert all(lk.cache.filled.all() for lk in lookups)
    assert torch.allclose(lookups[1].cache.values, expected_table(single.guide, data), atol=1e-6)


def test_shared_disk_cache_with_another_guide_is_rebuilt_once(tmp_path):
    run_ranks(2, "disk", tmp_path, fingerprint="old")
    with pytest.warns(RuntimeWarning, match="the guide changed") as caught:
        lookups, _, data = run_ranks(2, "disk", tmp_path, fingerprint="new")
    assert sum("Discarding" in str(w.message) for w in caught) == 1  # only local rank 0 judges and discards
    assert sum(len(set(lk.guide.rows)) for lk in lookups) == N
    assert json.loads((tmp_path / "cache" / "meta.json").read_text())["fingerprint"] == "new"
    assert torch.allclose(lookups[1].cache.values, expected_table(lookups[0].guide, data), atol=1e-6)


def test_shared_disk_cache_without_precompute_fills_during_training(tmp_path):
    """Local rank 0 creates the files from one row; later misses are written to the shared files."""
    lookups, _, data = run_ranks(2, "disk", tmp_path, precompute=False)
    assert lookups[0].guide.rows == [0, 0] and lookups[1].guide.rows == []  # row 0, columns a and b
    batch = {"a": data.x[[5, 6]], "b": data.xb[[5, 6]]}
    lookups[1].embeddings(batch, torch.tensor([5, 6]), torch.device("cpu"))  # rank 1 misses rows 5, 6
    assert lookups[1].guide.rows == [5, 6, 5, 6]
    got = lookups[0].embeddings(batch, torch.tensor([5, 6]), torch.device("cpu"))  # rank 0 reads them
    assert lookups[0].guide.rows == [0, 0] and lookups[0].cache.hits == 4
    assert torch.allclose(got[0], expected_table(lookups[0].guide, data)[[5, 6], 0], atol=1e-6)


def test_sharded_memory_precompute_exchanges_shards(tmp_path, monkeypatch):
    monkeypatch.setattr(lookup_module, "EXCHANGE_CHUNK_ROWS", 5)  # several padded all_gather rounds
    lookups, _, data = run_ranks(3, "memory", tmp_path)
    assert sum(len(set(lk.guide.rows)) for lk in lookups) == N
    assert sorted(r for lk in lookups for r in set(lk.guide.rows)) == list(range(N))
    expected = expected_table(lookups[0].guide, data)
    for lk in lookups:
        assert lk.cache.directory is None and lk.cache.filled.all()
        assert torch.allclose(lk.cache.values, expected, atol=1e-6)
    assert not (tmp_path / "cache").exists()


def test_sharded_memory_precompute_float16_is_exact_across_ranks(tmp_path):
    guides = [RowGuide(), RowGuide()]
    lookups = [GuideLookup(g, ["a", "b"], cache="memory", cache_dtype="float16", precompute=True) for g in guides]
    group, data = ThreadGroup(2), Rows()
    guides[1].load_state_dict(guides[0].state_dict())
    threads = [threading.Thread(target=lookups[r].open_cache, args=(
        SimpleNamespace(world_size=2, global_rank=r, is_global_zero=r == 0, strategy=group.strategy(r)),
        data, torch.device("cpu"))) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert lookups[0].cache.values.dtype == torch.float16
    assert torch.equal(lookups[0].cache.values, lookups[1].cache.values) and lookups[1].cache.filled.all()
