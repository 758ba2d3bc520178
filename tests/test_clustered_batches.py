"""Clustered batches, cluster-reweighted epochs and the BatchComposition callback (issue 10).

The registry (tests/policy_registry.py: clustered_batches, cluster_reweighted) covers the fit, exact resume,
2-process DDP and Hydra; here: the k-means against scikit-learn, the samplers' epochs against independent
counts and formulas, the refresh timing, and every bad input.
"""

import functools
import math

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.datasets import load_digits, make_blobs
from sklearn.metrics import adjusted_rand_score

from lightning_select import BatchComposition, GuidedNegatives, LossHistory, SelectionError
from lightning_select.data import DigitsLDAGuide, DigitsPairsDataModule
from lightning_select.models import DigitsEmbeddingModule
from lightning_select.samplers import (
    ClusteredBatchSampler,
    ClusterReweightedBatchSampler,
    apportion,
    cluster_purity,
    cluster_weights,
    kmeans_cluster_ids,
)
from lightning_select.samplers.clustered import canonical_labels


def unit(x):
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def inertia(x, labels):
    labels = np.asarray(labels)
    return float(sum(((x[labels == c] - x[labels == c].mean(0)) ** 2).sum() for c in np.unique(labels)))


# ------------------------------------------------------------------------------------------------ k-means
@pytest.mark.parametrize("seed", range(6))
def test_kmeans_finds_the_same_partition_as_sklearn_on_separated_blobs(seed):
    x, truth = make_blobs(n_samples=300, centers=5, n_features=8, cluster_std=0.5, center_box=(-10, 10),
                          random_state=seed)
    ids = {b: kmeans_cluster_ids(torch.tensor(x), 5, seed=seed, backend=b) for b in ("faiss", "sklearn")}
    reference = KMeans(5, n_init=1, random_state=seed).fit(unit(x)).labels_  # sklearn itself, on the unit rows
    assert torch.equal(ids["faiss"], ids["sklearn"])  # canonical labels: the same partition is the same tensor
    assert adjusted_rand_score(reference, ids["faiss"].numpy()) == 1.0
    assert adjusted_rand_score(truth, ids["faiss"].numpy()) == 1.0


def test_kmeans_inertia_on_digits_is_within_a_few_percent_of_sklearn():
    x = load_digits().data
    ratios = []
    for seed in range(3):
        ours = kmeans_cluster_ids(torch.tensor(x), 10, seed=seed, backend="faiss")
        theirs = KMeans(10, n_init=1, random_state=seed, max_iter=25).fit(unit(x)).labels_
        ratios.append(inertia(unit(x), ours.numpy()) / inertia(unit(x), theirs))
    assert all(0.9 < r < 1.04 for r in ratios), ratios  # measured 0.99, 1.02, 1.00


def test_faiss_kmeans_is_reproducible_whatever_the_thread_count():
    import faiss

    x = torch.tensor(load_digits().data[:600])
    before = faiss.omp_get_max_threads()
    runs = []
    for threads in (1, 2):
        faiss.omp_set_num_threads(threads)
        runs.append(kmeans_cluster_ids(x, 8, seed=3, backend="faiss"))
        assert faiss.omp_get_max_threads() == threads  # restored after the run
    faiss.omp_set_num_threads(before)
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], kmeans_cluster_ids(x, 8, seed=3))
    assert not torch.equal(runs[0], kmeans_cluster_ids(x, 8, seed=4))  # the seed matters


def test_canonical_labels_number_clusters_by_their_smallest_member():
    ids = canonical_labels([4, 4, 9, 1, 9, 4, 1])
    assert ids.tolist() == [0, 0, 1, 2, 1, 0, 2] and ids.dtype == torch.int64


def test_kmeans_refuses_more_clusters_than_samples_and_bad_input():
    message = r"`num_clusters`=5 is more clusters than the 3 samples; use num_clusters <= 3"
    with pytest.raises(ValueError, match=message):
        kmeans_cluster_ids(torch.rand(3, 2), 5)
    with pytest.raises(ValueError, match="shape"):
        kmeans_cluster_ids(torch.rand(6), 2)
    with pytest.raises(ValueError, match="NaN"):
        kmeans_cluster_ids(torch.tensor([[0.0, float("nan")], [1.0, 0.0]]), 1)
    with pytest.raises(ValueError, match="backend"):
        kmeans_cluster_ids(torch.rand(4, 2), 2, backend="torch")


