"""Clustered batches: fill each batch from one k-means cluster of an embedding of the training set.

In-batch contrastive learning only learns from the negatives that share a batch. Filling a batch from
one neighbourhood of embedding space makes those negatives hard (NGAME; TAS-B's topic-aware sampling;
Arctic-embed's clustered batches). :class:`ClusteredBatchSampler` does that on top of
:class:`~lightning_select.samplers.composed.ComposedBatchSampler` (DDP sharding, epochs, exact resume);
:func:`kmeans_cluster_ids` derives the clusters and :func:`cluster_purity` measures the result.

Example::

    >>> import torch
    >>> s = ClusteredBatchSampler(8, batch_size=2, num_clusters=2, seed=0)
    >>> s.set_clusters(torch.tensor([0, 1, 0, 1, 0, 1, 0, 1]))
    >>> cluster_purity(list(s), s.cluster_ids), sorted(i for b in s for i in b)
    (1.0, [0, 1, 2, 3, 4, 5, 6, 7])
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Sequence
from typing import Any, Literal, Optional

import numpy as np
import torch
from torch import Tensor

from lightning_select.samplers.composed import ComposedBatchSampler
from lightning_select.samplers.epoch import epoch_generator

Backend = Literal["auto", "faiss", "sklearn"]
BACKENDS = ("auto", "faiss", "sklearn")
#: rows the k-means++ seeding looks at (a seeded subsample of a larger set); its cost is rows · k · log k · D
INIT_SAMPLE = 8192


def canonical_labels(ids: Any) -> Tensor:
    """``[N]`` int64 cluster ids renumbered ``0..C-1`` in the order of each cluster's smallest member index.

    Two labellings of the same partition give the same result, so cluster ids can be compared.

    Example::

        >>> canonical_labels([7, 3, 7, 5, 3]).tolist()
        [0, 1, 0, 2, 1]
    """
    x = np.asarray(ids, dtype=np.int64).ravel()
    uniq, first, inverse = np.unique(x, return_index=True, return_inverse=True)
    rank = np.empty(len(uniq), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(uniq))
    return torch.from_numpy(rank[inverse].astype(np.int64))


def _kmeans_plus_plus(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Greedy k-means++ seeding (D² sampling, ``2 + ⌊ln k⌋`` candidates per centre, the best kept)."""
    n, trials = x.shape[0], 2 + int(math.log(k))
    xd = x.astype(np.float64)
    sq = (xd * xd).sum(1)
    centers = [int(rng.integers(n))]
    d2 = np.maximum(sq - 2 * xd @ xd[centers[0]] + sq[centers[0]], 0.0)
    for _ in range(1, k):
        total = d2.sum()
        if total > 0:
            cand = np.searchsorted(np.cumsum(d2), rng.random(trials) * total, side="right").clip(max=n - 1)
        else:  # every row coincides with a centre: any row will do
            cand = rng.integers(n, size=trials)
        dist = np.maximum(sq[None, :] - 2 * xd[cand] @ xd.T + sq[cand][:, None], 0.0)  # [trials, n]
        new = np.minimum(d2[None, :], dist)
        best = int(new.sum(1).argmin())
        centers.append(int(cand[best]))
        d2 = new[best]
    return x[centers].astype(np.float32)


