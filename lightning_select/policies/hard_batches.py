"""``HardBatches``: record each fixed batch's loss for :class:`~lightning_select.samplers.hard_batches.HardBatchSampler`.

"Can we learn better with hard samples?" (2023): batches of fixed membership; after one full epoch,
each epoch trains only the ``⌊δ · b⌋`` batches with the highest recorded loss and updates their
losses. The choice of batches is the sampler's; this observer records the losses it ranks by.
"""

from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as pl

from lightning_select.core import SelectionError, SelectionPolicy, StepContext
from lightning_select.core.engine import override
from lightning_select.samplers.hard_batches import HardBatchSampler


class HardBatches(SelectionPolicy):
    """Record the mean training loss of every fixed batch, so later epochs train only the hardest ones.

    - **What it changes**: nothing in the step (an observer). Which batches an epoch trains on is
      decided by the training loader's
      :class:`~lightning_select.samplers.hard_batches.HardBatchSampler` from the losses recorded here.
    - **Unbiased**: no. After the first epoch only the ``⌊δ · b⌋`` batches with the highest recorded
      loss are trained, so the expected gradient over-weights hard (and mislabelled) samples.
    - **Extra cost**: none beyond the engine's one per-step gather of the trained rows
      (``ctx.gathered``, shared with every other observer); ``4 · b`` bytes of losses in the sampler.
    - **Reference**: "Can we learn better with hard samples?" (2023), see
      ``shared/reference/selection-methods.md`` ("Hard batches"); checked against its description,
      not against code.
    - **Defaults**: ``δ = 0.5`` (the sampler's ``fraction``); a batch's recorded loss is the
      unweighted mean of its trained rows' losses in the step that last trained it.

    It finds the sampler as ``trainer.train_dataloader.batch_sampler`` (a :class:`SelectionError`
    if that is not a :class:`HardBatchSampler`, e.g. ``NoisyDigitsDataModule(sampler="hard_batches")``),
    maps the step's trained sample indices to their batch through ``sampler.batch_of_index`` and
    calls ``sampler.update(batch_id, mean loss)``. Its :meth:`state_dict` is the sampler's
    (the recorded losses), so a resumed run, whose datamodule builds a fresh sampler, gets them back
    at ``on_train_start`` and trains exactly the same batches. Single process only.

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
            state = self._pending if self._pending is not None else (
                self._sampler.state_dict() if self._sampler is not None else None)  # a reloaded loader
            if state is not None:
                sampler.load_state_dict(state)
            self._sampler, self._pending = sampler, None
        return sampler

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._attach(trainer)

    @override
    def on_train_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._attach(trainer)

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
        if ids.numel() != 1 or int(ids[0]) < 0:
            raise SelectionError(f"HardBatches: the step's samples belong to batches {ids.tolist()} of the "
                                 "HardBatchSampler, expected exactly one; is the loader using it (single process)?")
        loss = rows["loss"].detach().float().mean()
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