def test_cluster_purity_is_the_mean_majority_share():
    ids = torch.tensor([0, 0, 1, 1, 2, 2])
    assert cluster_purity([[0, 1, 2], [3, 4, 5, 2]], ids) == pytest.approx((2 / 3 + 2 / 4) / 2)
    assert cluster_purity([[0, 1], [2, 3]], ids) == 1.0


# ------------------------------------------------------------------------------------------------ ClusteredBatchSampler
def clustered(n=40, b=8, clusters=None, **kw):
    s = ClusteredBatchSampler(n, batch_size=b, num_clusters=kw.pop("num_clusters", 4), **kw)
    s.set_clusters(torch.arange(n) % 4 if clusters is None else clusters)
    return s


def test_purity_is_one_when_every_cluster_fills_whole_batches():
    shuffle = torch.randperm(48, generator=torch.Generator().manual_seed(1))
    ids = torch.tensor([0] * 16 + [1] * 8 + [2] * 8 + [3] * 16)[shuffle]
    s = clustered(48, 8, ids, seed=5)
    for epoch in range(3):
        s.set_epoch(epoch)
        batches = list(s)
        assert all(len(set(ids[b].tolist())) == 1 for b in batches)
        assert s.purity(epoch) == 1.0 == cluster_purity(batches, ids)
    spill = clustered(48, 8, torch.tensor([0] * 12 + [1] * 12 + [2] * 24), seed=5)  # 12 is no multiple of 8
    assert spill.purity(0) < 1.0