def kmeans_cluster_ids(embeddings: Any, num_clusters: int, seed: int = 0, iterations: int = 25,
                       backend: Backend = "auto") -> Tensor:
    """``[N]`` int64 k-means cluster ids of the L2-normalised rows of ``embeddings`` (``[N, D]``).

    ``backend="faiss"`` runs ``faiss.Kmeans`` (Lloyd iterations, ``iterations`` of them) from a greedy
    k-means++ seeding drawn with ``numpy.random.default_rng(seed)`` on at most :data:`INIT_SAMPLE`
    rows, on one OpenMP thread (faiss's multi-threaded reductions are not bit-reproducible; the
    thread count is restored afterwards). faiss trains on at most 256 rows per centroid (a seeded
    subsample of larger sets) and then assigns every row. ``"sklearn"`` runs scikit-learn's
    ``KMeans(n_init=1, random_state=seed, max_iter=iterations)``. ``"auto"`` uses faiss when it
    imports, else scikit-learn. Both cluster the unit vectors (cosine geometry) and both are
    deterministic for a seed. Ids are :func:`canonical_labels` (numbered by smallest member
    index); a cluster that ends empty is dropped, so there can be fewer than ``num_clusters`` ids.

    Example::

        >>> x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
        >>> kmeans_cluster_ids(x, 2, backend="sklearn").tolist(), kmeans_cluster_ids(x, 2, backend="faiss").tolist()
        ([0, 0, 1, 1], [0, 0, 1, 1])
    """
    x = torch.as_tensor(embeddings).detach().to("cpu", torch.float32)
    if x.dim() != 2 or x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"kmeans_cluster_ids: expected embeddings of shape [N, D], but got {tuple(x.shape)}.")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("kmeans_cluster_ids: the embeddings hold NaN or inf values; check the encoder.")
    n = x.shape[0]
    if isinstance(num_clusters, bool) or not isinstance(num_clusters, int) or num_clusters < 1:
        raise ValueError(f"kmeans_cluster_ids: expected `num_clusters` to be a positive int, but got {num_clusters!r}.")
    if num_clusters > n:
        raise ValueError(f"kmeans_cluster_ids: `num_clusters`={num_clusters} is more clusters than the {n} samples; "
                         f"use num_clusters <= {n}.")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"kmeans_cluster_ids: expected `iterations` to be a positive int, but got {iterations!r}.")
    if backend not in BACKENDS:
        raise ValueError(f"kmeans_cluster_ids: expected `backend` in {BACKENDS}, but got {backend!r}.")
    unit = torch.nn.functional.normalize(x, dim=1).numpy()
    if backend == "auto":
        backend = "faiss" if importlib.util.find_spec("faiss") is not None else "sklearn"
    if backend == "sklearn":
        from sklearn.cluster import KMeans

        labels = KMeans(num_clusters, n_init=1, random_state=seed, max_iter=iterations).fit(unit).labels_
        return canonical_labels(labels)
    import faiss

    rng = np.random.default_rng(seed)
    sample = unit if n <= INIT_SAMPLE else unit[np.sort(rng.choice(n, INIT_SAMPLE, replace=False))]
    init = _kmeans_plus_plus(sample, num_clusters, rng)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        km = faiss.Kmeans(unit.shape[1], num_clusters, niter=iterations, seed=seed, verbose=False,
                          min_points_per_centroid=1)
        km.train(unit, init_centroids=init)
        _, labels = km.index.search(unit, 1)
    finally:
        faiss.omp_set_num_threads(threads)
    return canonical_labels(labels.ravel())


def cluster_purity(batches: Sequence[Sequence[int]], cluster_ids: Any) -> float:
    """Mean over batches of the share of a batch that belongs to its most common cluster (1.0: one cluster each).

    Example::

        >>> cluster_purity([[0, 1], [2, 3]], torch.tensor([0, 0, 0, 1]))
        0.75
    """
    ids = torch.as_tensor(cluster_ids).long()
    shares = [float(torch.bincount(ids[torch.as_tensor(list(b), dtype=torch.long)]).max()) / len(b)
              for b in batches if len(b)]
    return sum(shares) / len(shares) if shares else float("nan")


def check_cluster_ids(owner: str, ids: Any, num_samples: int) -> Tensor:
    """``ids`` as canonical ``[N]`` int64 cluster ids, or a ``ValueError`` naming what is wrong."""
    t = torch.as_tensor(ids)
    if t.dim() != 1 or t.shape[0] != num_samples:
        raise ValueError(f"{owner}: expected cluster ids of shape [{num_samples}] (one per training sample), but got "
                         f"{tuple(t.shape)}.")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{owner}: expected integer cluster ids, but got dtype {t.dtype}.")
    if t.numel() and int(t.min()) < 0:
        raise ValueError(f"{owner}: cluster ids must be >= 0, but got {int(t.min())}.")
    return canonical_labels(t.cpu().numpy())


class ClusterBatchSampler(ComposedBatchSampler):
    """Base of the samplers whose structure is one k-means cluster id per sample (clustered, cluster-reweighted).

    :meth:`set_embeddings` runs :func:`kmeans_cluster_ids` with the sampler's ``num_clusters``,
    ``seed``, ``iterations`` and ``backend``; :meth:`set_clusters` takes ids directly; both store
    canonical ids in :attr:`cluster_ids` and call :meth:`clusters_changed`.
    """

    def __init__(self, num_samples: int, batch_size: int, num_clusters: int = 10, *, seed: int = 0,
                 drop_last: bool = False, num_replicas: int = 1, rank: int = 0, backend: Backend = "auto",
                 iterations: int = 25) -> None:
        super().__init__(num_samples, batch_size, seed=seed, drop_last=drop_last, num_replicas=num_replicas,
                         rank=rank)
        check_clustering_options(type(self).__name__, num_clusters, num_samples, backend, iterations)
        self.num_clusters, self.backend, self.iterations = num_clusters, backend, iterations
        #: ``[N]`` int64 canonical cluster ids, or None until set
        self.cluster_ids: Optional[Tensor] = None

    @property
    def ready(self) -> bool:
        return self.cluster_ids is not None

    def set_embeddings(self, embeddings: Tensor) -> None:
        """Run k-means on ``[N, D]`` embeddings (row ``i`` = sample ``i``) and use its clusters."""
        x = self.check_embeddings(embeddings)
        self.set_clusters(kmeans_cluster_ids(x, self.num_clusters, self.seed, self.iterations, self.backend))

    def set_clusters(self, cluster_ids: Any) -> None:
        """Use ``[N]`` integer cluster ids directly (renumbered canonically)."""
        self.cluster_ids = check_cluster_ids(type(self).__name__, cluster_ids, self.num_samples)
        self.clusters_changed()

    def clusters_changed(self) -> None:
        """Called after the clusters changed (subclasses extend); forgets the cached epoch plan."""
        self.invalidate()

    def cluster_sizes(self) -> Tensor:
        """``[C]`` int64 number of samples in each cluster."""
        if self.cluster_ids is None:
            raise RuntimeError(f"{type(self).__name__} has no clusters yet; call set_embeddings or set_clusters.")
        return torch.bincount(self.cluster_ids)

    def _options(self) -> dict[str, Any]:
        return {**super()._options(), "num_clusters": self.num_clusters}


