"""``InfoBatchSampler``: each epoch, the samples InfoBatch keeps from the scores at the epoch start, shuffled.

The scores (each sample's most recent training loss) are recorded by the
:class:`~lightning_select.policies.infobatch.InfoBatch` callback, which hands them over at every epoch
start (:meth:`InfoBatchSampler.set_scores`) and weights the kept well-learned samples. The rule is
:func:`~lightning_select.rules.infobatch.infobatch_plan`.

Example::

    >>> import torch
    >>> s = InfoBatchSampler(6, prune=0.5, delta=0.5, num_epochs=4, seed=0)
    >>> len(s)  # no score yet: every sample is kept
    6
    >>> s.set_scores(torch.tensor([0.1, 0.2, 0.3, 0.4, 5.0, 6.0]), epoch=1)
    >>> s.set_epoch(1); len(s), len(list(s)), s.is_pruning(1), s.is_pruning(2)
    (4, 4, True, False)
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Optional

import torch
from torch import Tensor

from lightning_select.rules.infobatch import InfoBatchPlan, full_plan, infobatch_plan, kept_well_learned
from lightning_select.rules.infobatch import well_learned_mask
from lightning_select.samplers.epoch import SelfShardingSampler, check_replicas, epoch_generator, shard


def check_infobatch_options(owner: str, prune: Any, delta: Any, prune_name: str = "prune",
                            delta_name: str = "delta") -> None:
    """Raise a ``ValueError`` naming the option unless ``prune`` is in ``[0, 1)`` and ``delta`` in ``(0, 1]``."""
    if isinstance(prune, bool) or not isinstance(prune, (int, float)) or not 0.0 <= prune < 1.0:
        raise ValueError(f"{owner}: expected `{prune_name}` (InfoBatch's pruning ratio r) in [0, 1), but got "
                         f"{prune!r}; the paper uses 0.5 (prune half of the well-learned samples), 0 prunes nothing.")
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0.0 < delta <= 1.0:
        raise ValueError(f"{owner}: expected `{delta_name}` (InfoBatch's δ, the share of epochs that prune) in "
                         f"(0, 1], but got {delta!r}; the paper uses 0.875 (the last 12.5% of the epochs train on "
                         "the full data), 1 prunes in every epoch.")


class InfoBatchSampler(SelfShardingSampler):
    """InfoBatch's per-epoch subset: the well-learned samples thinned by ``prune``, everything else, shuffled.

    - **What it changes**: which samples an epoch visits. In a pruning epoch (``epoch < δ · E``) the
      samples scoring below the mean of the seen scores are *well-learned*; exactly
      ``k = max(1, round((1 − r) · n_low))`` of those ``n_low`` are kept, uniformly at random, and every
      other sample is kept (:func:`~lightning_select.rules.infobatch.infobatch_plan`). The kept
      well-learned samples carry the weight ``n_low / k`` (:meth:`weights`), which the
      :class:`~lightning_select.policies.infobatch.InfoBatch` callback applies to their losses.
      Samples without a score are always kept, so epoch 0 (no scores yet) trains everything. The
      *anneal* epochs ``epoch ≥ δ · E`` (the last ``⌊(1 − δ) · E⌋``) train every sample with weight 1.
    - **Pure**: the plan of epoch ``e`` is a pure function of ``(seed, e, the scores handed over)``:
      the choice and then the order (a ``randperm`` of the kept samples in index order) are drawn from
      :func:`~lightning_select.samplers.epoch.epoch_generator` ``(seed, e)``. Nothing is drawn from a
      global RNG, so a resumed run that hands over the same scores gets the same plan;
      :class:`~lightning_select.samplers.resumable.ResumableDataLoader` then skips the batches already
      trained (mid-epoch resume), and :meth:`state_dict` holds the scores of the current plan.
    - **Epoch lengths**: ``len()`` is this rank's share of the current epoch's plan. The count protocol of
      :func:`~lightning_select.core.schedule.stepping_batches` is :meth:`samples_in_epoch`: exact for
      the epochs already planned (their sizes are recorded) and for the anneal epochs (``N``); for a
      pruning epoch not yet planned it is the size the latest scores would give (the fixed-size rule
      makes the count a deterministic function of the scores, but future scores are unknown, so it
      is an estimate that becomes exact when the epoch starts).

    **DDP.** With ``num_replicas=W`` and ``rank=r`` the epoch's order (the same on every rank, since
    every rank holds the same scores) is sharded as ``DistributedSampler`` shards a dataset
    (:func:`~lightning_select.samplers.epoch.shard`): padded by wrapping around to a multiple of ``W``
    (or cut with ``drop_last``), rank ``r`` takes positions ``r::W``, so every rank gets
    ``⌈m / W⌉`` samples and the same number of batches. It is a
    :class:`~lightning_select.samplers.epoch.SelfShardingSampler`, so Lightning leaves it in place.

    Args:
        num_samples: ``N``, the size of the training set.
        prune: ``r`` in ``[0, 1)``, the share of the well-learned samples pruned (paper: 0.5).
        delta: ``δ`` in ``(0, 1]``: epochs ``e < δ · E`` prune, the rest anneal (paper: 0.875).
        num_epochs: ``E``, the run's epochs (``trainer.max_epochs``); None: every epoch prunes (no anneal).
        seed: seed of the choices and orders.
        num_replicas: number of DDP ranks (``trainer.world_size``).
        rank: this process's rank (``trainer.global_rank``).
        drop_last: under DDP, cut the epoch's tail to a multiple of ``num_replicas`` instead of padding.

    Example::

        >>> import torch
        >>> s = InfoBatchSampler(8, prune=0.5, delta=0.75, num_epochs=4, seed=1)
        >>> s.pruning_epochs, [s.is_pruning(e) for e in range(4)]
        (3, [True, True, True, False])
        >>> s.set_scores(torch.tensor([0.1, 0.1, 0.2, 0.2, 3.0, 3.0, float("nan"), 0.3]), epoch=1)
        >>> s.set_epoch(1)
        >>> plan = s.plan(1)
        >>> plan.well_learned, plan.kept, sorted(s) == plan.keep.nonzero().flatten().tolist()
        (5, 6, True)
        >>> s.weights(torch.tensor([4, 6])).tolist(), len(s), s.samples_in_epoch(3)
        ([1.0, 1.0], 6, 8)
    """

    def __init__(self, num_samples: int, prune: float = 0.5, delta: float = 0.875, num_epochs: Optional[int] = None,
                 seed: int = 0, num_replicas: int = 1, rank: int = 0, drop_last: bool = False) -> None:
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"InfoBatchSampler: expected `num_samples` to be a positive int, but got {num_samples!r}.")
        check_infobatch_options("InfoBatchSampler", prune, delta)
        if num_epochs is not None and (isinstance(num_epochs, bool) or not isinstance(num_epochs, int)
                                       or num_epochs < 1):
            raise ValueError(f"InfoBatchSampler: expected `num_epochs` to be a positive int (trainer.max_epochs) or "
                             f"None (no anneal), but got {num_epochs!r}.")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"InfoBatchSampler: expected `seed` to be an int, but got {seed!r}.")
        check_replicas("InfoBatchSampler", num_replicas, rank)
        if drop_last and num_samples < num_replicas:
            raise ValueError(f"InfoBatchSampler: `drop_last=True` leaves no sample per rank ({num_samples} samples, "
                             f"{num_replicas} ranks); set `drop_last=False`.")
        self.num_samples, self.prune, self.delta, self.num_epochs = num_samples, float(prune), float(delta), num_epochs
        self.seed, self.epoch = seed, 0
        self.num_replicas, self.rank, self.drop_last = num_replicas, rank, bool(drop_last)
        #: ``[N]`` float32: the scores the current plan is computed from (NaN = not seen), and their epoch.
        self.scores = torch.full((num_samples,), float("nan"))
        self.scores_epoch: Optional[int] = None
        #: epoch → global size of every epoch planned from its own scores (``state_dict`` stores −1 for the others).
        self.kept_sizes: dict[int, int] = {}
        self._cache: Optional[tuple[int, InfoBatchPlan, list[int]]] = None
        self._expected: Optional[int] = None  # expected_kept() of the current scores

    # ------------------------------------------------------------------ epochs
    @property
    def pruning_epochs(self) -> Optional[int]:
        """``⌈δ · E⌉``, the number of epochs that prune (None without ``num_epochs``: all of them)."""
        if self.num_epochs is None:
            return None
        return math.ceil(round(self.delta * self.num_epochs, 9))

    def is_pruning(self, epoch: int) -> bool:
        """Whether ``epoch`` prunes (``epoch < δ · E``) or anneals on the full data."""
        return self.pruning_epochs is None or epoch < self.pruning_epochs

    def set_epoch(self, epoch: int) -> None:
        """Select the plan of ``epoch`` (Lightning calls this at the start of every epoch)."""
        self.epoch = epoch

    def set_scores(self, scores: Tensor, epoch: int) -> None:
        """Hand over the scores at the start of ``epoch`` (``[N]``, NaN for samples not yet seen)."""
        scores = torch.as_tensor(scores).detach().to("cpu", torch.float32).reshape(-1)
        if scores.numel() != self.num_samples:
            raise ValueError(f"InfoBatchSampler: expected {self.num_samples} scores, one per training sample, but got "
                             f"{scores.numel()}.")
        self.scores, self.scores_epoch, self._cache, self._expected = scores.clone(), int(epoch), None, None

    def plan(self, epoch: int) -> InfoBatchPlan:
        """The kept samples and weights of ``epoch``, from the scores handed over last."""
        return self._planned(epoch)[0]

    def _planned(self, epoch: int) -> tuple[InfoBatchPlan, list[int]]:
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1], self._cache[2]
        g = epoch_generator(self.seed, epoch)
        if self.is_pruning(epoch) and bool((~torch.isnan(self.scores)).any()):
            plan = infobatch_plan(self.scores, self.prune, g)
        else:
            plan = full_plan(self.num_samples)
        kept = plan.keep.nonzero().flatten()
        order = kept[torch.randperm(kept.numel(), generator=g)].tolist()
        if epoch == self.scores_epoch:
            self.kept_sizes[epoch] = len(order)
        self._cache = (epoch, plan, order)
        return plan, order

    def indices(self, epoch: int) -> list[int]:
        """The samples of ``epoch`` in training order, over all ranks."""
        return self._planned(epoch)[1]

    def rank_indices(self, epoch: int) -> list[int]:
        """This rank's share of :meth:`indices` (the whole list in one process)."""
        return shard(self.indices(epoch), self.num_replicas, self.rank, self.drop_last)

    def weights(self, indices: Tensor) -> Tensor:
        """``[len(indices)]`` float32 loss weights of these samples in the current epoch's plan (0 = pruned)."""
        return self.plan(self.epoch).weights[torch.as_tensor(indices).detach().cpu().long()]

    def __iter__(self) -> Iterator[int]:
        return iter(self.rank_indices(self.epoch))

    def _per_rank(self, m: int) -> int:
        w = self.num_replicas
        return m // w if self.drop_last else -(-m // w)

    def __len__(self) -> int:
        """Samples per rank of the current epoch: ``m``, ``⌈m / W⌉`` under DDP, ``⌊m / W⌋`` with ``drop_last``."""
        return self._per_rank(len(self.indices(self.epoch)))

    # ------------------------------------------------------------------ counts (core.schedule.stepping_batches)
    def expected_kept(self) -> int:
        """The size of a pruning epoch planned from the current scores: ``N − n_low + k`` (no draw needed)."""
        if self._expected is None:
            n_low = int(well_learned_mask(self.scores)[0].sum())  # 0 without any score
            self._expected = self.num_samples - n_low + kept_well_learned(n_low, self.prune)
        return self._expected

    def samples_in_epoch(self, epoch: int) -> int:
        """This rank's samples in ``epoch``: exact for anneal epochs and epochs already planned, else the
        size the current scores would give (an estimate until the epoch starts)."""
        if not self.is_pruning(epoch):
            return self._per_rank(self.num_samples)
        if epoch in self.kept_sizes:
            return self._per_rank(self.kept_sizes[epoch])
        return self._per_rank(self.expected_kept())

    def is_exact(self, epoch: int) -> bool:
        """Whether :meth:`samples_in_epoch` of ``epoch`` is exact (anneal, or already planned)."""
        return not self.is_pruning(epoch) or epoch in self.kept_sizes

    # ------------------------------------------------------------------ state
    def _options(self) -> dict[str, Any]:
        return {"num_samples": self.num_samples, "prune": self.prune, "delta": self.delta, "seed": self.seed,
                "num_replicas": self.num_replicas, "drop_last": self.drop_last}

    def state_dict(self) -> dict[str, Any]:
        """The scores of the current plan, their epoch, the recorded epoch sizes and the options."""
        last = max(self.kept_sizes, default=-1)
        sizes = torch.full((last + 1,), -1, dtype=torch.long)
        for epoch, size in self.kept_sizes.items():
            sizes[epoch] = size
        return {"scores": self.scores.clone(), "scores_epoch": -1 if self.scores_epoch is None else self.scores_epoch,
                "kept_sizes": sizes, "num_epochs": self.num_epochs, **self._options()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the scores and sizes; refuses a state saved with other options (other plans).

        ``num_epochs`` may differ (a resumed run that extends ``max_epochs``): the epochs already trained keep
        their plans, and the anneal moves to ``δ`` of the new count."""
        saved = {k: state.get(k) for k in self._options()}
        if saved != self._options():
            raise ValueError(f"InfoBatchSampler: the saved state belongs to a sampler with {saved}, but this one has "
                             f"{self._options()}; resume with the same data, prune, delta, seed and number of "
                             "processes.")
        self.scores = state["scores"].detach().to("cpu", torch.float32).clone()
        epoch = int(state["scores_epoch"])
        self.scores_epoch = None if epoch < 0 else epoch
        self.kept_sizes = {e: int(m) for e, m in enumerate(state["kept_sizes"].tolist()) if m >= 0}
        self._cache = self._expected = None
