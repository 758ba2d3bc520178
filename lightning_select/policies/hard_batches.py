"""``HardBatches``: record each fixed batch's loss for :class:`~lightning_select.samplers.hard_batches.HardBatchSampler`.

"Can we learn better with hard samples?" (2023): batches of fixed membership; after one full epoch,
each epoch trains only the ``⌊δ · b⌋`` batches with the highest recorded loss and updates their
losses. The choice of batches is the sampler's; this observer records the losses it ranks by, and
keeps Lightning's validation cadence in step with the shorter later epochs.
"""

from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_select.core import SelectionError, SelectionPolicy, StepContext
from lightning_select.core.distributed import raise_together
from lightning_select.core.engine import override
from lightning_select.core.schedule import stepping_batches, sync_val_check
from lightning_select.samplers.hard_batches import HardBatchSampler
from lightning_select.samplers.resumable import carry_state


def distinct_sample_mean(index: Tensor, loss: Tensor) -> Tensor:
    """The mean over distinct samples of ``loss`` (float64): a sample with several rows counts once, with the
    mean of its rows (a sample trained twice in one step, by padding under DDP).

    Example::

        >>> distinct_sample_mean(torch.tensor([3, 1, 3]), torch.tensor([1.0, 4.0, 3.0]))
        tensor(3., dtype=torch.float64)
    """
    uniq, inverse = torch.unique(index, return_inverse=True)
    sums = torch.zeros(uniq.numel(), dtype=torch.float64).index_add_(0, inverse, loss.double())
    return (sums / torch.bincount(inverse, minlength=uniq.numel())).mean()