def test_mix_fills_round_mix_b_places_of_each_batch_uniformly():
    n, b, mix = 203, 16, 0.3
    s = ClusteredBatchSampler(n, batch_size=b, num_clusters=5, mix=mix, seed=2)
    s.set_clusters(torch.arange(n) // 41)
    counts = torch.zeros(n)
    epochs = 300
    for epoch in range(epochs):
        batches, parts = s.epoch_batches(epoch), s.clustered_parts(epoch)
        assert [len(x) for x in batches] == [16] * 12 + [11]  # full batches shuffled, the short one last
        for batch, part in zip(batches, parts):
            fill = round(mix * len(batch))  # 5 of 16, 3 of 11
            assert batch[: len(part)] == part and len(batch) - len(part) == fill
            counts[batch[len(part):]] += 1
    assert sorted(i for x in batches for i in x) == list(range(n))
    share = 12 * 5 + 3  # fillers per epoch
    expected = epochs * share / n
    # each sample is a filler with probability 63/203 per epoch: a binomial check, 5 standard deviations
    assert float((counts - expected).abs().max()) < 5 * math.sqrt(epochs * share / n * (1 - share / n))


def test_every_sample_once_per_epoch_and_drop_last_drops_the_short_batch():
    s = clustered(45, 8, seed=0)
    assert len(s) == 6 and sorted(i for x in s for i in x) == list(range(45))
    dropped = clustered(45, 8, seed=0, drop_last=True)
    batches = list(dropped)
    assert len(dropped) == len(batches) == 5 and all(len(x) == 8 for x in batches)
    assert len({i for x in batches for i in x}) == 40


@pytest.mark.parametrize("n", [48, 41])  # 12 global batches; 11 with a short one, padded to 12 for 2 ranks
def test_ranks_get_equal_counts_of_distinct_batches_covering_the_epoch(n):
    ranks = [clustered(n, 4, seed=3, num_replicas=2, rank=r) for r in range(2)]
    for r in ranks:
        r.set_epoch(1)
    got = [list(r) for r in ranks]
    assert len(got[0]) == len(got[1]) == len(ranks[0]) == math.ceil(math.ceil(n / 4) / 2)
    whole = ranks[0].epoch_batches(1)
    assert [b for pair in zip(*got) for b in pair][: len(whole)] == whole  # rank r trains global batches r, r+2, …
    assert {i for g in got for b in g for i in b} == set(range(n))
    if n % 8 == 0:
        assert not {i for b in got[0] for i in b} & {i for b in got[1] for i in b}


def test_epochs_differ_and_are_seeded():
    a, b, other = clustered(seed=1), clustered(seed=1), clustered(seed=2)
    assert a.epoch_batches(0) == b.epoch_batches(0) != a.epoch_batches(1)
    assert a.epoch_batches(0) != other.epoch_batches(0)
    before = torch.get_rng_state()
    a.epoch_batches(7)
    assert torch.equal(before, torch.get_rng_state())  # no global RNG drawn


def test_skip_batches_and_state_resume_the_same_sequence():
    s = clustered(64, 8, seed=4, mix=0.25)
    s.set_epoch(2)
    full = list(s)
    fresh = ClusteredBatchSampler(64, batch_size=8, num_clusters=4, mix=0.25, seed=4)
    assert len(fresh) == len(full)  # the length is known before the clusters are
    with pytest.raises(RuntimeError, match="set_embeddings"):
        list(fresh)
    fresh.load_state_dict(s.state_dict())
    fresh.set_epoch(2)
    fresh.skip_batches(3)
    assert list(fresh) == full[3:] and list(fresh) == full  # the skip applies once
    with pytest.raises(ValueError, match="same data, batch size"):
        ClusteredBatchSampler(64, batch_size=8, num_clusters=5, mix=0.25, seed=4).load_state_dict(s.state_dict())


def test_set_embeddings_clusters_and_refuses_wrong_shapes():
    x, _ = make_blobs(n_samples=40, centers=4, n_features=3, cluster_std=0.3, random_state=0)
    s = ClusteredBatchSampler(40, batch_size=10, num_clusters=4, seed=0)
    s.set_embeddings(torch.tensor(x))
    assert torch.equal(s.cluster_ids, kmeans_cluster_ids(torch.tensor(x), 4, seed=0))
    with pytest.raises(ValueError, match=r"expected embeddings of shape \[40, D\].*got \(39, 3\)"):
        s.set_embeddings(torch.tensor(x[:39]))
    with pytest.raises(ValueError, match=r"shape \[40\]"):
        s.set_clusters(torch.zeros(41, dtype=torch.long))
    with pytest.raises(ValueError, match=">= 0"):
        s.set_clusters(-torch.ones(40, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        s.set_clusters(torch.zeros(40))


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_clusters=11), "11 is more clusters than the 10 samples"),
    (dict(mix=1.0), "`mix` in \\[0, 1\\)"),
    (dict(mix=-0.1), "`mix` in \\[0, 1\\)"),
    (dict(batch_size=2, mix=0.8), "leaving none for the cluster"),
    (dict(batch_size=20, drop_last=True), "no full batch"),
    (dict(num_clusters=0), "positive int"),
    (dict(backend="cuml"), "backend"),
])
def test_clustered_sampler_bad_options(kwargs, match):
    options = {"batch_size": 4, "num_clusters": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        ClusteredBatchSampler(10, **options)


# ------------------------------------------------------------------------------------------------ cluster weights
def test_cluster_weights_match_a_hand_computation():
    w = cluster_weights(torch.tensor([1.0, float("nan"), 2.0]), torch.tensor([2, 1, 3]), temperature=0.5, max_share=1)
    raw = torch.tensor([2 * math.exp(2), math.exp(3), 3 * math.exp(4)], dtype=torch.float64)  # NaN -> mean 1.5
    assert torch.allclose(w, raw / raw.sum(), rtol=1e-12)
    sizes_only = cluster_weights(torch.full((3,), float("nan")), torch.tensor([1, 3, 0]), 1.0, 1.0)
    assert sizes_only.tolist() == [0.25, 0.75, 0.0]  # no loss yet: by size; an empty cluster gets nothing


def _capped_by_bisection(p, cap):
    """The capped distribution min(cap, λ·p) with Σ = 1, λ found by bisection (an independent formula)."""
    lo, hi = 0.0, 1.0 / float(p[p > 0].min())
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if float(torch.clamp(mid * p, max=cap).sum()) < 1 else (lo, mid)
    return torch.clamp(hi * p, max=cap)


@pytest.mark.parametrize("seed", range(5))
def test_water_filling_cap_equals_the_bisection_solution(seed):
    g = torch.Generator().manual_seed(seed)
    losses, sizes = torch.rand(8, generator=g) * 3, torch.randint(1, 50, (8,), generator=g)
    uncapped = cluster_weights(losses, sizes, 0.3, 1.0)
    for cap in (0.13, 0.2, 0.4):
        w = cluster_weights(losses, sizes, 0.3, cap)
        assert abs(float(w.sum()) - 1) < 1e-12 and float(w.max()) <= cap + 1e-12
        assert torch.allclose(w, _capped_by_bisection(uncapped, cap), atol=1e-9)


def test_an_impossible_cap_gives_uniform_weights_over_nonempty_clusters():
    w = cluster_weights(torch.tensor([5.0, 0.0, 0.0, 1.0]), torch.tensor([3, 1, 0, 1]), 1.0, 0.2)  # 0.2 · 3 < 1
    assert w.tolist() == pytest.approx([1 / 3, 1 / 3, 0.0, 1 / 3])
    tiny_t = cluster_weights(torch.tensor([0.0, 100.0, 1.0]), torch.tensor([1, 1, 1]), 1e-3, 0.5)
    assert torch.isfinite(tiny_t).all() and tiny_t.tolist() == pytest.approx([0.0, 0.5, 0.5])  # no overflow


def test_apportion_gives_exact_totals_within_sizes():
    assert apportion(torch.tensor([0.5, 0.3, 0.2]), torch.tensor([10, 10, 10]), 7).tolist() == [4, 2, 1]
    assert apportion(torch.tensor([0.9, 0.05, 0.05]), torch.tensor([3, 100, 100]), 21).tolist() == [3, 9, 9]
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        w, sizes = torch.rand(6, generator=g), torch.randint(0, 30, (6,), generator=g)
        total = int(torch.randint(0, int(sizes.sum()) + 1, (1,), generator=g))
        counts = apportion(w / w.sum(), sizes, total)
        assert int(counts.sum()) == total and bool((counts <= sizes).all()) and bool((counts >= 0).all())
    uncapped = apportion(torch.tensor([0.15, 0.35, 0.5]), torch.tensor([100, 100, 100]), 13)
    assert bool(((uncapped.double() - torch.tensor([1.95, 4.55, 6.5])).abs() < 1).all())  # Hamilton: |n − q| < 1


def test_weights_and_apportion_refuse_bad_input():
    with pytest.raises(ValueError, match="same length"):
        cluster_weights(torch.zeros(2), torch.ones(3), 1.0, 1.0)
    with pytest.raises(ValueError, match="temperature"):
        cluster_weights(torch.zeros(2), torch.ones(2), 0.0, 1.0)
    with pytest.raises(ValueError, match="max_share"):
        cluster_weights(torch.zeros(2), torch.ones(2), 1.0, 1.5)
    with pytest.raises(ValueError, match="cannot draw 7"):
        apportion(torch.ones(2), torch.tensor([3, 3]), 7)


# ------------------------------------------------------------------------------------ ClusterReweightedBatchSampler
def reweighted(n=60, **kw):
    s = ClusterReweightedBatchSampler(n, batch_size=kw.pop("batch_size", 8), num_clusters=3, **kw)
    s.set_clusters(torch.arange(n) % 3)
    return s


def test_epoch_zero_is_uniform_over_samples_and_sized_by_the_budget():
    s = reweighted(60, budget=0.5, seed=1)
    assert s.weights is None and len(s) == 4
    counts = torch.zeros(60)
    for epoch in range(400):
        chosen = [i for b in s.epoch_batches(epoch) for i in b]
        assert len(chosen) == len(set(chosen)) == 30
        counts[chosen] += 1
    assert float((counts - 200).abs().max()) < 5 * math.sqrt(400 * 0.25)  # each sample: Binomial(400, 1/2)


def test_cluster_losses_drive_the_per_cluster_counts_of_each_epoch():
    s = reweighted(60, budget=0.5, temperature=1.0, max_cluster_share=1.0, seed=0)
    losses = torch.full((60,), float("nan"))
    losses[0::3], losses[1:12:3] = 0.0, 1.0  # cluster 0: mean 0; cluster 1: 4 seen at 1; cluster 2: unseen
    s.update_cluster_losses(losses)
    assert s.cluster_losses.tolist()[:2] == [0.0, 1.0] and math.isnan(s.cluster_losses[2])
    raw = torch.tensor([1.0, math.e, math.exp(0.5)], dtype=torch.float64)  # the unseen cluster gets the mean 0.5
    assert torch.allclose(s.weights, raw / raw.sum(), rtol=1e-12)
    expected = apportion(s.weights, torch.tensor([20, 20, 20]), 30)
    for epoch in range(3):
        batches = s.epoch_batches(epoch)
        chosen = torch.tensor([i for b in batches for i in b])
        assert chosen.unique().numel() == 30 and torch.equal(torch.bincount(chosen % 3, minlength=3), expected)
    assert s.purity(0) < 0.9  # batches mix clusters


def test_reweighted_ranks_state_and_resume():
    ranks = [reweighted(61, budget=0.8, seed=2, num_replicas=2, rank=r) for r in range(2)]
    losses = torch.linspace(0, 2, 61)
    for r in ranks:
        r.update_cluster_losses(losses)
        r.set_epoch(3)
    got = [list(r) for r in ranks]
    assert len(got[0]) == len(got[1]) == len(ranks[0]) == 4  # 49 samples: 7 global batches, padded to 8
    assert {i for g in got for b in g for i in b} == {i for b in ranks[0].epoch_batches(3) for i in b}
    fresh = ClusterReweightedBatchSampler(61, batch_size=8, num_clusters=3, budget=0.8, seed=2, num_replicas=2, rank=1)
    fresh.load_state_dict(ranks[1].state_dict())
    fresh.set_epoch(3)
    fresh.skip_batches(1)
    assert list(fresh) == got[1][1:] and torch.equal(fresh.weights, ranks[1].weights)


def test_reweighted_sampler_bad_input():
    for kwargs, match in [(dict(budget=0.0), "`budget` in \\(0, 1\\]"), (dict(budget=1.2), "`budget`"),
                          (dict(temperature=-1.0), "`temperature` > 0"), (dict(max_cluster_share=0.0), "max_cluster"),
                          (dict(num_clusters=20), "20 is more clusters than the 10 samples"),
                          (dict(budget=0.01), "0 samples per epoch")]:
        options = {"batch_size": 2, "num_clusters": 2, **kwargs}
        with pytest.raises(ValueError, match=match):
            ClusterReweightedBatchSampler(10, **options)
    s = reweighted(9)
    with pytest.raises(ValueError, match=r"shape \[9\]"):
        s.update_cluster_losses(torch.zeros(8))
    with pytest.raises(ValueError, match="inf"):
        s.update_cluster_losses(torch.full((9,), float("inf")))
    with pytest.raises(ValueError, match=r"embeddings of shape \[9, D\]"):
        s.set_embeddings(torch.zeros(9, 2, 2))


# ------------------------------------------------------------------------------------------------ BatchComposition
def fit(callbacks, data, model=None, epochs=1, **kw):
    pl.seed_everything(0)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=epochs, limit_val_batches=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=callbacks, **kw)
    model = model or DigitsEmbeddingModule(hidden=32, dim=16)
    trainer.fit(model, data)
    return trainer, model


