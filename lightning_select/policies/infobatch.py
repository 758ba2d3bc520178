"""``InfoBatch``: record each sample's training loss for :class:`~lightning_select.samplers.infobatch.InfoBatchSampler`
and up-weight the well-learned samples it kept.

InfoBatch (Qin et al., ICLR 2024): each epoch, the samples whose most recent loss is below the mean
are *well-learned*; part of them (``r``) is pruned from the epoch and the kept ones get the weight
``≈ 1 / (1 − r)``, so the epoch's expected gradient is unchanged. The last ``1 − δ`` of the epochs
train on the full data with weight 1. The epoch's choice is the sampler's; this callback owns the
scores, hands them to the sampler at every epoch start and applies the weights.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_select.core import SelectionError, SelectionPolicy, StepContext
from lightning_select.core.distributed import raise_together
from lightning_select.core.engine import override
from lightning_select.core.options import bool_option
from lightning_select.core.schedule import epoch_length_source, resize_cosine_schedules, stepping_batches
from lightning_select.core.schedule import load_pending_loader_state, sync_val_check
from lightning_select.samplers.infobatch import InfoBatchSampler
from lightning_select.samplers.resumable import carry_state
from lightning_select.stats.table import SampleTable


def expected_num_epochs(trainer: "pl.Trainer") -> Optional[int]:
    """The ``num_epochs`` an :class:`InfoBatchSampler` of this run needs: ``max_epochs``, None when unbounded."""
    epochs = trainer.max_epochs
    return int(epochs) if epochs is not None and epochs > 0 else None


class InfoBatch(SelectionPolicy):
    """InfoBatch: prune part of the well-learned samples each epoch and up-weight the rest; anneal on full data.

    - **What it changes**: the weights (stage 5), and, through the training loader's
      :class:`~lightning_select.samplers.infobatch.InfoBatchSampler`, which samples each epoch
      visits. In a pruning epoch (``epoch < δ · E``) the seen samples whose score (most recent training
      loss) is below the mean score are *well-learned*; exactly ``k = max(1, round((1 − r) · n_low))``
      of those ``n_low`` are kept, uniformly at random, with the weight ``n_low / k``
      (``= 1 / (1 − r)`` up to the rounding of ``k``); every other sample is kept with weight 1, and
      samples not yet seen are always kept. Anneal epochs (``epoch ≥ δ · E``, the last
      ``⌊(1 − δ) · E⌋``) train every sample with weight 1.
    - **Unbiased**: yes, per epoch. ``n_low / k`` is the inverse of a well-learned sample's inclusion
      probability, so ``E[Σ_kept w_i ℓ_i] = Σ_i ℓ_i`` for any per-sample losses (tested by Monte Carlo
      over plans; the weights of a plan sum to ``N``). The policy sets ``normalise_by_count``, and this
      is the right reduction: each step's loss is ``Σ_rows w ℓ / B`` (``B`` the global number of rows
      trained in the step), the reference's ``(ℓ · w).mean()``, so the pruned epoch's summed update
      ``Σ_kept w ∇ℓ / B`` is an unbiased estimate of the full epoch's ``Σ_i ∇ℓ_i / B``, reached in
      ``⌈m / B⌉`` instead of ``⌈N / B⌉`` steps: each step's expected gradient is ``N / m`` times the
      full-data mean gradient, with the same direction (tested). The engine's default, dividing by the
      step's weight sum, would instead make each step a self-normalised (ratio) estimate of the mean,
      slightly biased for a finite batch since ``Σ_batch w`` is random, and it would drop the ``N / m``
      factor, so a pruned epoch would move the parameters only ``m / N`` as far as a full one (plain
      subsampling with reweighting inside each batch). The scores of pruned samples are stale (their
      last seen loss), as in the paper.
    - **Extra cost**: no extra forward pass (the scores are the training losses, read from the
      engine's one per-step gather of every rank's trained rows, ``ctx.gathered``, shared with every
      other observer). Memory: 4 bytes per sample of scores here, plus the sampler's snapshot of
      them (4 bytes) and its epoch plan (a bool mask and float32 weights, 5 bytes per sample, and the
      order as a Python list, about 36 bytes per kept sample). Under DDP one boolean all-reduce at
      ``on_train_start`` (the ranks' joint sampler check). Per epoch one ``randperm`` of the
      well-learned and one of the kept samples.
    - **Reference**: Qin et al., "InfoBatch: Lossless Training Speed Up by Unbiased Dynamic Data
      Pruning" (ICLR 2024); checked against the public implementation (``NUS-HPC-AI-Lab/InfoBatch``,
      ``infobatch/infobatch.py``): well-learned = score < mean score, a fixed-size uniform choice of
      the kept ones (``int(keep · |W|)``), weight ``1 / keep``, loss ``(ℓ · w).mean()``. Its bugs are
      avoided (``shared/reference/selection-methods.md``): the weights are those of the current
      epoch's plan, so the anneal epochs have weight 1 whatever ``δ · E``; randomness comes only from
      :func:`~lightning_select.samplers.epoch.epoch_generator` ``(seed, epoch)`` (no global reseed);
      the scores and the plan are checkpointed; the sample indices come from the batch (no
      DataLoader monkey-patch); step-based schedules follow the shortened epochs (below).
    - **Defaults**: ``r = 0.5``, ``δ = 0.875`` (the sampler's ``prune`` and ``delta``;
      ``NoisyDigitsDataModule(sampler="infobatch", infobatch_prune=..., infobatch_delta=...)``).
      Deviations, each a correction: ``k`` is rounded (the reference floors it) and at least 1, and the
      weight is the exact ``n_low / k``; samples not yet seen are kept and left out of the mean (the
      reference gives them the score 3 and counts them); the pruning epochs are those with
      ``epoch < δ · E`` (``⌈δ · E⌉`` of them; the reference prunes one more, ``epoch ≤ δ · E``);
      ``r`` may be any value in ``[0, 1)`` (the reference clips it to 0.9).

    **Exact resume.** :meth:`state_dict` holds the score table, the sampler's state (the scores the
    current epoch was planned from, and the sizes of the planned epochs) and the step count the
    learning-rate schedule is sized for. A resumed run hands the same scores to the sampler, which
    draws the same plan from ``(seed, epoch, scores)``; mid-epoch,
    :class:`~lightning_select.samplers.resumable.ResumableDataLoader` skips the batches already trained.
    (When ``configure_optimizers`` sizes a schedule from the loader, Lightning sets the loader up before
    the checkpoint's loop state is restored and never gives it its mid-epoch position;
    :func:`~lightning_select.core.schedule.load_pending_loader_state` at ``on_train_start`` does.)

    **Epoch lengths and schedules.** Lightning measures ``len(train_dataloader)`` once, in epoch 0
    (every sample: no scores yet). (1) A pruning epoch's length depends on the scores at its start, so
    :func:`~lightning_select.core.schedule.stepping_batches` is exact for the epochs already planned
    and for the anneal epochs, and estimates each future pruning epoch by the size the latest scores
    would give. At the start of every epoch (``resize_schedule``, default on) the callback recomputes
    it and re-sizes every step-interval ``CosineAnnealingLR`` whose ``T_max`` was the previous count
    (:func:`~lightning_select.core.schedule.resize_cosine_schedules`: the learning rate continues from
    its current value along a cosine that ends at the new count). From the start of the last pruning
    epoch on the count is exact, so the schedule reaches 0 exactly at the last step (tested). Other
    step schedulers sized for the count (OneCycleLR) cannot be re-sized: a warning says so. (2) With
    a fractional ``val_check_interval`` it sets ``trainer.val_check_batch`` from each epoch's own
    length, so every epoch validates (Lightning would validate only after epoch 0).

    **DDP.** The scores are recorded from every rank's trained rows (``ctx.gathered``), so every rank
    holds the same scores and its sampler draws the same plan, sharded like ``DistributedSampler``
    (every rank gets the same number of batches). At ``on_train_start`` every rank checks together
    that the sampler was built for this world size, rank and ``max_epochs``.

    Args:
        resize_schedule: re-size step-interval ``CosineAnnealingLR`` schedulers to the refined step
            count at every epoch start (see above).

    Example::

        >>> from lightning_select.data.noisy_labels import NoisyDigitsDataModule
        >>> policy = InfoBatch()
        >>> data = NoisyDigitsDataModule(sampler="infobatch", infobatch_prune=0.5, infobatch_delta=0.875)
        >>> # Trainer(callbacks=[policy], max_epochs=40).fit(model, data)  ->  policy.scores, policy.sampler.kept_sizes
    """

    order = 800
    needs_global_rows = True
    normalise_by_count = True

    def __init__(self, resize_schedule: bool = True) -> None:
        self.resize_schedule = bool_option("InfoBatch", "resize_schedule", resize_schedule)
        self._sampler: Optional[InfoBatchSampler] = None
        self._pending: Optional[dict[str, Any]] = None  # sampler state restored before the sampler exists
        self._table: Optional[SampleTable] = None
        self._planned: Optional[int] = None  # the step count the cosine schedules are sized for
        self._warned = False

    # ------------------------------------------------------------------ views
    @property
    def sampler(self) -> Optional[InfoBatchSampler]:
        """The training loader's sampler (None before ``on_train_start``)."""
        return self._sampler

    @property
    def scores(self) -> Optional[Tensor]:
        """``[N]`` float32: each sample's most recent training loss (NaN until trained), or None before training."""
        return None if self._table is None else self._table["score"]

    # ------------------------------------------------------------------ the sampler
    def _find(self, trainer: "pl.Trainer") -> InfoBatchSampler:
        loader = trainer.train_dataloader
        candidates = (getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None))
        for sampler in candidates:
            if isinstance(sampler, InfoBatchSampler):
                return sampler
        raise SelectionError(
            f"InfoBatch needs the training DataLoader's sampler to be an InfoBatchSampler, but got "
            f"{type(candidates[0]).__name__} (loader {type(loader).__name__}). Build the loader with "
            "`sampler=InfoBatchSampler(len(train_set), prune, delta, num_epochs=trainer.max_epochs, "
            "num_replicas=trainer.world_size, rank=trainer.global_rank)` in a ResumableDataLoader, e.g. "
            "NoisyDigitsDataModule(sampler='infobatch').")

    def _attach(self, trainer: "pl.Trainer") -> InfoBatchSampler:
        sampler = self._find(trainer)
        if sampler is not self._sampler:
            carry_state(sampler, self._sampler, self._pending)
            self._sampler, self._pending = sampler, None
        return sampler

    # ------------------------------------------------------------------ hooks
    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        problem: Optional[str] = None
        try:
            sampler = self._attach(trainer)
        except (SelectionError, ValueError) as err:
            problem = str(err)
        else:
            if (sampler.num_replicas, sampler.rank) != (trainer.world_size, trainer.global_rank):
                problem = (f"its InfoBatchSampler was built for num_replicas={sampler.num_replicas}, rank={sampler.rank}, "
                           f"but this process is rank {trainer.global_rank} of {trainer.world_size}; build it with "
                           "num_replicas=trainer.world_size, rank=trainer.global_rank (NoisyDigitsDataModule does).")
            elif sampler.num_epochs != expected_num_epochs(trainer):
                problem = (f"its InfoBatchSampler has num_epochs={sampler.num_epochs}, but the Trainer runs "
                           f"max_epochs={trainer.max_epochs}, so the anneal (the epochs >= δ·max_epochs) would be "
                           "misplaced; build it with num_epochs=trainer.max_epochs (NoisyDigitsDataModule does).")
            elif self._table is not None and self._table.num_samples != sampler.num_samples:
                problem = (f"the restored InfoBatch scores cover {self._table.num_samples} samples but the training "
                           f"set has {sampler.num_samples}; resume with the same dataset.")
        raise_together(trainer, problem, "InfoBatch needs the training loader's sampler to be an InfoBatchSampler "
                                         "built for this run, on every rank.")
        load_pending_loader_state(trainer)  # a mid-epoch resume whose schedule was sized from the loader
        if self._table is None:
            self._table = SampleTable(sampler.num_samples)
            self._table.add_column("score", torch.float32, float("nan"), "last")
        if self._planned is None:  # a fresh run: what configure_optimizers saw (no scores yet: every epoch full)
            total = stepping_batches(trainer)
            self._planned = int(total) if math.isfinite(total) else None

    @override
    def on_train_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        sampler = self._attach(trainer)
        epoch = trainer.current_epoch
        if sampler.scores_epoch != epoch:  # else: resuming inside this epoch, whose scores were restored
            assert self._table is not None
            sampler.set_scores(self._table["score"], epoch)
        sampler.set_epoch(epoch)
        sampler.plan(epoch)  # draws the plan now and records its size
        source = epoch_length_source(trainer.train_dataloader)
        if source is not None:
            sync_val_check(trainer, source.batches_in_epoch(epoch))
        if self.resize_schedule:
            self._resize_schedules(trainer)

    def _resize_schedules(self, trainer: "pl.Trainer") -> None:
        total = stepping_batches(trainer)
        if self._planned is None or not math.isfinite(total) or int(total) == self._planned:
            return
        others = resize_cosine_schedules(trainer, self._planned, int(total))
        if others and not self._warned:
            self._warned = True
            rank_zero_warn(
                f"InfoBatch: the step-interval scheduler(s) {others} are sized for {self._planned} steps, but this run "
                f"now takes {int(total)} optimizer steps (pruned epochs are shorter, and their length is known only "
                "when they start). Only CosineAnnealingLR can be re-sized on the way; the others will not reach "
                "their end. Use CosineAnnealingLR over lightning_select.core.schedule.stepping_batches(trainer).")
        self._planned = int(total)

    # ------------------------------------------------------------------ the step
    def sample_weights(self, ctx: StepContext) -> Optional[Tensor]:
        sampler = self._sampler
        if sampler is None:
            raise SelectionError("InfoBatch was used before on_train_start; it must be a Trainer callback.")
        plan = sampler.plan(sampler.epoch)
        if plan.well_learned == 0:  # a full epoch (anneal, or no scores yet): every weight is 1
            return None
        assert ctx.losses is not None
        return sampler.weights(ctx.kept_indices).to(ctx.losses.device)

    def observe(self, ctx: StepContext) -> None:
        if ctx.phase != "train":
            return
        sampler, table = self._sampler, self._table
        if sampler is None or table is None:
            raise SelectionError("InfoBatch was used before on_train_start; it must be a Trainer callback.")
        rows = ctx.gathered
        assert rows is not None
        index = rows["index"].detach().cpu().long()
        if index.numel() == 0:
            return
        table.check_indices(index)  # the same gathered rows on every rank: every rank raises together
        plan = sampler.plan(sampler.epoch)
        if not bool(plan.keep[index].all()):
            pruned = index[~plan.keep[index]].unique()[:10].tolist()
            raise SelectionError(f"InfoBatch: the step trained samples {pruned} that the epoch's plan pruned; is the "
                                 "training loader using the InfoBatchSampler this callback attached to?")
        table.update(index, {"score": rows["loss"].detach()})
        n = sampler.num_samples
        ctx.log("infobatch/kept_fraction", plan.kept / n)
        ctx.log("infobatch/well_learned_fraction", plan.well_learned / n)
        ctx.log("infobatch/weight_mean", rows["weight"].detach().double().mean())

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"table": None if self._table is None else self._table.state_dict(),
                "sampler": self._sampler.state_dict() if self._sampler is not None else self._pending,
                "planned_steps": self._planned}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        table = state_dict.get("table")
        self._table = None if table is None else SampleTable.from_state_dict(table)
        self._planned = state_dict.get("planned_steps")
        self._pending = state_dict.get("sampler")
        if self._sampler is not None and self._pending is not None:
            self._sampler.load_state_dict(self._pending)
            self._pending = None
