"""A damaged disk guide cache checks itself when opened: it is repaired or rebuilt with a warning
that names the files and rows, never trained on; a process that may not repair it refuses it.

Every test damages a complete cache of the digits LDA guide (1437 samples, one input column,
9 dimensions, so ``values.npy`` is a 128-byte header plus 1437 x 36 bytes) the way it was seen
damaged, reopens it, and checks that afterwards the cache holds exactly what a fresh cache holds.
"""

import json
import os
from types import SimpleNamespace

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from lightning_select import GuidedNegatives, GuideEmbeddingCache, SelectionError
from lightning_select.data import DigitsLDAGuide, DigitsPairsDataModule
from lightning_select.guides.lookup import GuideLookup
from lightning_select.models import DigitsEmbeddingModule

CPU = torch.device("cpu")
ONE_PROCESS = SimpleNamespace(world_size=1, is_global_zero=True)
N, G = 1437, 9


class CountingGuide(torch.nn.Module):
    """The digits LDA guide, counting the rows it embeds."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.rows = inner, 0

    def forward(self, x):
        self.rows += len(x)
        return self.inner(x)


@pytest.fixture(scope="module")
def lda():
    return DigitsLDAGuide.fit(seed=0)


@pytest.fixture(scope="module")
def table():
    dm = DigitsPairsDataModule()
    dm.setup()
    return dm.train_set.dataset  # items {"image": [64], "label"}; sample index i is position i


@pytest.fixture(scope="module")
def fresh(lda, table, tmp_path_factory):
    """A freshly computed disk cache (values [N, 1, G], fp32) and the guide's own output."""
    lookup = open_lookup(CountingGuide(lda), table, tmp_path_factory.mktemp("fresh"))
    assert lookup.cache.filled.all()
    with torch.no_grad():
        direct = lda(table.images).float().unsqueeze(1)
    assert torch.allclose(lookup.cache.values, direct, atol=1e-6)
    return lookup.cache.values.clone()


def open_lookup(guide, table, directory):
    lookup = GuideLookup(guide, ["image", "image"], cache="disk", cache_dir=str(directory), precompute=True)
    lookup.open_cache(ONE_PROCESS, table, CPU)
    return lookup


@pytest.fixture
def built(lda, table, tmp_path):
    """A complete, flushed cache directory of the (counting) digits guide."""
    directory = tmp_path / "cache"
    lookup = open_lookup(CountingGuide(lda), table, directory)
    lookup.flush()
    assert lookup.guide.rows == N
    del lookup
    return directory


def reopen_expecting(lda, table, directory, fresh, match, recomputed):
    """Reopen ``directory`` (precompute): one RuntimeWarning matching ``match``, exactly ``recomputed``
    rows embedded again, then the cache equals a fresh one and serves a training batch from itself."""
    guide = CountingGuide(lda)
    with pytest.warns(RuntimeWarning, match=match) as caught:
        lookup = open_lookup(guide, table, directory)
    assert sum(issubclass(w.category, RuntimeWarning) and "Guide cache" in str(w.message) for w in caught) == 1
    assert guide.rows == recomputed
    cache = lookup.cache
    assert cache.filled.all() and torch.allclose(cache.values, fresh, atol=1e-6)
    assert sorted(p.name for p in directory.iterdir()) == ["filled.npy", "meta.json", "values.npy"]
    # training goes on from the repaired cache: a batch is answered without the guide, correctly
    idx = torch.tensor([0, 700, 1436])
    got = lookup.embeddings({"image": table.images[idx]}, idx, CPU)
    assert guide.rows == recomputed and cache.hits == 3
    assert all(torch.allclose(g, fresh[idx, 0], atol=1e-6) for g in got)
    # and the repaired files are healthy: a third open is silent and embeds nothing
    again = CountingGuide(lda)
    again_lookup = open_lookup(again, table, directory)
    assert again.rows == 0 and torch.allclose(again_lookup.cache.values, fresh, atol=1e-6)
    return lookup


# --------------------------------------------------------------------------- values.npy
def test_truncated_values_recomputes_the_rows_past_the_end(lda, table, built, fresh):
    path = built / "values.npy"
    os.truncate(path, 30_000)  # header 128 bytes: 829 whole rows of 36 bytes survive, row 829 is cut
    reopen_expecting(lda, table, built, fresh,
                     r"Guide cache .*cache: 608 rows marked filled are damaged \(608 lie past the end of values\.npy "
                     r"\(30000 bytes, its header says 51860\)\); they will be recomputed", recomputed=608)


