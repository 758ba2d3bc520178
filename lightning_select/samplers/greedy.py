"""The greedy batch fill shared by the duplicate-free and the neighbour-exclusion batch samplers.

Example::

    >>> greedy_batches([0, 1, 2, 3], 2, [{"a"}, {"a"}, {"b"}, {"c"}])
    [[0, 2], [1, 3]]
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Sequence
from collections.abc import Set as AbstractSet
from typing import Optional

Marks = Sequence[AbstractSet[Hashable]]


def greedy_batches(order: Sequence[int], batch_size: int, blocked: Marks, marks: Optional[Marks] = None,
                   drop_last: bool = False, num_batches: Optional[int] = None) -> list[list[int]]:
    """Fill batches greedily in ``order``, deferring a sample that collides with its batch.

    A batch takes the remaining samples in order; sample ``i`` fits when none of ``blocked[i]`` is
    among the marks of the samples already in the batch, and taking it adds ``marks[i]`` (default:
    ``blocked[i]``, i.e. samples that share a key collide). A deferred sample is tried again, first,
    for the next batch. A batch closes at ``batch_size`` samples or when no remaining sample fits;
    with ``drop_last`` batches smaller than ``batch_size`` are dropped (their samples skipped). This
    is first-fit: every sample lands in the earliest batch that has room and no collision.

    ``num_batches`` fixes the number of batches (a loader's length must be known before the epoch).
    At most that many are filled as above; each sample that none of them could take without a
    collision is then put, in order, into the batch with room where it collides with the fewest
    samples (the earliest on ties), and swapped with a sample ``y`` of another batch when that leaves
    neither of the two next to a collision (the first such ``y`` in batch and position order). With
    ``drop_last`` the batches still short are dropped after that.

    ``NoDuplicatesBatchSampler`` uses ``blocked = marks = keys``; the neighbour-exclusion sampler
    uses ``marks[i] = {i}``, ``blocked[i] = neighbours of i`` and a fixed ``num_batches``.

    Example::

        >>> neighbours = [{1}, {0}, set()]  # samples 0 and 1 must not share a batch
        >>> greedy_batches([0, 1, 2], 3, neighbours, marks=[{0}, {1}, {2}])
        [[0, 2], [1]]
        >>> greedy_batches([0, 1, 2], 3, neighbours, marks=[{0}, {1}, {2}], num_batches=1)
        [[0, 2, 1]]
        >>> clique = [{1, 2, 3}, {0, 2, 3}, {0, 1, 3}, {0, 1, 2}]  # two batches of 3 for a clique of 4
        >>> greedy_batches([0, 1, 2, 3], 3, clique, marks=[{0}, {1}, {2}, {3}], num_batches=2)
        [[0, 2], [1, 3]]
    """
    marks = blocked if marks is None else marks
    remaining = dict.fromkeys(order)  # ordered set
    batches: list[list[int]] = []
    while remaining and (num_batches is None or len(batches) < num_batches):
        batch: list[int] = []
        taken: set[Hashable] = set()
        for i in remaining:
            if taken.isdisjoint(blocked[i]):
                batch.append(i)
                taken.update(marks[i])
                if len(batch) == batch_size:
                    break
        for i in batch:
            del remaining[i]
        if num_batches is not None or len(batch) == batch_size or not drop_last:
            batches.append(batch)
    if remaining and num_batches is not None:
        _place_collided(list(remaining), batches, batch_size, blocked, marks)
    if num_batches is not None and drop_last:
        batches = [b for b in batches if len(b) == batch_size]
    return batches


def _place_collided(leftover: list[int], batches: list[list[int]], batch_size: int, blocked: Marks,
                    marks: Marks) -> None:
    """Put each leftover sample where it collides least, then try one repairing swap (see above)."""
    counts = [Counter(k for i in batch for k in marks[i]) for batch in batches]

    def collisions(i: int, b: int, without: Optional[int] = None) -> int:
        drop = marks[without] if without is not None else ()
        return sum(1 for k in blocked[i] if counts[b][k] - (k in drop) > 0)

    def move(i: int, src: Optional[int], dst: int, at: Optional[int] = None) -> None:
        if src is not None:
            batches[src].remove(i)
            counts[src].subtract(marks[i])
        batches[dst].insert(len(batches[dst]) if at is None else at, i)
        counts[dst].update(marks[i])

    for x in leftover:
        room = [b for b in range(len(batches)) if len(batches[b]) < batch_size]
        if not room:
            break
        b = min(room, key=lambda c: (collisions(x, c), c))
        move(x, None, b)
        if collisions(x, b, without=x) == 0:
            continue
        swapped = False
        for other in range(len(batches)):
            if other == b:
                continue
            for pos, y in enumerate(batches[other]):
                if collisions(x, other, without=y) == 0 and collisions(y, b, without=x) == 0:
                    pos_x = batches[b].index(x)
                    move(x, b, other, at=pos)
                    batches[other].remove(y)
                    counts[other].subtract(marks[y])
                    move(y, None, b, at=pos_x)
                    swapped = True
                    break
            if swapped:
                break
