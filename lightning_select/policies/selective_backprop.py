"""``SelectiveBackprop``: train on the samples with the biggest losses (Jiang et al. 2019; Composer's variant).

The rules are pure functions in :mod:`lightning_select.rules.selection`; this callback owns the
options, the active window, the recent-loss history (paper rule), the stale-score table and the
logging.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_select.core import SelectionError, SelectionPolicy, StepContext
from lightning_select.core.distributed import all_gather_rows, train_dataset_size, valid_rows
from lightning_select.core.engine import override
from lightning_select.core.options import bool_option, int_option, real_option, str_option
from lightning_select.rules.selection import (
    bernoulli_keep,
    composer_keep,
    push_history,
    selective_backprop_probabilities,
)
from lightning_select.stats.table import SampleTable

if TYPE_CHECKING:  # pragma: no cover
    import lightning.pytorch as pl

RULES = ("paper", "composer")


class SelectiveBackprop(SelectionPolicy):
    """Selective-Backprop: back-propagate only the samples with the biggest losses.

    **Card.** What it changes: the selection (a subset of each batch is trained, weights stay 1).
    Unbiased: no, by design (high-loss samples are over-represented and not reweighted; under
    label noise this trains on more mislabelled samples than the base rate). Extra cost: one
    no-grad forward of the full batch per selecting step (the engine's scoring pass, about a third
    of a plain step), which pays off only when at least a third of the batch is dropped; with
    ``stale_scores=True`` no extra forward at all. Paper rule under DDP: two small collectives per
    selecting step (every rank holds the same global loss history). Stale mode: 8 bytes per sample
    (last loss and its epoch) and the engine's one per-step gather of the trained rows. Reference:
    Jiang et al., "Accelerating Deep Learning by Focusing on the Biggest Losers" (2019), and the
    authors' code (percentile of each loss among the last R losses, ``kind="rank"``); MosaicML
    Composer's ``SelectiveBackprop`` for ``rule="composer"``. Defaults: the paper's β = 3, R = 1024,
    floor 0, eval-mode scoring and, for ``rule="paper"``, the first epoch on everything
    (``warmup_epochs=1``). Composer's published schedule is ``keep=0.5, start=0.5, end=0.9,
    interrupt=2`` with train-mode scoring; the defaults here select over all of training
    (``start=0, end=1, interrupt=0``): pass Composer's values to reproduce it.

    **Rules.**

    * ``"paper"``: each sample is kept independently with ``P = max(floor, F(ℓ)^β)``, ``F`` the
      percentile of its loss among the last ``history_size`` losses. Each step first appends the
      whole batch's scores to the history (every rank's, under DDP, in rank order), then ranks
      against it: the vectorised form of the reference's append-then-rank per sample. The history
      holds *every* scored loss, not only the trained ones, as in the paper; a history of trained
      losses only would drift towards high losses and keep ever fewer samples. It keeps about
      ``1/(β+1)`` of each batch.
    * ``"composer"``: rank the batch by loss and draw ``int(keep·N)`` rows without replacement with
      weights ``((rank + 0.5)/N)^(1/keep − 1)``. No state across steps.

    **Stale scores** (``stale_scores=True``): no scoring pass. The score of a sample is its loss
    from the last step it was *trained* in (a per-sample table the policy keeps, updated from every
    rank's trained rows); a sample never trained, or whose loss is older than ``stale_epochs``
    epochs (``current_epoch − epoch_of_loss > stale_epochs``), is kept unconditionally (treated as
    maximal score), so its loss is refreshed. The first epoch therefore trains on everything. With
    the paper rule the known stale scores of the batch feed the history; with Composer's rule
    ``int(keep·n_known)`` of the rows with a known score are drawn, in addition to the forced ones.

    **Cheaper scoring.** ``scale_factor < 1`` scores a downscaled copy of the input (Composer's
    option; bilinear for images), and ``scoring_input`` any user-provided view of the batch. The
    ranking then comes from a different (cheaper) forward than the one trained; how much that costs
    in selection quality is task-dependent and not measured here.

    **Schedule.** The policy selects only within ``start ≤ global_step / total_steps < end`` (total
    from ``trainer.estimated_stepping_batches``; ``current_epoch / max_epochs`` when that is
    unbounded), after ``warmup_epochs`` epochs, and not on every ``interrupt``-th batch of an epoch
    (``(batch_idx + 1) % interrupt == 0``, as in Composer). Other steps train the whole batch
    without a scoring pass. Randomness comes from ``StepContext.generator(seed)`` only, so a resumed
    run makes bit-identical selections; the history and the stale table are checkpointed. Under DDP
    each rank selects from its own batch; the engine normalises globally and trains a weight-0 row
    on a rank that kept nothing.

    Logged (at the engine's cadence): ``sb/kept_fraction`` (1 on steps that do not select),
    ``sb/score_mean``, ``sb/score_max``, ``sb/threshold`` (paper rule: the loss above which a sample
    is more likely kept than not, i.e. the history's ``0.5^(1/β)`` quantile) and, in stale mode,
    ``sb/forced_fraction``.

    Args:
        rule: ``"paper"`` or ``"composer"``.
        beta: β of the paper rule (≥ 0).
        floor: the paper's ``s_min``, the least selection probability, in [0, 1].
        history_size: R, the number of recent losses the paper rule ranks against (≥ 1).
        keep: Composer's kept fraction, in (0, 1].
        start, end: the active window as fractions of training, ``0 ≤ start < end ≤ 1``.
        interrupt: every ``interrupt``-th batch is a normal step (0 = never).
        scoring_mode: ``"eval"`` (the paper) or ``"train"`` (Composer; BatchNorm statistics then see
            the full batch in the scoring pass too).
        stale_scores: select with recorded losses instead of a scoring pass.
        stale_epochs: how many epochs a recorded loss stays usable (≥ 0).
        warmup_epochs: epochs trained on everything before selecting; None = 1 for the paper rule
            (the paper), 0 for Composer's.
        seed: seed of the position-seeded draws.
        scale_factor: score on the input resized by this factor, in (0, 1] (Composer's ``scale_factor``:
            a cheaper scoring pass; the model must accept the smaller input, e.g. a CNN with global
            pooling). Training always uses the full-size input.
        scale_key: the batch key of the input to resize (a tuple batch: its first element).
        scoring_input: a callable ``batch -> batch`` for the scoring pass instead (any downscaled or
            cheaper view of the same rows, in the same order), e.g. shorter text sequences.

    Example::

        >>> from lightning_select import SelectiveBackprop
        >>> paper = SelectiveBackprop()                       # β = 3, R = 1024, first epoch on everything
        >>> composer = SelectiveBackprop(rule="composer", keep=0.5, start=0.5, end=0.9, interrupt=2,
        ...                              scoring_mode="train")
        >>> stale = SelectiveBackprop(stale_scores=True, stale_epochs=3)
        >>> paper.scoring_mode, stale.needs_global_rows, paper.warmup_epochs, composer.warmup_epochs
        ('eval', True, 1, 0)
        >>> # Trainer(callbacks=[paper]).fit(model)   # training_step returns per-sample losses [B]
    """

    order = 100

    def __init__(
        self,
        rule: Literal["paper", "composer"] = "paper",
        beta: float = 3.0,
        floor: float = 0.0,
        history_size: int = 1024,
        keep: float = 0.5,
        start: float = 0.0,
        end: float = 1.0,
        interrupt: int = 0,
        scoring_mode: Literal["eval", "train"] = "eval",
        stale_scores: bool = False,
        stale_epochs: int = 3,
        warmup_epochs: Optional[int] = None,
        seed: int = 0,
        scale_factor: float = 1.0,
        scale_key: str = "image",
        scoring_input: Optional[Callable[[Any], Any]] = None,
    ) -> None:
        who = type(self).__name__
        rule = str_option(who, "rule", rule)
        if rule not in RULES:
            raise ValueError(f"{who}: expected `rule` to be 'paper' or 'composer', but got {rule!r}.")
        scoring_mode = str_option(who, "scoring_mode", scoring_mode)
        if scoring_mode not in ("eval", "train"):
            raise ValueError(f"{who}: expected `scoring_mode` to be 'eval' or 'train', but got {scoring_mode!r}.")
        beta = real_option(who, "beta", beta)
        if beta < 0:
            raise ValueError(f"{who}: expected `beta` >= 0 (0 keeps everything), but got {beta}.")
        floor = real_option(who, "floor", floor)
        if not 0.0 <= floor <= 1.0:
            raise ValueError(f"{who}: expected `floor` (the least selection probability) in [0, 1], but got {floor}.")
        keep = real_option(who, "keep", keep)
        if not 0.0 < keep <= 1.0:
            raise ValueError(f"{who}: expected `keep` in (0, 1] (the kept fraction), but got {keep}.")
        start, end = real_option(who, "start", start), real_option(who, "end", end)
        if not 0.0 <= start < end <= 1.0:
            raise ValueError(
                f"{who}: expected 0 <= `start` < `end` <= 1 (fractions of training), but got start={start}, end={end}."
            )
        self.rule, self.scoring_mode = rule, scoring_mode  # the instance's mode overrides the class attribute
        self.beta, self.floor, self.keep, self.start, self.end = beta, floor, keep, start, end
        self.history_size = int_option(who, "history_size", history_size, minimum=1)
        self.interrupt = int_option(who, "interrupt", interrupt, minimum=0)
        self.stale_scores = bool_option(who, "stale_scores", stale_scores)
        self.stale_epochs = int_option(who, "stale_epochs", stale_epochs, minimum=0)
        warmup = int_option(who, "warmup_epochs", warmup_epochs, minimum=0, optional=True)
        self.warmup_epochs = (1 if rule == "paper" else 0) if warmup is None else warmup
        self.seed = int_option(who, "seed", seed)
        self.scale_factor = real_option(who, "scale_factor", scale_factor)
        if not 0.0 < self.scale_factor <= 1.0:
            raise ValueError(f"{who}: expected `scale_factor` in (0, 1] (the scoring input's size relative to the "
                             f"training input; Composer uses e.g. 0.5), but got {scale_factor}.")
        self.scale_key = str_option(who, "scale_key", scale_key)
        if scoring_input is not None and not callable(scoring_input):
            raise TypeError(f"{who}: expected `scoring_input` to be a callable batch -> batch, but got {scoring_input!r}.")
        if scoring_input is not None and self.scale_factor < 1.0:
            raise ValueError(f"{who}: pass either `scale_factor` < 1 or `scoring_input`, not both; a custom "
                             "`scoring_input` can downscale itself.")
        if self.stale_scores and (scoring_input is not None or self.scale_factor < 1.0):
            raise ValueError(f"{who}: `stale_scores`=True runs no scoring pass, so `scale_factor`/`scoring_input` "
                             "would do nothing; drop them or set stale_scores=False.")
        self.scoring_input = scoring_input
        self.needs_global_rows = self.stale_scores  # the stale table is fed from every rank's trained rows
        self.history = torch.full((self.history_size,), float("nan"))  # recent losses, NaN = empty slot
        self.history_next = 0  # the ring buffer's next slot
        self.selecting_steps = 0
        self.table: Optional[SampleTable] = None  # stale mode: last loss and its epoch per sample
        self._total_steps: Optional[float] = None
        self._selecting = False  # whether the current step selects (set by is_active, read by needs_scores)

    # ------------------------------------------------------------------ what the engine reads
    @property  # type: ignore[override]
    def needs_scores(self) -> bool:
        """The scoring pass is requested only on steps that select, and never in stale mode."""
        return self._selecting and not self.stale_scores

    def is_active(self, trainer: "pl.Trainer") -> bool:
        """Always takes part (it logs every step and, in stale mode, records every trained loss);
        whether this step *selects* is decided here, from the epoch, step and batch position only, so
        it is the same on every rank and after a resume."""
        self._selecting = self.selects_at(trainer)
        return True

    def selects_at(self, trainer: "pl.Trainer") -> bool:
        """Whether the current step selects: after the warm-up, inside the window, not an interrupt step."""
        if trainer.current_epoch < self.warmup_epochs:
            return False
        if self.interrupt:
            batch_idx = trainer.fit_loop.epoch_loop.batch_idx
            if (batch_idx + 1) % self.interrupt == 0:
                return False
        if self.start > 0.0 or self.end < 1.0:
            progress = self._progress(trainer)
            return self.start <= progress < self.end
        return True

    def _progress(self, trainer: "pl.Trainer") -> float:
        if self._total_steps is None:
            self._total_steps = float(trainer.estimated_stepping_batches)
        if math.isfinite(self._total_steps) and self._total_steps > 0:
            return trainer.global_step / self._total_steps
        if trainer.max_epochs is not None and trainer.max_epochs > 0:
            return trainer.current_epoch / trainer.max_epochs
        raise SelectionError(
            f"SelectiveBackprop(start={self.start}, end={self.end}) needs a bounded training length to place its "
            "window, but the Trainer has neither max_steps nor max_epochs. Set one, or use start=0, end=1."
        )

    # ------------------------------------------------------------------ lifecycle
    @property
    def state_key(self) -> str:
        return self._generate_state_key(rule=self.rule, stale_scores=self.stale_scores)

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._total_steps = float(trainer.estimated_stepping_batches)
        if self.start > 0.0 or self.end < 1.0:
            self._progress(trainer)  # raises now, not at the first step, when the length is unbounded
        if not self.stale_scores:
            return
        n = train_dataset_size(trainer, "SelectiveBackprop(stale_scores=True)")
        if self.table is None:
            self.table = SampleTable(n)
            self.table.add_column("loss", torch.float32, float("nan"), "last")
            self.table.add_column("epoch", torch.int32, -1, "last")
        elif self.table.num_samples != n:
            raise SelectionError(
                f"The restored SelectiveBackprop stale-score table has {self.table.num_samples} samples but the "
                f"training set has {n}; resume with the same dataset."
            )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history.clone(), "history_next": self.history_next,
                "selecting_steps": self.selecting_steps,
                "table": None if self.table is None else self.table.state_dict()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "history" not in state_dict:
            return
        history = state_dict["history"]
        if history.numel() != self.history_size:
            raise SelectionError(
                f"The checkpoint's SelectiveBackprop history holds {history.numel()} losses but history_size="
                f"{self.history_size}; resume with the same history_size."
            )
        self.history = history.clone().float()
        self.history_next = int(state_dict["history_next"])
        self.selecting_steps = int(state_dict["selecting_steps"])
        table = state_dict.get("table")
        self.table = None if table is None else SampleTable.from_state_dict(table)

    # ------------------------------------------------------------------ selection
    def scoring_batch(self, batch: Any) -> Any:
        """The scoring pass's input: the user's ``scoring_input(batch)``, or the batch with its
        ``scale_key`` tensor (the first element of a tuple batch) resized by ``scale_factor`` with
        ``F.interpolate`` (linear / bilinear / trilinear for 3-, 4- and 5-d inputs, as Composer)."""
        if self.scoring_input is not None:
            return self.scoring_input(batch)
        if self.scale_factor == 1.0:
            return batch
        if isinstance(batch, Mapping):
            if self.scale_key not in batch:
                raise SelectionError(f"SelectiveBackprop(scale_factor={self.scale_factor}) looks for the input under "
                                     f"`scale_key`={self.scale_key!r}, but the batch has keys {sorted(batch)}; set "
                                     "scale_key to the image column.")
            x = batch[self.scale_key]
        elif isinstance(batch, (tuple, list)) and batch:
            x = batch[0]
        else:
            raise SelectionError(f"SelectiveBackprop(scale_factor={self.scale_factor}) needs a dict or tuple batch, "
                                 f"but got {type(batch).__name__}; pass `scoring_input` to downscale it yourself.")
        modes = {3: "linear", 4: "bilinear", 5: "trilinear"}
        if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() not in modes:
            raise SelectionError(
                f"SelectiveBackprop(scale_factor={self.scale_factor}) resizes a float [B, C, *spatial] input with 1–3 "
                f"spatial dims, but the input is {type(x).__name__}"
                + (f" of shape {tuple(x.shape)} and dtype {x.dtype}" if isinstance(x, Tensor) else "")
                + "; pass `scoring_input` for other inputs, or scale_factor=1.")
        small = F.interpolate(x, scale_factor=self.scale_factor, mode=modes[x.dim()])
        if isinstance(batch, Mapping):
            return {**batch, self.scale_key: small}
        return type(batch)([small, *batch[1:]]) if isinstance(batch, list) else (small, *batch[1:])

    def select(self, ctx: StepContext) -> Optional[Tensor]:
        n = ctx.rows.numel()
        if not self._selecting:
            ctx.log("sb/kept_fraction", 1.0)
            return None
        scores, forced = self._scores(ctx)
        generator = ctx.generator(self.seed)
        threshold: Optional[Tensor] = None
        if self.rule == "paper":
            self._push(ctx, scores[~forced])
            p = selective_backprop_probabilities(scores, self.history, self.beta, self.floor)
            keep = bernoulli_keep(p, generator)  # a forced row has a NaN score, hence P = 1
            if ctx.should_log and self.beta > 0:
                threshold = self._threshold()
        else:
            known = (~forced).nonzero().flatten()
            keep = forced.clone()
            keep[known[composer_keep(scores[known], self.keep, generator)]] = True
        self.selecting_steps += 1
        if ctx.should_log:  # CPU tensors: no device sync
            ctx.log("sb/kept_fraction", float(keep.float().mean()) if n else 0.0)
            finite = scores[~forced]
            if finite.numel():
                ctx.log("sb/score_mean", float(finite.mean()))
                ctx.log("sb/score_max", float(finite.max()))
            if threshold is not None:
                ctx.log("sb/threshold", float(threshold))
            if self.stale_scores:
                ctx.log("sb/forced_fraction", float(forced.float().mean()) if n else 0.0)
        return keep

    def _scores(self, ctx: StepContext) -> tuple[Tensor, Tensor]:
        """``[n]`` float32 CPU scores of the current rows and a ``[n]`` mask of rows kept unconditionally."""
        if not self.stale_scores:
            if ctx.scores is None:
                raise SelectionError("SelectiveBackprop selected without a scoring pass; is it a Trainer callback?")
            scores = ctx.scores.index_select(0, ctx.rows.to(ctx.scores.device)).detach().float().cpu()
            return scores, scores.isnan()  # a NaN score is kept, so the engine's nan_policy sees it
        if self.table is None:
            raise SelectionError("SelectiveBackprop was used before on_train_start; it must be a Trainer callback.")
        index = ctx.kept_indices.cpu()
        safe = index.clamp(0, self.table.num_samples - 1)  # an index outside is kept; observe then raises everywhere
        loss, epoch = self.table["loss"][safe], self.table["epoch"][safe]
        forced = (epoch < ctx.trainer.current_epoch - self.stale_epochs) | loss.isnan() | (safe != index)
        return loss.masked_fill_(forced, float("nan")), forced

    def _push(self, ctx: StepContext, values: Tensor) -> None:
        """Append this step's scores of every rank (rank order) to the history: the same on every rank."""
        if ctx.world_size > 1:
            values = valid_rows(*all_gather_rows(ctx, values.to(ctx.module.device))).cpu()
            values = values[~values.isnan()]
        self.history_next = push_history(self.history, self.history_next, values)

    def _threshold(self) -> Tensor:
        seen = self.history[~self.history.isnan()]
        return torch.quantile(seen, 0.5 ** (1.0 / self.beta)) if seen.numel() else torch.tensor(float("nan"))

    # ------------------------------------------------------------------ stale table
    def observe(self, ctx: StepContext) -> None:
        """Stale mode: record every rank's trained losses and the epoch (the same table on every rank)."""
        if not self.stale_scores:
            return
        if self.table is None:
            raise SelectionError("SelectiveBackprop was used before on_train_start; it must be a Trainer callback.")
        rows = ctx.gathered
        assert rows is not None
        index = rows["index"].cpu()
        if index.numel() == 0:
            return
        self.table.check_indices(index)  # every rank holds the same rows, so every rank raises together
        self.table.update(index, {"loss": rows["loss"].float(), "epoch": ctx.trainer.current_epoch})

    def get_config_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in (
            "rule", "beta", "floor", "history_size", "keep", "start", "end", "interrupt", "scoring_mode",
            "stale_scores", "stale_epochs", "warmup_epochs", "seed")}
