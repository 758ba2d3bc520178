"""``RS2Sampler``: Repeated Sampling of Random Subsets without replacement (an epoch-level baseline).

Each epoch trains on a fresh ``⌈fraction · N⌉``-sample chunk of a stream of seeded permutations of
all ``N`` samples, so the whole set is walked once every ``1 / fraction`` epochs and a learning-rate
schedule sized by ``len(loader)`` runs over the reduced step count.

Example::

    >>> s = RS2Sampler(10, fraction=0.5, seed=0)
    >>> s.set_epoch(0); first = list(s)
    >>> s.set_epoch(1); second = list(s)
    >>> len(s), sorted(first + second) == list(range(10))
    (5, True)
"""

from __future__ import annotations

import math
from typing import Any, Iterator

import torch
from torch.utils.data import Sampler

from lightning_select.samplers.epoch import epoch_generator


def subset_size(num_samples: int, fraction: float) -> int:
    """``⌈fraction · N⌉``, robust to float rounding (``0.3 · 10`` is 3, not 4).

    Example::

        >>> subset_size(10, 0.3), subset_size(1149, 0.1), subset_size(7, 1.0)
        (3, 115, 7)
    """
    return max(1, math.ceil(round(fraction * num_samples, 9)))


def check_sampler_options(owner: str, counts: dict[str, Any], fraction: Any, seed: Any, hint: str) -> None:
    """Raise a ``ValueError`` naming the option unless ``counts`` are positive ints, ``fraction`` is in
    ``(0, 1]`` and ``seed`` is an int."""
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{owner}: expected `{name}` to be a positive int, but got {value!r}.")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction <= 1.0:
        raise ValueError(f"{owner}: expected `fraction` in (0, 1], but got {fraction!r}; {hint}.")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"{owner}: expected `seed` to be an int, but got {seed!r}.")


class RS2Sampler(Sampler[int]):
    """Repeated Sampling of Random Subsets (RS2) without replacement: a per-epoch random subset.

    - **What it changes**: which samples an epoch visits: ``m = ⌈fraction · N⌉`` of them, so each
      epoch has ``⌈m / B⌉`` steps (``len(sampler) == m``, and Lightning's
      ``estimated_stepping_batches``, hence any step-based LR schedule, sees the reduced count).
    - **Unbiased**: yes, in the sense that every sample is visited equally often: epochs take
      consecutive chunks of the stream ``perm_0 ‖ perm_1 ‖ …`` of seeded permutations of all ``N``
      samples, so each sample is seen exactly once per ``N`` positions (once per ``1 / fraction``
      epochs). Within one permutation the chunks are disjoint; an epoch that straddles two
      permutations takes the tail of one and the head of the next, so it may (rarely) hold a sample
      twice, as in the reference's reshuffle-when-exhausted loop.
    - **Extra cost**: none (one ``randperm(N)`` per epoch, two at a permutation boundary).
    - **Reference**: Okanovic et al., "Repeated Random Sampling for Minimizing the Time-to-Accuracy
      of Learning" (ICLR 2024), RS2 without replacement; checked against its description (take the
      next ``r · N`` chunk of a permutation, reshuffle when it runs out), not against its code.
    - **Defaults**: no published default ratio; the paper's headline uses ``fraction=0.1``.

    The epoch's subset is a pure function of ``(seed, fraction, N, epoch)``: epoch ``e`` holds the
    stream positions ``[e·m, (e+1)·m)``, and permutation ``k`` is ``randperm(N)`` drawn from
    :func:`~lightning_select.samplers.epoch.epoch_generator` ``(seed, k)``. There is no hidden
    state, so resuming at any epoch is exact; mid-epoch resume needs nothing here either, since
    :class:`~lightning_select.samplers.resumable.ResumableDataLoader` skips the first indices of
    this (index) sampler. With ``fraction=1`` it equals
    :class:`~lightning_select.samplers.epoch.EpochSeededSampler`. Single process only (it is not
    sharded across DDP ranks).

    Args:
        num_samples: ``N``, the size of the training set.
        fraction: share of the training set visited per epoch, in ``(0, 1]``.
        seed: seed of the permutations.

    Example::

        >>> s = RS2Sampler(7, fraction=0.3, seed=1)
        >>> epochs = []
        >>> for e in range(3):
        ...     s.set_epoch(e)
        ...     epochs.append(list(s))
        >>> [len(x) for x in epochs], len(set(epochs[0] + epochs[1])), sorted(set(sum(epochs, []))) == list(range(7))
        ([3, 3, 3], 6, True)
    """

    def __init__(self, num_samples: int, fraction: float, seed: int = 0) -> None:
        check_sampler_options("RS2Sampler", {"num_samples": num_samples}, fraction, seed,
                              "use e.g. 0.1 to visit 10% of the training set per epoch")
        self.num_samples, self.fraction, self.seed, self.epoch = num_samples, float(fraction), seed, 0
        self.subset_size = subset_size(num_samples, self.fraction)

    def set_epoch(self, epoch: int) -> None:
        """Select the subset of ``epoch`` (Lightning calls this at the start of every epoch)."""
        self.epoch = epoch

    def _permutation(self, k: int) -> list[int]:
        return torch.randperm(self.num_samples, generator=epoch_generator(self.seed, k)).tolist()

    def indices(self, epoch: int) -> list[int]:
        """The subset of ``epoch``, in order: stream positions ``[epoch·m, (epoch+1)·m)``."""
        n, m = self.num_samples, self.subset_size
        start, stop = epoch * m, (epoch + 1) * m
        out: list[int] = []
        for k in range(start // n, (stop - 1) // n + 1):
            lo, hi = max(start - k * n, 0), min(stop - k * n, n)
            out.extend(self._permutation(k)[lo:hi])
        return out

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices(self.epoch))

    def __len__(self) -> int:
        return self.subset_size