def test_nan_values_are_recomputed(lda, table, built, fresh):
    values = np.load(built / "values.npy", mmap_mode="r+")
    values[:] = np.nan
    values.flush()
    del values
    reopen_expecting(lda, table, built, fresh,
                     r"1437 rows marked filled are damaged \(1437 hold zeros or non-finite values\)", recomputed=N)


def test_zero_and_infinite_rows_marked_filled_are_recomputed(lda, table, built, fresh):
    values = np.load(built / "values.npy", mmap_mode="r+")
    values[[3, 10]] = 0.0  # an exact all-zero guide embedding is never a valid cached row
    values[500, 0, 4] = np.inf
    values[-1, 0, 0] = np.nan
    values.flush()
    del values
    reopen_expecting(lda, table, built, fresh, r"4 rows marked filled are damaged \(4 hold zeros or non-finite",
                     recomputed=4)


def test_deleted_values_rebuilds_the_cache(lda, table, built, fresh):
    (built / "values.npy").unlink()
    reopen_expecting(lda, table, built, fresh, r"Guide cache .*: values\.npy is missing; the cache will be rebuilt",
                     recomputed=N)


def test_empty_values_rebuilds_the_cache(lda, table, built, fresh):
    (built / "values.npy").write_bytes(b"")
    reopen_expecting(lda, table, built, fresh, r"values\.npy is empty; the cache will be rebuilt", recomputed=N)


def test_values_of_another_shape_rebuild_the_cache(lda, table, built, fresh):
    np.save(built / "values.npy", np.ones((N, 1, G + 1), np.float32))
    reopen_expecting(lda, table, built, fresh, r"values\.npy holds float32 \(1437, 1, 10\), but meta\.json says "
                     r"float32 \(1437, 1, 9\)", recomputed=N)


# --------------------------------------------------------------------------- filled.npy
def test_filled_truncated_inside_its_header_rebuilds_the_cache(lda, table, built, fresh):
    os.truncate(built / "filled.npy", 60)
    reopen_expecting(lda, table, built, fresh, r"filled\.npy has no readable \.npy header .*the cache will be rebuilt",
                     recomputed=N)


def test_filled_truncated_after_its_header_recomputes_the_lost_flags(lda, table, built, fresh):
    os.truncate(built / "filled.npy", 128 + 1000)  # the flags of rows 1000.. are gone
    reopen_expecting(lda, table, built, fresh,
                     r"filled\.npy is 1128 bytes, its header says 1565: the flags of its last 437 rows were lost",
                     recomputed=N - 1000)


def test_garbled_flags_are_recomputed(lda, table, built, fresh):
    with open(built / "filled.npy", "r+b") as f:
        f.seek(128 + 5)
        f.write(bytes([7, 255]))  # neither 0 nor 1: no numpy bool
    reopen_expecting(lda, table, built, fresh, r"2 rows marked filled are damaged \(2 have garbled flags",
                     recomputed=2)


# --------------------------------------------------------------------------- meta.json
@pytest.mark.parametrize("damage", ["truncated", "garbled", "not an object", "bad dim"])
def test_unreadable_meta_rebuilds_the_cache(lda, table, built, fresh, damage):
    meta_path = built / "meta.json"
    text = meta_path.read_text()
    if damage == "truncated":
        meta_path.write_text(text[:20])
    elif damage == "garbled":
        meta_path.write_bytes(b"\xff\xfe\x00garbage" + text.encode()[5:])
    elif damage == "not an object":
        meta_path.write_text("[1, 2]")
    else:
        meta_path.write_text(json.dumps({**json.loads(text), "dim": "nine"}))
    match = r"meta\.json records dimension 'nine'" if damage == "bad dim" else r"meta\.json is unreadable"
    reopen_expecting(lda, table, built, fresh, match + r".*; the cache will be rebuilt", recomputed=N)


def test_interrupted_allocation_is_no_cache(lda, table, tmp_path, fresh, monkeypatch):
    """A crash between creating the arrays and writing meta.json leaves no valid cache, and no temporaries."""
    directory = tmp_path / "cache"

    def crash(self, dim):
        raise KeyboardInterrupt

    monkeypatch.setattr(GuideEmbeddingCache, "_write_meta", crash)
    with pytest.raises(KeyboardInterrupt):
        open_lookup(CountingGuide(lda), table, directory)
    monkeypatch.undo()
    assert not (directory / "meta.json").exists()
    reopen_expecting(lda, table, directory, fresh, r"without meta\.json.*the cache will be rebuilt", recomputed=N)


# --------------------------------------------------------------------------- processes that may not repair
def test_a_non_creator_refuses_a_damaged_shared_cache_without_touching_it(built):
    os.truncate(built / "values.npy", 30_000)
    other = GuideEmbeddingCache(N, 1, directory=built, fingerprint=json.loads((built / "meta.json").read_text())[
        "fingerprint"], shared=True, creator=False)
    assert other.values is None
    with pytest.raises(SelectionError, match=r"values\.npy is 30000 bytes, its header says 51860.*"
                                             r"delete the directory or pass a fresh cache_dir"):
        other.reopen()
    assert os.path.getsize(built / "values.npy") == 30_000  # only the creator repairs