def clustered_data(**kw):
    return DigitsPairsDataModule(batch_size=256, batch_sampler=functools.partial(ClusteredBatchSampler, **kw))


class EpochRecorder(pl.Callback):
    """After BatchComposition's epoch start: the sampler's clusters, the student's own k-means of them, the batches."""

    def __init__(self, policy):
        self.policy, self.ids, self.student_ids, self.batches, self.rng_kept = policy, [], [], [], []

    def on_train_epoch_start(self, trainer, pl_module):
        self.ids.append(self.policy.sampler.cluster_ids.clone())
        dataset = trainer.train_dataloader.dataset
        with torch.no_grad():
            images = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
            self.student_ids.append(kmeans_cluster_ids(pl_module.encoder(images), 10, seed=0))
        self.batches.append([])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches[-1].append(batch["index"].tolist())


class RngCheckingComposition(BatchComposition):
    def refresh(self, trainer, pl_module):
        state, training = torch.get_rng_state(), pl_module.training
        super().refresh(trainer, pl_module)
        self.rng_kept = getattr(self, "rng_kept", []) + [torch.equal(state, torch.get_rng_state())
                                                         and pl_module.training == training]


def test_student_refresh_is_used_by_the_epoch_it_starts():
    policy = RngCheckingComposition(source="student", refresh_every_n_epochs=1, progress=False)
    recorder = EpochRecorder(policy)
    fit([policy, recorder], clustered_data(num_clusters=10, mix=0.25), epochs=3)
    assert policy.rng_kept == [True, True, True]  # no global RNG drawn, train mode restored
    for epoch in range(3):
        assert torch.equal(recorder.ids[epoch], recorder.student_ids[epoch])  # the student's clusters at that epoch
        replay = ClusteredBatchSampler(1437, batch_size=256, num_clusters=10, mix=0.25, seed=0)
        replay.set_clusters(recorder.ids[epoch])
        assert recorder.batches[epoch] == replay.epoch_batches(epoch)  # ... and that epoch's batches use them
    assert not torch.equal(recorder.ids[0], recorder.ids[2])  # the student moved, so did its clusters


