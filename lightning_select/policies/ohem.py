"""``OHEM``: online hard-example mining, train on the top fraction of each batch by loss."""

from __future__ import annotations

import warnings
from typing import Literal, Optional

import torch
from torch import Tensor

from lightning_select.core import StepContext
from lightning_select.core.context import training_loss_of
from lightning_select.core.distributed import all_gather_rows, valid_rows
from lightning_select.core.options import real_option, str_option
from lightning_select.policies.weight_stats import StatisticsPolicy, WeightStatistics
from lightning_select.rules.contrastive import EmbeddingOutput
from lightning_select.rules.reducible_loss import threshold_of
from lightning_select.rules.weighting import ohem_mask


class OHEM(StatisticsPolicy):
    """Online hard-example mining (Shrivastava et al., 2016): train on the ``⌈keep·B⌉`` highest losses.

    **Card.** What it changes: the selection (``mode="select"``) or the weights (``mode="weight"``: 1 for
    the hard rows, 0 for the rest); the same rows either way. Unbiased: no, by design: only the hardest
    rows are trained, with a plain mean over them (the paper's rule), so under label noise it trains
    mostly on mislabelled rows. Extra cost: ``"select"``: one no-grad scoring forward over the ``B``
    loaded rows, then the training forward and backward over the kept rows only; ``"weight"``: no extra
    forward, but the forward keeps its graph for all ``B`` rows and the backward runs over all of them.
    With ``scope="global"``, two all-gathers per step (the per-rank row counts and the ``[B]`` losses);
    under DDP always one 5-element all-reduce per step for the running totals. Reference: "Training
    Region-based Object Detectors with Online Hard Example Mining", CVPR 2016. Defaults:
    ``keep = 0.25``, the kept fraction of Selective-Backprop's default (β = 3) and of the
    ``UniformSubset(keep=0.25)`` baseline, so the three compare at the same number of trained rows (the
    paper keeps 128 of about 2000 region proposals of two images, which are highly redundant, a
    setting with no analogue for image-level batches); ``mode="select"``; ``scope="rank"``; the
    scoring pass in eval mode. The paper's non-maximum suppression of overlapping regions has no
    counterpart here.

    **Which mode.** The paper runs a read-only copy of the network forward over every region, picks the
    hard ones, and runs the forward and backward of the trained network on those only; it rejects
    setting the other losses to zero because the backward would still run over every region. That
    is ``mode="select"`` (the engine's scoring pass, then selection): with a backward costing about
    twice a forward, a step costs ``1 + 3·keep`` forward-equivalents against ``3`` for
    ``mode="weight"``, so ``"select"`` is cheaper for ``keep < 2/3`` (at 0.25: 1.75 against 3). Both
    train exactly the top-``k`` rows of the scoring losses when the model computes the same per-row
    losses in the scoring pass and in training (no dropout, no BatchNorm, or ``scoring_mode="train"``
    without dropout). ``"weight"`` is exact in every case (it ranks the very losses it
    back-propagates) and is the one to use for a *contrastive* loss: selecting rows there also drops
    them as in-batch negatives, which changes every kept row's loss, while zero weights keep every row
    as a negative (``"select"`` on an ``EmbeddingOutput`` warns once). The measured cost on noisy
    digits is in the README.

    **DDP.** ``scope="rank"`` keeps the top fraction of each rank's batch. ``scope="global"`` keeps the
    global top ``⌈keep·Σ_r B_r⌉`` of every rank's losses (gathered with
    :func:`~lightning_select.core.distributed.all_gather_rows`; ties by rank, then position; the same
    rule as ``ReducibleLossSelection(scope="global")``), each rank its own share, so ranks train
    different counts; the engine's global normalisation then gives the mean over the globally kept
    rows. A NaN loss ranks last (and then meets the engine's ``nan_policy``).

    Logs ``ohem/kept_fraction``, ``ohem/threshold`` (the smallest kept loss), ``ohem/loss_mean`` (of all
    rows, the score), and the 0/1 weights' ``ohem/weight_mean``, ``ohem/max_mean_ratio`` and
    ``ohem/ess_fraction``. Combined with ``FocalWeighting`` (count normalisation) in ``"weight"`` mode,
    the zero-weighted rows count in the denominator.

    Args:
        keep: the kept fraction of each batch, in (0, 1]; ``⌈keep·B⌉`` rows (at least one).
        scope: ``"rank"`` or ``"global"`` (see above).
        mode: ``"select"`` (scoring pass, then train the kept rows) or ``"weight"`` (0/1 weights).
        scoring_mode: ``"eval"`` or ``"train"`` mode of the scoring pass (``"select"`` only).

    Example::

        >>> policy = OHEM(keep=0.25)
        >>> policy.needs_scores, OHEM(mode="weight").needs_scores
        (True, False)
        >>> # Trainer(callbacks=[policy]).fit(NoisyLabelClassifier(), NoisyDigitsDataModule(batch_size=256))
    """

    order = 200

    def __init__(self, keep: float = 0.25, scope: Literal["rank", "global"] = "rank",
                 mode: Literal["select", "weight"] = "select", scoring_mode: Literal["eval", "train"] = "eval") -> None:
        who = type(self).__name__
        keep = real_option(who, "keep", keep)
        if not 0.0 < keep <= 1.0:
            raise ValueError(f"{who}: expected `keep` in (0, 1] (the kept fraction of each batch; 0.25 keeps the "
                             f"hardest quarter), but got {keep}.")
        self.keep = keep
        self.scope = str_option(who, "scope", scope)
        if self.scope not in ("rank", "global"):
            raise ValueError(f"{who}: expected `scope` to be 'rank' or 'global', but got {scope!r}.")
        self.mode = str_option(who, "mode", mode)
        if self.mode not in ("select", "weight"):
            raise ValueError(f"{who}: expected `mode` to be 'select' (scoring pass, train the kept rows) or 'weight' "
                             f"(0/1 weights on the training pass), but got {mode!r}.")
        self.scoring_mode = str_option(who, "scoring_mode", scoring_mode)  # the instance's overrides the class's
        if self.scoring_mode not in ("eval", "train"):
            raise ValueError(f"{who}: expected `scoring_mode` to be 'eval' or 'train', but got {scoring_mode!r}.")
        self.needs_scores = self.mode == "select"
        self.loads_larger_batch = self.mode == "select"
        self.order = 200 if self.mode == "select" else 300
        self.stats = WeightStatistics("ohem", "loss_mean")
        self._warned = False

    def _mask(self, ctx: StepContext, losses: Tensor) -> Tensor:
        """The kept rows among ``losses`` (this rank's), per rank or of the global top-k."""
        scores = losses.detach().float().nan_to_num(nan=float("-inf"))
        if self.scope == "global" and ctx.world_size > 1:  # every rank calls this every step
            gathered, counts = all_gather_rows(ctx, scores, fill=float("-inf"))
            mask = ohem_mask(scores, self.keep, gathered, ctx.trainer.global_rank, counts)
            if ctx.should_log:
                ctx.log("ohem/threshold", threshold_of(valid_rows(gathered, counts), self.keep))
            return mask
        mask = ohem_mask(scores, self.keep) if scores.numel() else torch.zeros(0, dtype=torch.bool, device=scores.device)
        if ctx.should_log and scores.numel():
            ctx.log("ohem/threshold", threshold_of(scores, self.keep))
        return mask

    def select(self, ctx: StepContext) -> Optional[Tensor]:
        if self.mode != "select":
            return None
        assert ctx.scores is not None
        losses = ctx.scores[ctx.rows.to(ctx.scores.device)]
        mask = self._mask(ctx, losses)
        self.stats.stage(mask.float(), losses.float(), mask)
        return mask

    def sample_weights(self, ctx: StepContext) -> Optional[Tensor]:
        if self.mode != "weight":
            return None
        assert ctx.losses is not None
        losses = ctx.losses.detach() if ctx.has_samples else ctx.losses.detach()[:0]
        mask = self._mask(ctx, losses)
        self.stats.stage(mask.float(), losses.float(), mask)
        return mask.float() if ctx.has_samples else torch.zeros_like(ctx.losses.detach())

    def observe(self, ctx: StepContext) -> None:
        if self.mode == "select" and not self._warned and isinstance(training_loss_of(ctx.output), EmbeddingOutput):
            self._warned = True
            warnings.warn("OHEM(mode='select') on a contrastive EmbeddingOutput: the kept rows are also each other's "
                          "only in-batch negatives, which changes their losses. Use OHEM(mode='weight') to keep every "
                          "row as a negative and back-propagate the hard rows only.", UserWarning, stacklevel=2)
        super().observe(ctx)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(keep=self.keep, scope=self.scope, mode=self.mode)

