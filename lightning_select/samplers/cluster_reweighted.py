"""Cluster-diverse epochs with iterative cluster reweighting (in the style of Diversify-and-Conquer).

Yu et al., "Diversify and Conquer: Diversity-Centric Data Selection with Iterative Refinement" (2024)
cluster the training set with k-means, draw a budget from every cluster, and after each round of
training reassess each cluster's importance and re-draw. Here the signal is the training loss: each
epoch trains ``round(budget · N)`` samples, drawn per cluster with weights that grow with the
cluster's mean recorded loss (:func:`cluster_weights`), apportioned exactly
(:func:`apportion`) and mixed across clusters, so batches are diverse, not clustered.

Example::

    >>> import torch
    >>> s = ClusterReweightedBatchSampler(8, batch_size=2, num_clusters=2, budget=0.5, temperature=2.0,
    ...                                   max_cluster_share=1.0, seed=0)
    >>> s.set_clusters(torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]))
    >>> s.update_cluster_losses(torch.tensor([1.0, 1.0, float("nan"), 1.0, 3.0, 3.0, 3.0, 3.0]))
    >>> [round(w, 3) for w in s.weights.tolist()], s.cluster_counts().tolist(), len(s)  # ∝ e^0.5, e^1.5
    ([0.269, 0.731], [1, 3], 2)
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor

from lightning_select.samplers.clustered import Backend, ClusterBatchSampler, check_cluster_ids, cluster_purity
from lightning_select.samplers.epoch import epoch_generator


def cluster_weights(cluster_losses: Any, cluster_sizes: Any, temperature: float, max_share: float) -> Tensor:
    """``[C]`` float64 sampling weights ``w_c ∝ size_c · exp(L_c / T)``, capped so that no ``w_c > max_share``.

    A cluster with no recorded loss (NaN) gets the mean loss of the others; with no loss at all the
    weights are ``∝ size``. Empty clusters get 0. The cap is water-filling: every weight above
    ``max_share`` is set to it and the mass it loses goes to the uncapped clusters in proportion to
    their weights, repeated until no weight exceeds the cap (at most ``C`` rounds), so the capped
    weights sum to 1 and hold the cap exactly. If ``max_share · C' < 1`` for the ``C'`` non-empty
    clusters, no distribution can hold the cap: the weights are then uniform over the non-empty
    clusters (``1 / C'`` each, the smallest largest share there is). Computed in log space, so a
    small ``T`` cannot overflow.

    Example::

        >>> w = cluster_weights(torch.tensor([0.0, math.log(2), float("nan")]), torch.tensor([1, 1, 2]), 1.0, 1.0)
        >>> [round(v, 4) for v in w.tolist()]  # ∝ 1·1, 1·2, 2·exp(mean) = 2·√2
        [0.1716, 0.3431, 0.4853]
        >>> cluster_weights(torch.tensor([0.0, 0.0, 5.0]), torch.tensor([1, 1, 1]), 1.0, 0.5).tolist()
        [0.25, 0.25, 0.5]
    """
    losses = torch.as_tensor(cluster_losses, dtype=torch.float64).flatten()
    sizes = torch.as_tensor(cluster_sizes, dtype=torch.float64).flatten()
    if losses.shape != sizes.shape or losses.numel() == 0:
        raise ValueError(f"cluster_weights: expected `cluster_losses` and `cluster_sizes` of the same length C >= 1, "
                         f"but got {tuple(losses.shape)} and {tuple(sizes.shape)}.")
    if bool((sizes < 0).any()) or not bool((sizes > 0).any()):
        raise ValueError(f"cluster_weights: `cluster_sizes` must be >= 0 with at least one > 0, but got "
                         f"{sizes.tolist()}.")
    if bool(torch.isinf(losses).any()):
        raise ValueError("cluster_weights: `cluster_losses` holds inf; record finite losses (NaN = unknown).")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"cluster_weights: expected `temperature` > 0, but got {temperature!r}.")
    if not (isinstance(max_share, (int, float)) and 0 < max_share <= 1):
        raise ValueError(f"cluster_weights: expected `max_share` in (0, 1], but got {max_share!r}.")
    present = sizes > 0
    known = ~torch.isnan(losses) & present
    filled = losses.clone()
    filled[~known] = losses[known].mean() if bool(known.any()) else 0.0
    log_w = torch.full_like(sizes, -math.inf)
    log_w[present] = sizes[present].log() + filled[present] / temperature
    count = int(present.sum())
    if max_share * count < 1:
        return present.double() / count
    capped = torch.zeros_like(present)
    while True:
        free = present & ~capped
        mass = 1.0 - max_share * int(capped.sum())
        w = torch.zeros_like(sizes)
        w[capped] = max_share
        w[free] = torch.softmax(log_w[free], 0) * mass
        over = free & (w > max_share)
        if not bool(over.any()):
            return w
        capped |= over


def apportion(weights: Any, sizes: Any, total: int) -> Tensor:
    """``[C]`` int64 counts summing to ``total``, ``∝ weights``, never above ``sizes`` (largest remainder).

    Quotas ``q_c = w_c · total`` are capped at the cluster sizes, the excess going to the clusters with
    room in proportion to their weights (repeated until none exceeds its size); then each cluster gets
    ``⌊q_c⌋`` and the ``total − Σ⌊q_c⌋`` remaining samples go to the largest fractional parts (ties:
    lower cluster id).

    Example::

        >>> apportion(torch.tensor([0.5, 0.3, 0.2]), torch.tensor([10, 10, 10]), 7).tolist()
        [4, 2, 1]
        >>> apportion(torch.tensor([0.8, 0.1, 0.1]), torch.tensor([2, 10, 10]), 6).tolist()
        [2, 2, 2]
    """
    w = torch.as_tensor(weights, dtype=torch.float64).flatten()
    size = torch.as_tensor(sizes, dtype=torch.long).flatten()
    if w.shape != size.shape or bool((w < 0).any()) or not bool(torch.isfinite(w).all()):
        raise ValueError(f"apportion: expected finite weights >= 0 of the same length as sizes, got {w.tolist()} "
                         f"and {size.tolist()}.")
    if not 0 <= total <= int(size.sum()):
        raise ValueError(f"apportion: cannot draw {total} samples from clusters of sizes summing to {int(size.sum())}.")
    w = torch.where(size > 0, w, torch.zeros_like(w))
    quota = torch.zeros_like(w)
    full = torch.zeros(w.shape, dtype=torch.bool)
    while True:
        free = ~full & (size > 0)
        mass = total - float(size[full].sum())
        if bool(free.any()):
            share = w[free] if float(w[free].sum()) > 0 else size[free].double()  # no weight left: by size
            quota[free] = share / share.sum() * mass
        quota[full] = size[full].double()
        over = free & (quota > size)
        if not bool(over.any()):
            break
        full |= over
    counts = quota.floor().long().clamp(max=size)
    rest = total - int(counts.sum())
    if rest > 0:
        frac = torch.where(counts < size, quota - counts.double(), torch.full_like(quota, -1.0))
        order = torch.sort(-frac, stable=True).indices
        counts[order[:rest]] += 1
    return counts


class ClusterReweightedBatchSampler(ClusterBatchSampler):
    """Each epoch ``round(budget · N)`` samples, drawn per k-means cluster by loss-driven weights, mixed.

    Epoch ``e`` with ``epoch_generator(seed, e)``: with no recorded loss yet, ``M = round(budget · N)``
    samples uniformly without replacement. Otherwise the cluster weights are :func:`cluster_weights`
    ``(cluster losses, sizes, temperature, max_cluster_share)``, the per-cluster counts are
    :func:`apportion` ``(weights, sizes, M)`` (exactly ``M``, never more than a cluster holds), each
    cluster's count is drawn from it without replacement, and all the drawn samples are shuffled
    together and cut into batches of ``batch_size`` (the short one last): every batch mixes clusters.

    :meth:`update_cluster_losses` takes an ``[N]`` per-sample loss (NaN for unseen samples, e.g.
    ``LossHistory.store.ema_loss``); each cluster's loss is the mean over its seen samples, used from
    the next planned epoch on. The per-sample losses, cluster losses and weights are in the state,
    so resume is exact; re-clustering (:meth:`set_embeddings`) recomputes the cluster losses from the
    stored per-sample losses.

    Args:
        num_samples: ``N``.
        batch_size: samples per batch and rank.
        num_clusters: ``k`` of the k-means run by :meth:`set_embeddings` (at most ``N``).
        budget: share of the ``N`` samples trained per epoch, in ``(0, 1]``.
        temperature: ``T`` of the weights ``∝ size · exp(L / T)`` (smaller: sharper on high loss).
        max_cluster_share: cap on any cluster's share of the weight, in ``(0, 1]``.
        seed, drop_last, num_replicas, rank: see :class:`~lightning_select.samplers.composed.ComposedBatchSampler`.
        backend, iterations: k-means options, see :func:`~lightning_select.samplers.clustered.kmeans_cluster_ids`.

    Example::

        >>> s = ClusterReweightedBatchSampler(10, batch_size=4, num_clusters=2, budget=0.5, seed=0)
        >>> s.set_clusters(torch.tensor([0] * 5 + [1] * 5))
        >>> [len(b) for b in s], len({i for b in s for i in b})
        ([4, 1], 5)
    """

    kind = "cluster_reweighted"

    def __init__(self, num_samples: int, batch_size: int, num_clusters: int = 10, budget: float = 0.5,
                 temperature: float = 1.0, max_cluster_share: float = 0.5, *, seed: int = 0, drop_last: bool = False,
                 num_replicas: int = 1, rank: int = 0, backend: Backend = "auto", iterations: int = 25) -> None:
        super().__init__(num_samples, batch_size, num_clusters, seed=seed, drop_last=drop_last,
                         num_replicas=num_replicas, rank=rank, backend=backend, iterations=iterations)
        owner = type(self).__name__
        for name, value in (("budget", budget), ("max_cluster_share", max_cluster_share)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
                raise ValueError(f"{owner}: expected `{name}` in (0, 1], but got {value!r}.")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
                math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"{owner}: expected `temperature` > 0 (e.g. 1.0), but got {temperature!r}.")
        self.budget_size = round(budget * num_samples)
        if self.budget_size < 1:
            raise ValueError(f"{owner}: `budget`={budget} trains round({budget}·{num_samples}) = 0 samples per epoch; "
                             "raise `budget`.")
        if drop_last and self.budget_size < batch_size:
            raise ValueError(f"{owner}: the {self.budget_size} samples of an epoch make no full batch of {batch_size} "
                             "with `drop_last=True`; raise `budget`, lower `batch_size` or set `drop_last=False`.")
        self.budget, self.temperature = float(budget), float(temperature)
        self.max_cluster_share = float(max_cluster_share)
        #: ``[N]`` float32 per-sample losses of the last update (NaN: unseen), or None
        self.sample_losses: Optional[Tensor] = None
        #: ``[C]`` float64 mean loss of each cluster (NaN: none seen), or None
        self.cluster_losses: Optional[Tensor] = None
        #: ``[C]`` float64 cluster weights used to plan the next epochs, or None (uniform over samples)
        self.weights: Optional[Tensor] = None

    # ------------------------------------------------------------------ the losses
    def clusters_changed(self) -> None:
        """New clusters: the cluster losses and weights are recomputed from the stored per-sample losses."""
        self._reweight()

    def update_cluster_losses(self, per_sample_losses: Any) -> None:
        """Record ``[N]`` per-sample losses (NaN for unseen samples); the next planned epochs use them."""
        x = torch.as_tensor(per_sample_losses).detach()
        if x.dim() != 1 or x.shape[0] != self.num_samples or not x.is_floating_point():
            raise ValueError(f"{type(self).__name__}: expected per-sample losses of shape [{self.num_samples}] (float, "
                             f"NaN for unseen samples), but got {tuple(x.shape)} {x.dtype}.")
        if bool(torch.isinf(x).any()):
            raise ValueError(f"{type(self).__name__}: the per-sample losses hold inf; only finite values or NaN "
                             "(unseen) are allowed.")
        self.sample_losses = x.to("cpu", torch.float32).clone()
        self._reweight()

    def _reweight(self) -> None:
        self.invalidate()
        if self.cluster_ids is None or self.sample_losses is None:
            self.cluster_losses = self.weights = None
            return
        sizes = self.cluster_sizes()
        seen = ~torch.isnan(self.sample_losses)
        total = torch.zeros(sizes.numel(), dtype=torch.float64).index_add_(
            0, self.cluster_ids[seen], self.sample_losses[seen].double())
        count = torch.bincount(self.cluster_ids[seen], minlength=sizes.numel()).double()
        self.cluster_losses = torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, math.nan))
        if not bool(seen.any()):
            self.weights = None
            return
        self.weights = cluster_weights(self.cluster_losses, sizes, self.temperature, self.max_cluster_share)

    # ------------------------------------------------------------------ epochs
    def cluster_counts(self) -> Tensor:
        """``[C]`` int64 samples drawn from each cluster in an epoch planned now (uniform: None-weights)."""
        sizes = self.cluster_sizes()
        if self.weights is None:
            raise RuntimeError(f"{type(self).__name__}: no losses recorded yet, so epochs are uniform over samples.")
        return apportion(self.weights, sizes, self.budget_size)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        assert self.cluster_ids is not None
        g = epoch_generator(self.seed, epoch)
        m = self.budget_size
        if self.weights is None:
            chosen = torch.randperm(self.num_samples, generator=g)[:m]
        else:
            counts, sizes = self.cluster_counts(), self.cluster_sizes()
            members = torch.sort(self.cluster_ids, stable=True).indices
            starts = torch.cumsum(sizes, 0) - sizes
            picks = [members[int(a):int(a) + int(s)][torch.randperm(int(s), generator=g)[:int(k)]]
                     for a, s, k in zip(starts, sizes, counts)]
            chosen = torch.cat(picks)
        chosen = chosen[torch.randperm(m, generator=g)]
        return self.cut(chosen.tolist())

    def purity(self, epoch: int) -> float:
        """:func:`~lightning_select.samplers.clustered.cluster_purity` of ``epoch``'s batches (low: diverse)."""
        assert self.cluster_ids is not None
        return cluster_purity(self.epoch_batches(epoch), self.cluster_ids)

    def cluster_mass(self) -> Tensor:
        """``[C]`` float64 expected share of an epoch's samples per cluster (the weights, or the size shares)."""
        if self.weights is not None:
            return self.weights.clone()
        sizes = self.cluster_sizes().double()
        return sizes / sizes.sum()

    @property
    def num_global_batches(self) -> int:
        """Global batches per epoch: those of the ``round(budget · N)`` samples an epoch trains."""
        return self.batches_of(self.budget_size)

    # ------------------------------------------------------------------ state
    def _options(self) -> dict[str, Any]:
        return {**super()._options(), "budget": self.budget,
                "temperature": self.temperature, "max_cluster_share": self.max_cluster_share}

    def _structure_state(self) -> dict[str, Any]:
        assert self.cluster_ids is not None
        clone = lambda t: None if t is None else t.clone()
        return {"cluster_ids": self.cluster_ids.clone(), "sample_losses": clone(self.sample_losses),
                "cluster_losses": clone(self.cluster_losses), "weights": clone(self.weights)}

    def _load_structure(self, state: dict[str, Any]) -> None:
        self.cluster_ids = check_cluster_ids(type(self).__name__, state["cluster_ids"], self.num_samples)
        losses = state.get("sample_losses")
        self.sample_losses = None if losses is None else losses.to(torch.float32).clone()
        self._reweight()
        saved = state.get("weights")
        if (saved is None) != (self.weights is None) or (saved is not None and not torch.equal(saved, self.weights)):
            raise ValueError(f"{type(self).__name__}: the saved cluster weights differ from those recomputed from the "
                             "saved losses; the state was saved with other options or is damaged.")