class ClusteredBatchSampler(ClusterBatchSampler):
    """Batches whose samples come from one k-means cluster, plus a share ``mix`` drawn uniformly at random.

    The batch sizes are those of a plain loader: ``⌊N / b⌋`` batches of ``b = batch_size`` and a short
    last one of ``N mod b`` (dropped with ``drop_last``). Each batch of size ``s`` holds ``f = round(mix
    · s)`` *fillers* and ``c = s − f`` *clustered* samples. Epoch ``e``, with
    ``epoch_generator(seed, e)``: (1) the fillers, ``Σ f`` samples, are drawn uniformly without
    replacement; (2) the other samples are ordered cluster by cluster (a random cluster order, a
    random order within each cluster) and cut, in that order, into the batches' clustered parts;
    (3) batch ``k`` is clustered part ``k`` followed by fillers ``k``; (4) the full batches are
    shuffled and the short batch stays last. So every sample appears exactly once per epoch (unless
    ``drop_last`` drops the short batch).

    A cluster whose size is not a multiple of ``c`` spills over into the next clustered part, which then
    mixes two (or more) clusters, and fillers are drawn out of the clusters, so the *purity* (the share
    of a clustered part in its most common cluster, :meth:`purity`) is below 1 in general. It is
    exactly 1 when ``mix = 0`` and every cluster's remaining size is a multiple of ``c``. With
    :class:`~lightning_select.policies.batch_composition.BatchComposition` it is logged each epoch.

    Under DDP (``num_replicas = W``) every rank composes the same global list and trains every
    ``W``-th batch (the base class), so each rank's batch is one cluster's and the ranks see
    different clusters in a step.

    Args:
        num_samples: ``N``, the size of the training set.
        batch_size: samples per batch and rank.
        num_clusters: ``k`` of the k-means run by :meth:`set_embeddings` (at most ``N``).
        mix: share of each batch drawn uniformly from the rest of the data, in ``[0, 1)``.
        seed: seed of every random choice (and of the k-means).
        drop_last: drop the short last batch.
        num_replicas: number of DDP ranks.
        rank: this process's rank.
        backend: k-means backend, see :func:`kmeans_cluster_ids`.
        iterations: k-means iterations.

    Example::

        >>> s = ClusteredBatchSampler(6, batch_size=3, num_clusters=2, mix=1 / 3, seed=0)
        >>> s.set_clusters(torch.tensor([0, 0, 0, 1, 1, 1]))
        >>> [len(p) for p in s.clustered_parts(0)], sorted(i for b in s for i in b)
        ([2, 2], [0, 1, 2, 3, 4, 5])
    """

    kind = "clustered"

    def __init__(self, num_samples: int, batch_size: int, num_clusters: int = 10, mix: float = 0.0, *,
                 seed: int = 0, drop_last: bool = False, num_replicas: int = 1, rank: int = 0,
                 backend: Backend = "auto", iterations: int = 25) -> None:
        super().__init__(num_samples, batch_size, num_clusters, seed=seed, drop_last=drop_last,
                         num_replicas=num_replicas, rank=rank, backend=backend, iterations=iterations)
        owner = type(self).__name__
        if isinstance(mix, bool) or not isinstance(mix, (int, float)) or not 0.0 <= mix < 1.0:
            raise ValueError(f"{owner}: expected `mix` in [0, 1) (the share of each batch drawn at random), but got "
                             f"{mix!r}.")
        if batch_size - round(mix * batch_size) < 1:
            raise ValueError(f"{owner}: `mix`={mix} fills all round({mix}·{batch_size}) = {batch_size} places of a "
                             "batch with random samples, leaving none for the cluster; lower `mix`.")
        sizes = self.batch_sizes()
        if not sizes:
            raise ValueError(f"{owner}: {num_samples} samples make no full batch of {batch_size} with "
                             "`drop_last=True`; lower `batch_size` or set `drop_last=False`.")
        self.mix = float(mix)
        self._parts: Optional[tuple[int, list[list[int]]]] = None

    def invalidate(self) -> None:
        super().invalidate()
        self._parts = None

    # ------------------------------------------------------------------ epochs
    def batch_sizes(self) -> list[int]:
        """The sizes of the epoch's global batches (independent of the clusters): ``b, …, b, N mod b``."""
        full, rest = divmod(self.num_samples, self.batch_size)
        return [self.batch_size] * full + ([rest] if rest and not self.drop_last else [])

    def _compose(self, epoch: int) -> tuple[list[list[int]], list[list[int]]]:
        assert self.cluster_ids is not None
        g = epoch_generator(self.seed, epoch)
        n, ids = self.num_samples, self.cluster_ids
        sizes = [self.batch_size] * (self.num_samples // self.batch_size)
        if self.num_samples % self.batch_size:
            sizes.append(self.num_samples % self.batch_size)
        fills = [round(self.mix * s) for s in sizes]
        fillers = torch.randperm(n, generator=g)[: sum(fills)]
        is_filler = torch.zeros(n, dtype=torch.bool)
        is_filler[fillers] = True
        num_clusters = int(ids.max()) + 1
        cluster_rank = torch.empty(num_clusters, dtype=torch.long)
        cluster_rank[torch.randperm(num_clusters, generator=g)] = torch.arange(num_clusters)
        within = torch.randperm(n, generator=g)
        order = within[torch.sort(cluster_rank[ids[within]], stable=True).indices]
        clustered = order[~is_filler[order]].tolist()
        fill_list = fillers.tolist()
        parts, batches, a, f = [], [], 0, 0
        for size, fill in zip(sizes, fills):
            part = clustered[a:a + size - fill]
            parts.append(part)
            batches.append(part + fill_list[f:f + fill])
            a, f = a + size - fill, f + fill
        full = len(batches) - (1 if len(batches[-1]) < self.batch_size else 0)
        perm = torch.randperm(full, generator=g).tolist() + list(range(full, len(batches)))
        batches, parts = [batches[i] for i in perm], [parts[i] for i in perm]
        if self.drop_last and len(batches[-1]) < self.batch_size:
            batches, parts = batches[:-1], parts[:-1]
        return batches, parts

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        batches, parts = self._compose(epoch)
        self._parts = (epoch, parts)
        return batches

    def clustered_parts(self, epoch: int) -> list[list[int]]:
        """The clustered part (without the fillers) of each global batch of ``epoch``, in batch order."""
        if self._parts is None or self._parts[0] != epoch:
            self._parts = (epoch, self._compose(epoch)[1])
        return self._parts[1]

    def purity(self, epoch: int) -> float:
        """:func:`cluster_purity` of the clustered parts of ``epoch``'s batches."""
        assert self.cluster_ids is not None
        return cluster_purity(self.clustered_parts(epoch), self.cluster_ids)

    def cluster_mass(self) -> Tensor:
        """``[C]`` float64 share of the epoch's samples each cluster provides (every sample once: its size share)."""
        sizes = self.cluster_sizes().double()
        return sizes / sizes.sum()

    # ------------------------------------------------------------------ state
    def _options(self) -> dict[str, Any]:
        return {**super()._options(), "mix": self.mix}

    def _structure_state(self) -> dict[str, Any]:
        assert self.cluster_ids is not None
        return {"cluster_ids": self.cluster_ids.clone()}

    def _load_structure(self, state: dict[str, Any]) -> None:
        self.set_clusters(state["cluster_ids"])


def check_clustering_options(owner: str, num_clusters: Any, num_samples: int, backend: Any, iterations: Any) -> None:
    """Validate the k-means options shared by the clustering samplers (errors name the option and the fix)."""
    if isinstance(num_clusters, bool) or not isinstance(num_clusters, int) or num_clusters < 1:
        raise ValueError(f"{owner}: expected `num_clusters` to be a positive int, but got {num_clusters!r}.")
    if num_clusters > num_samples:
        raise ValueError(f"{owner}: `num_clusters`={num_clusters} is more clusters than the {num_samples} samples; "
                         f"use num_clusters <= {num_samples}.")
    if backend not in BACKENDS:
        raise ValueError(f"{owner}: expected `backend` in {BACKENDS}, but got {backend!r}.")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"{owner}: expected `iterations` to be a positive int, but got {iterations!r}.")
