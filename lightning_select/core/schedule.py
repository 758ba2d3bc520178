"""``stepping_batches``: the true number of optimizer steps of a fit whose epochs differ in length.

Lightning's ``trainer.estimated_stepping_batches`` is ``⌈L / accumulate⌉ · max_epochs`` (capped by
``max_steps``), with ``L = trainer.num_training_batches``: ``len(train_dataloader)`` measured once,
when the loader is set up for epoch 0 (``FitLoop.setup_data``), with ``limit_train_batches``
applied. A sampler whose epochs have different lengths, such as
:class:`~lightning_select.samplers.hard_batches.HardBatchSampler` (``b`` batches in epoch 0, then
``k = ⌊δ · b⌋``), makes that estimate wrong, and a step-based learning-rate schedule sized from it
(cosine, OneCycle) never reaches its end. :func:`stepping_batches` counts the steps epoch by epoch
instead, from the sampler's own ``batches_in_epoch(epoch)`` (an index sampler reports
``samples_in_epoch(epoch)`` instead, turned into batches with the loader's ``batch_size`` and
``drop_last``).

When the future epochs' lengths are only known as they start
(:class:`~lightning_select.samplers.infobatch.InfoBatchSampler`: a pruning epoch's length depends on
the scores at its start), :func:`resize_cosine_schedules` re-sizes a step-interval
``CosineAnnealingLR`` as the count is refined, so that it still reaches its end at the last step.
:func:`sync_val_check` keeps Lightning's validation cadence in step with epochs shorter than epoch 0.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Optional, Union

if TYPE_CHECKING:
    import lightning.pytorch as pl


class SampleCounts:
    """``batches_in_epoch(epoch)`` of an index sampler that reports ``samples_in_epoch(epoch)`` (per rank),
    batched by a loader's ``batch_size``: ``⌈n / B⌉``, or ``⌊n / B⌋`` with ``drop_last``.

    Example::

        >>> class Sampler:
        ...     def samples_in_epoch(self, epoch): return 100 if epoch == 0 else 50
        >>> counts = SampleCounts(Sampler(), batch_size=32, drop_last=False)
        >>> counts.batches_in_epoch(0), counts.batches_in_epoch(1)
        (4, 2)
    """

    def __init__(self, sampler: Any, batch_size: int, drop_last: bool) -> None:
        self.sampler, self.batch_size, self.drop_last = sampler, int(batch_size), bool(drop_last)

    def batches_in_epoch(self, epoch: int) -> int:
        n = int(self.sampler.samples_in_epoch(epoch))
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)


def epoch_length_source(loader: Any) -> Optional[Any]:
    """What reports the loader's ``batches_in_epoch(epoch)``, if anything: its batch sampler or sampler
    when one has that method, else a :class:`SampleCounts` over a sampler with ``samples_in_epoch(epoch)``.

    Example::

        >>> from torch.utils.data import DataLoader
        >>> epoch_length_source(DataLoader(range(4), batch_size=2)) is None
        True
    """
    for source in (getattr(loader, "batch_sampler", None), getattr(loader, "sampler", None)):
        if callable(getattr(source, "batches_in_epoch", None)):
            return source
    sampler, batch_size = getattr(loader, "sampler", None), getattr(loader, "batch_size", None)
    if callable(getattr(sampler, "samples_in_epoch", None)) and batch_size:
        return SampleCounts(sampler, batch_size, getattr(loader, "drop_last", False))
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


def sync_val_check(trainer: "pl.Trainer", batches: int) -> None:
    """Validate at the end of an epoch of ``batches`` batches, as Lightning does for epoch 0.

    Lightning sizes ``trainer.val_check_batch`` once, from epoch 0's length, so with a fractional
    ``val_check_interval`` (default 1.0) an epoch shorter than epoch 0 would never reach it and would not
    validate. Call this at the start of each epoch with the epoch's own length. Batch-count, time-based
    and cross-epoch validation (``check_val_every_n_epoch=None``) are left as the user set them.
    """
    interval, current = trainer.val_check_interval, trainer.val_check_batch
    if not isinstance(interval, float) or trainer.check_val_every_n_epoch is None or current is None \
            or not math.isfinite(current):
        return
    length = min(int(batches), trainer.num_training_batches)
    trainer.val_check_batch = max(1, int(length * interval))


def resize_cosine_schedules(trainer: "pl.Trainer", planned: int, total: int) -> list[str]:
    """Re-size the step-interval ``CosineAnnealingLR`` schedulers sized for ``planned`` steps to ``total``.

    ``CosineAnnealingLR`` steps by the ratio ``(1 + cos(π t / T)) / (1 + cos(π (t − 1) / T))`` applied to
    the current learning rate, so setting ``T_max = total`` mid-run continues from the current value
    without a jump, along a cosine that reaches ``eta_min`` exactly at step ``total``. Returns the names
    of the other step-interval schedulers sized for ``planned`` steps (``T_max`` or ``total_steps``), which
    cannot be re-sized this way (OneCycleLR precomputes its phases) and will not end at the last step.

    Example::

        >>> import torch
        >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        >>> cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
        >>> class Config:
        ...     scheduler, interval = cosine, "step"
        >>> class Trainer:
        ...     lr_scheduler_configs = [Config()]
        >>> for _ in range(4): opt.step(); cosine.step()
        >>> resize_cosine_schedules(Trainer(), planned=10, total=7), cosine.T_max
        ([], 7)
        >>> for _ in range(3): opt.step(); cosine.step()
        >>> opt.param_groups[0]["lr"]
        0.0
    """
    if planned == total:
        return []
    from torch.optim.lr_scheduler import CosineAnnealingLR

    others: list[str] = []
    for config in trainer.lr_scheduler_configs:
        if config.interval != "step":
            continue
        scheduler = config.scheduler
        if isinstance(scheduler, CosineAnnealingLR) and scheduler.T_max == planned:
            scheduler.T_max = int(total)
        elif (getattr(scheduler, "total_steps", None) or getattr(scheduler, "T_max", None)) == planned:
            others.append(type(scheduler).__name__)
    return others


def load_pending_loader_state(trainer: "pl.Trainer") -> None:
    """Give the training loader the mid-epoch state of the checkpoint being resumed, where Lightning dropped it.

    Lightning loads a training loader's ``state_dict`` (e.g. the batches a
    :class:`~lightning_select.samplers.resumable.ResumableDataLoader` had served) only when it sets the
    loader up (``FitLoop.setup_data``). When ``configure_optimizers`` asks for
    ``trainer.estimated_stepping_batches`` (or :func:`stepping_batches`) to size a schedule, the loader is
    set up there, before the checkpoint's loop state is restored, so that state is never loaded and a
    mid-epoch resume trains the interrupted epoch again from its start. Called at ``on_train_start``
    (before the first batch is drawn: the loader's iterator starts lazily), this loads the pending state;
    it does nothing when there is none (a fresh run, an end-of-epoch checkpoint, or Lightning loaded it).
    """
    loop = getattr(trainer, "fit_loop", None)
    load = getattr(loop, "_load_combined_loader_states", None)
    if not callable(load) or not getattr(loop, "restarting", False) or not getattr(loop, "_combined_loader_states_to_load", None):
        return
    load()
    fetcher = getattr(loop, "_data_fetcher", None)
    if fetcher is not None:  # its iterator was made at set-up, before the state: make it again, as setup_data does
        iter(fetcher)