class CountingGuide(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner, self.rows = DigitsLDAGuide.fit(seed=0), 0

    def forward(self, x):
        self.rows += x.shape[0]
        return self.inner(x)


def test_guide_source_reuses_the_gist_cache_without_a_second_pass():
    guide = CountingGuide()
    gist = GuidedNegatives(guide, anchor_column="image", positive_column="image", margin=0.2)
    policy = BatchComposition(source="guide", progress=False)  # before GIST: it opens GIST's cache itself
    trainer, _ = fit([policy, gist], clustered_data(num_clusters=10), limit_train_batches=2)
    assert guide.rows == 1437  # one guide pass over the training set: GIST's precompute, shared
    expected = kmeans_cluster_ids(torch.nn.functional.normalize(gist.cache.values[:, 0].float(), dim=-1), 10)
    assert torch.equal(policy.sampler.cluster_ids, expected)
    own = BatchComposition(source="guide", guide=DigitsLDAGuide.fit(seed=0), columns=["image"], progress=False)
    fit([own], clustered_data(num_clusters=10), limit_train_batches=1)
    assert torch.equal(own.sampler.cluster_ids, expected)  # its own guide and cache: the same clusters
    assert 0 < float(trainer.callback_metrics["batch_composition/purity"]) <= 1


def test_a_loader_without_a_composed_sampler_is_refused():
    with pytest.raises(SelectionError, match=r"batch_sampler=functools.partial\(ClusteredBatchSampler"):
        fit([BatchComposition(source="student")], DigitsPairsDataModule(batch_size=256), limit_train_batches=1)


def test_the_reweighted_sampler_needs_loss_history():
    data = DigitsPairsDataModule(batch_size=256, batch_sampler=functools.partial(ClusterReweightedBatchSampler))
    with pytest.raises(SelectionError, match=r"no LossHistory callback; add `LossHistory\(\)`"):
        fit([BatchComposition(source="student")], data, limit_train_batches=1)
    fit([BatchComposition(source="student", progress=False), LossHistory()], data, limit_train_batches=1)  # the fix


class NoStudentEmbedding(DigitsEmbeddingModule):
    cluster_embedding = None


def test_a_student_refresh_without_an_embedding_function_is_refused():
    with pytest.raises(SelectionError, match="a refresh requested but no student embedding function"):
        fit([BatchComposition(source="student")], clustered_data(), model=NoStudentEmbedding(hidden=8, dim=4),
            limit_train_batches=1)
    wrong = BatchComposition(source="student", student_embedding=lambda m, b: m.encoder(b["image"])[:-1])
    with pytest.raises(SelectionError, match=r"must return a \[256, D\] tensor"):
        fit([wrong], clustered_data(), limit_train_batches=1)


def test_guide_source_without_any_guide_is_refused():
    with pytest.raises(SelectionError, match="no GuidedNegatives callback whose cache it could reuse"):
        fit([BatchComposition(source="guide")], clustered_data(), limit_train_batches=1)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(source="teacher"), ValueError, "'guide' or 'student'"),
    (dict(refresh_every_n_epochs=-1), ValueError, "refresh_every_n_epochs` >= 0"),
    (dict(loss_statistic="mean"), ValueError, "loss_statistic"),
    (dict(source="student", columns=["anchor"]), ValueError, "options of source='guide'"),
    (dict(student_embedding=lambda m, b: b), ValueError, "option of source='student'"),
    (dict(source="student", student_embedding=3), TypeError, "callable"),
    (dict(guide=torch.nn.Linear(2, 2), cache=None), ValueError, "cache='memory'"),
    (dict(columns="anchor"), TypeError, "list of column names"),
])
def test_batch_composition_bad_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        BatchComposition(**kwargs)


def test_the_example_modules_embed_raw_inputs_for_clustering():
    from tokenizers import Tokenizer, models, pre_tokenizers

    from lightning_select.models import TextEmbeddingModule
    from lightning_select.models.text import StaticEmbeddingEncoder

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    text = TextEmbeddingModule(encoder=StaticEmbeddingEncoder(torch.eye(3), tok), anchor_key="query")
    got = text.cluster_embedding({"query": ["a b", "b"], "positive": ["a", "a"]})
    assert got.tolist() == [[0.0, 0.5, 0.5], [0.0, 0.0, 1.0]]  # the anchor (query) texts' mean token embeddings
    digits = DigitsEmbeddingModule(hidden=8, dim=4)
    images = torch.rand(5, 64)
    assert torch.equal(digits.cluster_embedding({"image": images, "view1": images * 0}), digits.encoder(images))
