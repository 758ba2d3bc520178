"""``stepping_batches``: the true number of optimizer steps of a fit whose epochs differ in length.

Lightning's ``trainer.estimated_stepping_batches`` is ``⌈L / accumulate⌉ · max_epochs`` (capped by
``max_steps``), with ``L = trainer.num_training_batches``: ``len(train_dataloader)`` measured once,
when the loader is set up for epoch 0 (``FitLoop.setup_data``), with ``limit_train_batches``
applied. A sampler whose epochs have different lengths, such as
:class:`~lightning_select.samplers.hard_batches.HardBatchSampler` (``b`` batches in epoch 0, then
``k = ⌊δ · b⌋``), makes that estimate wrong, and a step-based learning-rate schedule sized from it
(cosine, OneCycle) never reaches its end. :func:`stepping_batches` counts the steps epoch by epoch
instead, from the sampler's own ``batches_in_epoch(epoch)``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Optional, Union

if TYPE_CHECKING:
    import lightning.pytorch as pl


def epoch_length_source(loader: Any) -> Optional[Any]:
    """The loader's batch sampler or sampler that reports ``batches_in_epoch(epoch)``, if any.

    Example::

        >>> from torch.utils.data import DataLoader
        >>> epoch_length_source(DataLoader(range(4), batch_size=2)) is None
        True
    """
    for source in (getattr(loader, "batch_sampler", None), getattr(loader, "sampler", None)):
        if callable(getattr(source, "batches_in_epoch", None)):
            return source
    return None


def steps_of_epochs(batches: list[int], limit: Union[int, float], accumulate: int,
                    max_steps: int = -1) -> int:
    """Optimizer steps of epochs of ``batches[e]`` batches each, as Lightning's fit loop takes them.

    Each epoch is cut to ``limit`` batches (``trainer.num_training_batches``: Lightning keeps that cap,
    measured on epoch 0, for every epoch), and steps once per ``accumulate`` batches and once more on
    the last batch of the epoch (``⌈n / accumulate⌉``); the total is capped by ``max_steps`` (−1: no cap).

    Example::

        >>> steps_of_epochs([18, 9, 9], limit=18, accumulate=1)
        36
        >>> steps_of_epochs([18, 9, 9], limit=12, accumulate=4), steps_of_epochs([18, 9, 9], 18, 1, max_steps=20)
        (9, 20)
    """
    total = sum(math.ceil(min(n, limit) / accumulate) for n in batches)
    return min(total, max_steps) if max_steps != -1 else total


def stepping_batches(trainer: "pl.Trainer") -> Union[int, float]:
    """The number of optimizer steps ``trainer.fit`` will take: ``estimated_stepping_batches``, made exact
    for a training loader whose sampler reports per-epoch lengths.

    Call it where you would call ``trainer.estimated_stepping_batches``, e.g. in
    ``configure_optimizers`` to size a step-based schedule. When the training loader's batch sampler
    (or sampler) has ``batches_in_epoch(epoch)`` (per rank; the same on every rank), the steps are
    counted epoch by epoch with :func:`steps_of_epochs` (Lightning's own per-epoch cap,
    ``accumulate_grad_batches`` and ``max_steps`` applied); otherwise, and for unbounded runs
    (``max_epochs=-1``) or loaders without a length, Lightning's value is returned unchanged. The
    count covers the whole run from epoch 0, like Lightning's, so a resumed run sizes its schedule
    the same way as the run it resumes.

    With :class:`~lightning_select.samplers.hard_batches.HardBatchSampler` (``b`` batches, then
    ``k``, ``E`` epochs, no limits) it is ``b + (E − 1) · k``, where Lightning says ``E · b``.

    Example::

        >>> class Sampler:
        ...     def batches_in_epoch(self, epoch): return 18 if epoch == 0 else 9
        >>> class Loader:
        ...     batch_sampler = Sampler()
        >>> class Trainer:  # what Lightning reports for 3 epochs of this loader
        ...     max_epochs, max_steps, accumulate_grad_batches, num_training_batches = 3, -1, 1, 18
        ...     estimated_stepping_batches, train_dataloader = 54, Loader()
        >>> stepping_batches(Trainer())
        36
    """
    estimate = trainer.estimated_stepping_batches  # also sets the training loader up if it is not yet
    source = epoch_length_source(trainer.train_dataloader)
    limit = trainer.num_training_batches
    max_epochs = trainer.max_epochs
    if source is None or max_epochs is None or max_epochs == -1 or not math.isfinite(estimate) \
            or not math.isfinite(limit):
        return estimate
    batches = [int(source.batches_in_epoch(e)) for e in range(max(int(max_epochs), 1))]
    return steps_of_epochs(batches, limit, int(trainer.accumulate_grad_batches), int(trainer.max_steps))