class HardBatches(SelectionPolicy):
    """Record the mean training loss of every fixed batch, so later epochs train only the hardest ones.

    - **What it changes**: nothing in the step (an observer). Which batches an epoch trains on is
      decided by the training loader's
      :class:`~lightning_select.samplers.hard_batches.HardBatchSampler` from the losses recorded here.
    - **Unbiased**: no. After the first epoch only the ``⌊δ · b⌋`` batches with the highest recorded
      loss are trained, so the expected gradient over-weights hard (and mislabelled) samples.
    - **Extra cost**: none beyond the engine's one per-step gather of the trained rows
      (``ctx.gathered``, shared with every other observer); ``4 · b`` bytes of losses in the sampler;
      under DDP one boolean all-reduce at ``on_train_start`` (the ranks' joint sampler check).
    - **Reference**: "Can we learn better with hard samples?" (2023), see
      ``shared/reference/selection-methods.md`` ("Hard batches"); checked against its description,
      not against code.
    - **Defaults**: ``δ = 0.5`` (the sampler's ``fraction``); a batch's recorded loss is the
      unweighted mean of its trained samples' losses in the step that last trained it (a sample
      trained twice in that step, by padding under DDP, counts once).

    It finds the sampler as ``trainer.train_dataloader.batch_sampler`` (a :class:`SelectionError`
    if that is not a :class:`HardBatchSampler`, e.g. ``NoisyDigitsDataModule(sampler="hard_batches")``),
    maps the step's trained sample indices to their batch through ``sampler.batch_of_index`` and
    calls ``sampler.update(batch_id, mean loss)``. Its :meth:`state_dict` is the sampler's
    (the recorded losses), so a resumed run, whose datamodule builds a fresh sampler, gets them back
    at ``on_train_start`` and trains exactly the same batches.

    **DDP.** A batch is a *global* batch: one optimizer step of all ranks together, each rank
    training its slice (see :class:`HardBatchSampler`). The observer reads ``ctx.gathered``, every
    rank's trained rows of the step, checks that they all belong to one global batch, and records
    their mean loss, so every rank records the same value (the gathered rows are the same on every
    rank), holds the same losses and picks the same hard batches. At ``on_train_start`` every rank
    checks together that the sampler was built for this world size and rank.

    **Epoch lengths.** Lightning measures ``len(train_dataloader)`` once, in epoch 0 (``b``
    batches), so later epochs of ``k = ⌊δ · b⌋`` batches confuse it twice. (1)
    ``estimated_stepping_batches`` is ``(E − 1) · (b − k)`` too large: size step-based schedules
    with :func:`~lightning_select.core.schedule.stepping_batches` (``NoisyLabelClassifier`` does);
    this callback warns at ``on_train_start`` when a step-interval scheduler's ``T_max`` or
    ``total_steps`` equals Lightning's estimate instead. (2) With a fractional
    ``val_check_interval`` (default 1.0) Lightning validates every ``b`` batches, which a ``k``-batch
    epoch never reaches, so it would validate after epoch 0 only: at the start of every epoch this
    callback sets ``trainer.val_check_batch`` from the epoch's own length, as Lightning does for epoch 0.

    Example::

        >>> from lightning_select.data.noisy_labels import NoisyDigitsDataModule
        >>> policy = HardBatches()
        >>> data = NoisyDigitsDataModule(sampler="hard_batches", hard_fraction=0.5)
        >>> # Trainer(callbacks=[policy]).fit(model, data)  ->  policy.sampler.losses
    """

    order = 900
    needs_global_rows = True

    def __init__(self) -> None:
        self._sampler: Optional[HardBatchSampler] = None
        self._pending: Optional[dict[str, Any]] = None

    @property
    def sampler(self) -> Optional[HardBatchSampler]:
        """The training loader's sampler (None before ``on_train_start``)."""
        return self._sampler

    def _find(self, trainer: "pl.Trainer") -> HardBatchSampler:
        loader = trainer.train_dataloader
        sampler = getattr(loader, "batch_sampler", None)
        if not isinstance(sampler, HardBatchSampler):
            raise SelectionError(
                f"HardBatches needs the training DataLoader's batch_sampler to be a HardBatchSampler, but got "
                f"{type(sampler).__name__} (loader {type(loader).__name__}). Build the loader with "
                "`batch_sampler=HardBatchSampler(...)`, e.g. NoisyDigitsDataModule(sampler='hard_batches').")
        return sampler

    def _attach(self, trainer: "pl.Trainer") -> HardBatchSampler:
        sampler = self._find(trainer)
        if sampler is not self._sampler:
            carry_state(sampler, self._sampler, self._pending)
            self._sampler, self._pending = sampler, None
        return sampler

    @staticmethod
    def _sync_val_check(trainer: "pl.Trainer", sampler: HardBatchSampler) -> None:
        """Validate at the end of this epoch's own length (Lightning sized ``val_check_batch`` from epoch 0)."""
        sync_val_check(trainer, sampler.batches_in_epoch(trainer.current_epoch))

    @staticmethod
    def _warn_if_schedule_oversized(trainer: "pl.Trainer") -> None:
        plain, true = trainer.estimated_stepping_batches, stepping_batches(trainer)
        if plain == true:
            return
        for config in trainer.lr_scheduler_configs:
            total = getattr(config.scheduler, "total_steps", None) or getattr(config.scheduler, "T_max", None)
            if config.interval == "step" and total == plain:
                rank_zero_warn(
                    f"HardBatches: the step-interval scheduler {type(config.scheduler).__name__} is sized for "
                    f"{plain} steps (trainer.estimated_stepping_batches, which counts every epoch as long as epoch 0), "
                    f"but this run takes {true} optimizer steps, so it will not reach its end. Size it with "
                    "lightning_select.core.schedule.stepping_batches(trainer).")

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        problem: Optional[str] = None
        try:
            sampler = self._attach(trainer)
        except SelectionError as err:
            problem = str(err)
        else:
            if (sampler.num_replicas, sampler.rank) != (trainer.world_size, trainer.global_rank):
                problem = (f"its HardBatchSampler was built for num_replicas={sampler.num_replicas}, "
                           f"rank={sampler.rank}, but this process is rank {trainer.global_rank} of "
                           f"{trainer.world_size}; build it with num_replicas=trainer.world_size, "
                           "rank=trainer.global_rank (NoisyDigitsDataModule does).")
        raise_together(trainer, problem, "HardBatches needs the training loader's batch_sampler to be a "
                                         "HardBatchSampler sharded for this run, on every rank.")
        self._sync_val_check(trainer, sampler)
        self._warn_if_schedule_oversized(trainer)

    @override
    def on_train_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._sync_val_check(trainer, self._attach(trainer))

    def observe(self, ctx: StepContext) -> None:
        if ctx.phase != "train":
            return
        sampler = self._sampler if self._sampler is not None else self._attach(ctx.trainer)
        rows = ctx.gathered
        assert rows is not None
        index = rows["index"].detach().cpu().long()
        if index.numel() == 0:
            return
        if bool((index >= sampler.num_samples).any()):
            raise IndexError(f"HardBatches: sample index {int(index.max())} is out of range for a HardBatchSampler "
                             f"over {sampler.num_samples} samples; is it the training set's sampler?")
        ids = sampler.batch_of_index[index].unique()
        if ids.numel() != 1 or int(ids[0]) < 0:  # the same gathered rows on every rank: every rank raises
            raise SelectionError(f"HardBatches: the step's samples (of every rank) belong to batches {ids.tolist()} "
                                 "of the HardBatchSampler, expected exactly one; is the loader using it, built with "
                                 "num_replicas=trainer.world_size and rank=trainer.global_rank?")
        loss = distinct_sample_mean(index, rows["loss"].detach().cpu()).float()
        sampler.update(int(ids[0]), loss)
        ctx.log("hard_batches/batch_loss", loss)

    @override
    def state_dict(self) -> dict[str, Any]:
        if self._sampler is not None:
            return {"sampler": self._sampler.state_dict()}
        return {"sampler": self._pending}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict.get("sampler")
        if self._sampler is not None and self._pending is not None:
            self._sampler.load_state_dict(self._pending)
            self._pending = None