def test_a_rank_finding_the_shared_cache_damaged_after_rank_0_checked_it_stops_every_rank(lda, table, built):
    """Threads stand in for two DDP ranks; the files are damaged between rank 0's check and rank 1's open."""
    import threading

    world, gate, slots, errors = 2, threading.Barrier(2, timeout=60), [None, None], [None, None]

    def strategy(rank):
        def barrier(name=None):
            if rank == 0 and name == "lightning_select.guide_cache.validated":
                os.truncate(built / "values.npy", 30_000)  # rank 0 found it healthy; now it is not
            gate.wait()

        def all_gather(tensor):
            slots[rank] = tensor.clone()
            gate.wait()
            out = torch.stack(list(slots))
            gate.wait()
            return out

        return SimpleNamespace(barrier=barrier, all_gather=all_gather)

    def rank(r):
        trainer = SimpleNamespace(world_size=world, num_nodes=1, node_rank=0, local_rank=r, global_rank=r,
                                  is_global_zero=r == 0, strategy=strategy(r))
        lookup = GuideLookup(CountingGuide(lda), ["image", "image"], cache="disk", cache_dir=str(built))
        try:
            lookup.open_cache(trainer, table, CPU)
        except BaseException as err:  # noqa: BLE001
            errors[r] = err

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert isinstance(errors[1], SelectionError), errors
    assert "values.npy is 30000 bytes, its header says 51860" in str(errors[1])
    assert isinstance(errors[0], SelectionError) and "Another rank found" in str(errors[0])  # no rank waits alone
    assert all(str(built) in str(e) and "delete the directory or pass a fresh cache_dir" in str(e) for e in errors)
    assert os.path.getsize(built / "values.npy") == 30_000  # only the creator repairs, and it had already checked


def test_all_zero_guide_rows_are_not_cached():
    cache = GuideEmbeddingCache(4, 1)
    emb = torch.tensor([[1.0, 2.0], [0.0, 0.0], [70000.0, 1.0]])
    with pytest.warns(RuntimeWarning, match=r"1 guide embedding\(s\) of column 0 all zero or non-finite; not cached"):
        cache.store(0, torch.tensor([0, 1, 2]), emb)
    half = GuideEmbeddingCache(4, 1, dtype=torch.float16)
    with pytest.warns(RuntimeWarning, match=r"2 guide embedding\(s\) of column 0 all zero or non-finite in float16"):
        half.store(0, torch.tensor([0, 1, 2]), emb)  # 70000 overflows float16
    out = cache.get_or_compute(0, torch.tensor([0, 1]), lambda rows: torch.zeros(len(rows), 2))
    assert cache.hits == 1 and cache.misses == 1 and torch.equal(out, torch.tensor([[1.0, 2.0], [0.0, 0.0]]))
    assert cache.filled[:, 0].tolist() == [True, False, True, False]
    assert half.filled[:, 0].tolist() == [True, False, False, False]


# --------------------------------------------------------------------------- end to end
def _fit(lda, cache_dir, trainer_kwargs):
    gist = GuidedNegatives(lda, anchor_column="image", positive_column="image", margin=0.3, cache="disk",
                           cache_dir=str(cache_dir), precompute=True)
    pl.seed_everything(0)
    model = DigitsEmbeddingModule()
    trainer = pl.Trainer(callbacks=[gist], max_steps=4, limit_val_batches=0, **trainer_kwargs)
    trainer.fit(model, DigitsPairsDataModule(batch_size=64))
    return gist, [p.detach().clone() for p in model.parameters()]


def test_fit_on_a_damaged_cache_warns_and_trains_like_a_fresh_cache(lda, tmp_path, trainer_kwargs):
    damaged = tmp_path / "damaged"
    _fit(lda, damaged, trainer_kwargs)
    os.truncate(damaged / "values.npy", 30_000)  # 608 rows would train on zero guide embeddings
    with pytest.warns(RuntimeWarning, match=r"608 rows marked filled are damaged.*they will be recomputed"):
        repaired, params = _fit(lda, damaged, trainer_kwargs)
    reference, expected = _fit(lda, tmp_path / "fresh", trainer_kwargs)
    assert repaired.cache.filled.all() and torch.allclose(repaired.cache.values, reference.cache.values, atol=1e-6)
    assert all(torch.allclose(p, q, atol=1e-6) for p, q in zip(params, expected))
