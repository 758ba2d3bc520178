"""The per-step selection engine: one pipeline per training step.

Every training step with at least one active :class:`~lightning_select.core.policy.SelectionPolicy`
runs these stages, in order (one method each in :meth:`SelectionEngine.run_step`):

1. **Scoring** (only if a policy sets ``needs_scores``): a no-grad pass of the user's
   ``training_step`` on the full batch, in ``"eval"`` or ``"train"`` mode, with ``self.log`` muted
   and ``ctx.phase == "score"``. Result: ``ctx.scores`` (``[B]`` per-sample losses).
2. **Selection**: each policy's ``select`` narrows ``ctx.rows``; the batch is subset (dicts, tuples,
   lists, dataclasses, tensors and lists of strings).
3. **The user's training_step** on the subset (chunked and gradient-cached when asked).
4. **Logit edits**: for an :class:`~lightning_select.rules.contrastive.EmbeddingOutput`, policies edit
   the :class:`~lightning_select.rules.contrastive.ContrastiveLogits` (e.g. mask false negatives),
   and the engine turns them into per-row InfoNCE losses. Per-sample losses are always fp32.
5. **Weights**: the product of every policy's ``sample_weights``.
6. **Reduction** to one scalar, globally normalised under DDP (:mod:`~lightning_select.rules.reduction`).
   Its single all-reduce also carries every cross-rank decision of the step: whether any rank saw a
   non-finite loss, how many rows each rank trained (the agreed size of the observers' gather), and
   whether any rank refused its batch's sample indices (negative or repeated values). Then each
   policy's additive ``loss_terms`` (e.g. EATA's Fisher penalty) is added to the scalar, once.
7. **Observers**: one gather of every rank's trained rows (``ctx.gathered``) when an observer needs
   it, then each policy's ``observe`` (e.g. :class:`~lightning_select.stats.history.LossHistory`).

Within a stage, policies run in ascending ``order`` and then in their position in
``Trainer(callbacks=...)``: deterministic and documented.

**No rank decides alone.** Every decision that can stop training is taken from all-reduced values,
so every rank raises the same :class:`SelectionError` together (never one rank while the others wait
in a collective).

The engine installs itself in one of two ways, both running :meth:`SelectionEngine.run_step`:

* by wrapping ``LightningModule.training_step`` when a policy is set up under any stock strategy
  (``auto``, single device, ``ddp``, ``ddp_spawn``); the wrapper runs inside DDP's forward
  redirection and is removed at teardown;
* as a strategy that declares ``runs_selection_engine = True`` (the registered ``*_select``
  strategies, :mod:`~lightning_select.core.strategies`), which calls the engine from
  ``Strategy.training_step`` through :meth:`SelectionEngine.of`.

Add a :class:`SelectionEngine` callback only to change its settings (index key, NaN policy, logging
cadence); otherwise a default engine is created by the first policy.
"""

from __future__ import annotations

import functools
import warnings
from typing import TYPE_CHECKING, Any, Callable, Literal, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from lightning_select.core.batch import IndexKey, batch_size_of, get_indices, select_batch
from lightning_select.core.context import SelectionError, StepContext, training_loss_of
from lightning_select.core.distributed import exchange_bad_rows
from lightning_select.core.grad_cache import GradCache
from lightning_select.core.schedule import load_pending_loader_state
from lightning_select.core.step_parts import (
    IndexGuard,
    call_step,
    module_mode,
    muted_logging,
    per_sample_losses,
    policy_loss_terms,
)
from lightning_select.rules.contrastive import EmbeddingOutput
from lightning_select.rules.reduction import effective_sample_size, normalise, weighted_sum_parts

try:  # lightning >= 2.1 ships typing_extensions
    from typing_extensions import override
except ImportError:  # pragma: no cover
    def override(f):  # type: ignore[no-redef]
        return f

if TYPE_CHECKING:  # pragma: no cover
    from lightning_select.core.policy import SelectionPolicy

_WRAPPED_FLAG = "__lightning_select_wrapped__"
_ENGINE_ATTR = "_lightning_select_engine"


class SelectionEngine(Callback):
    """Runs the per-step pipeline for every policy in the trainer.

    Args:
        index_key: where batches carry sample indices: the dict key, or an explicit int position in a
            tuple/list batch. Tuple/list batches otherwise carry them as a
            :class:`~lightning_select.core.batch.SampleIndex` element (see ``IndexedDataset``); an
            unmarked element is never read as indices.
        allow_repeated_indices: accept a sample index that occurs twice in one batch. Off by default:
            samplers without replacement (``DistributedSampler`` included) never repeat a sample
            within a batch, and a repeat usually means a label column is being read as indices. Set
            it for samplers that draw with replacement (``WeightedRandomSampler(replacement=True)``).
        nan_policy: what to do with a non-finite per-sample loss: ``"raise"`` (default; nothing is
            recorded for the step) or ``"skip"`` (warn, log ``select/nonfinite_count`` and re-run the
            step without those samples, so that no NaN reaches the gradient or any history).
        log_every_n_steps: logging cadence of the engine's and policies' statistics; defaults to
            the trainer's ``log_every_n_steps``.
        embedding_chunk_size: gradient-cached contrastive mode (GradCache, as in
            sentence-transformers' Cached* losses; see :mod:`~lightning_select.core.grad_cache`).
            Requires an :class:`~lightning_select.rules.contrastive.EmbeddingOutput`. Policies may
            also request it (``embedding_chunk_size`` attribute); the smallest size wins.

    Example::

        >>> from lightning_select import LossHistory, SelectionEngine
        >>> callbacks = [SelectionEngine(index_key="idx", nan_policy="skip"), LossHistory(num_samples=100)]
    """

    def __init__(
        self,
        index_key: IndexKey = "index",
        nan_policy: Literal["raise", "skip"] = "raise",
        log_every_n_steps: Optional[int] = None,
        embedding_chunk_size: Optional[int] = None,
        allow_repeated_indices: bool = False,
    ) -> None:
        if isinstance(index_key, bool) or not isinstance(index_key, (str, int)):
            raise TypeError(f"Expected `index_key` to be a dict key (str) or a tuple position (int): {index_key!r}.")
        if embedding_chunk_size is not None and embedding_chunk_size < 1:
            raise ValueError(f"Expected `embedding_chunk_size` >= 1 (or None), but got {embedding_chunk_size}.")
        if nan_policy not in ("raise", "skip"):
            raise ValueError(f"Expected `nan_policy` to be 'raise' or 'skip', but got {nan_policy!r}.")
        if log_every_n_steps is not None and log_every_n_steps < 1:
            raise ValueError(f"Expected `log_every_n_steps` >= 1, but got {log_every_n_steps}.")
        self.embedding_chunk_size = embedding_chunk_size
        self.index_key = index_key
        self.allow_repeated_indices = bool(allow_repeated_indices)
        self._index_guard = IndexGuard()  # this rank's refused indices; the verdict rides on _reduce
        self.nan_policy = nan_policy
        self.log_every_n_steps = log_every_n_steps
        self.policies: list["SelectionPolicy"] = []
        self._rows_per_rank: Optional[Tensor] = None  # [W] rows trained by each rank this step

    # ------------------------------------------------------------------ installation
    @staticmethod
    def of(module: "pl.LightningModule") -> Optional["SelectionEngine"]:
        """The engine installed on ``module``, or None."""
        return getattr(module, _ENGINE_ATTR, None)

    @staticmethod
    def ensure_installed(trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> "SelectionEngine":
        """Find (or create) the trainer's engine and install it on ``pl_module``. Idempotent."""
        engines = [cb for cb in trainer.callbacks if isinstance(cb, SelectionEngine)]
        if len(engines) > 1:
            raise ValueError("Expected at most one SelectionEngine callback, but got %d." % len(engines))
        engine = engines[0] if engines else (SelectionEngine.of(pl_module) or SelectionEngine())
        if not engines:  # an implicit engine becomes a trainer callback too, so its own hooks run (on_train_start)
            trainer.callbacks.append(engine)
        engine.install(trainer, pl_module)
        return engine

    def install(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not pl_module.automatic_optimization:
            raise SelectionError(
                f"lightning_select policies need automatic optimization, but {type(pl_module).__name__} sets "
                "`automatic_optimization = False`. With manual optimization, call the pure functions "
                "(e.g. `weighted_global_mean`, `LossHistory.update`) from your own training_step instead."
            )
        positioned = [(cb.order, i, cb) for i, cb in enumerate(trainer.callbacks)
                      if getattr(cb, "is_selection_policy", False)]
        self.policies = [cb for _, _, cb in sorted(positioned, key=lambda t: (t[0], t[1]))]
        resizers = [type(p).__name__ for p in self.policies if p.loads_larger_batch]
        if len(resizers) > 1:  # a configuration check: every rank has the same callbacks, so all raise here
            raise SelectionError(
                f"{' and '.join(resizers)} each train a fraction of a larger loaded batch, so each would shrink the "
                "batch the other one sized. Use one of them per Trainer (combine a selector with weighting or "
                "observing policies instead)."
            )
        setattr(pl_module, _ENGINE_ATTR, self)
        if getattr(trainer.strategy, "runs_selection_engine", False):
            return  # the strategy calls run_step itself
        current = pl_module.training_step
        if getattr(current, _WRAPPED_FLAG, False):
            return
        original = current

        @functools.wraps(original)
        def training_step(*args: Any, **kwargs: Any) -> Any:
            return self.run_step(pl_module, original, *args, **kwargs)

        setattr(training_step, _WRAPPED_FLAG, True)
        pl_module.training_step = training_step  # type: ignore[method-assign]

    def uninstall(self, pl_module: "pl.LightningModule") -> None:
        if getattr(pl_module.__dict__.get("training_step"), _WRAPPED_FLAG, False):
            del pl_module.training_step
        if pl_module.__dict__.get(_ENGINE_ATTR) is self:
            delattr(pl_module, _ENGINE_ATTR)

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage == "fit":  # also without policies: the engine then reduces per-sample outputs to a mean
            self.install(trainer, pl_module)

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # a schedule sized from the loader in configure_optimizers makes Lightning drop a resumed loader's
        # mid-epoch position; give it back before the first batch (see core.schedule.load_pending_loader_state)
        load_pending_loader_state(trainer)

    @override
    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        self.uninstall(pl_module)

    # ------------------------------------------------------------------ the pipeline
    def run_step(self, module: "pl.LightningModule", step_fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run one training step through the seven stages (see the module docstring)."""
        policies = [p for p in self.policies if p.is_active(module.trainer)]
        step = functools.partial(call_step, step_fn, args[1:], kwargs)
        ctx = self._context(module, policies, args, kwargs)
        self._score(ctx, policies, step)                     # 1
        subset = self._select(ctx, policies)                 # 2
        loss = self._train(ctx, policies, step, subset)      # 3-6
        if loss is None:  # a scalar loss, and no policy needs per-sample values
            if self._index_guard.problem is not None:  # no reduction to agree on: raise here (IndexGuard.check)
                self._index_guard.raise_refused(ctx, None)
            return ctx.output
        self._observe(ctx, policies)                         # 7
        self._log(ctx)
        return {**ctx.output, "loss": loss} if isinstance(ctx.output, dict) else loss

    def _context(self, module: "pl.LightningModule", policies: list["SelectionPolicy"], args: tuple,
                 kwargs: dict) -> StepContext:
        trainer = module.trainer
        batch, rest = args[0], args[1:]
        batch_idx = int(rest[0]) if rest else int(kwargs.get("batch_idx", 0))
        size = batch_size_of(batch)
        # Without active policies the indices are not needed: the engine only reduces per-sample outputs.
        indices = get_indices(batch, self.index_key) if policies else torch.arange(size)
        if indices.shape[0] != size:
            raise SelectionError(
                f"The batch holds {size} samples but {indices.shape[0]} sample indices; every sample needs one index."
            )
        self._index_guard.problem = None
        if policies:
            indices = self._index_guard.check(trainer, batch_idx, indices, self.allow_repeated_indices)
        every = self.log_every_n_steps or trainer.log_every_n_steps
        return StepContext(
            trainer=trainer, module=module, batch=batch, batch_idx=batch_idx, indices=indices, batch_size=size,
            rows=torch.arange(size, device=indices.device),
            should_log=trainer.logger is not None and batch_idx % every == 0,
        )

    def _score(self, ctx: StepContext, policies: list["SelectionPolicy"], step: Callable[[Any], Any]) -> None:
        """Stage 1: the no-grad scoring pass on the full batch."""
        scorers = [p for p in policies if p.needs_scores]
        if not scorers:
            return
        modes = {p.scoring_mode for p in scorers}
        if len(modes) > 1:
            raise SelectionError(f"Policies disagree on the scoring-pass mode: {sorted(modes)}; set one mode.")
        ctx.phase = "score"
        batch = ctx.batch
        for p in scorers:  # e.g. a downscaled input (SelectiveBackprop's scale_factor); rows stay aligned
            batch = p.scoring_batch(batch)
        with torch.no_grad(), module_mode(ctx.module, modes.pop()), muted_logging(ctx.module):
            ctx.output = step(batch)
            scores = per_sample_losses(ctx, policies, [type(p).__name__ for p in scorers], ctx.batch_size)
        assert scores is not None  # per_sample_losses raised for a scalar
        ctx.score_output, ctx.output = ctx.output, None
        ctx.scores, ctx.logits, ctx.phase = scores.detach(), None, "train"

    @staticmethod
    def _select(ctx: StepContext, policies: list["SelectionPolicy"]) -> bool:
        """Stage 2: narrow ``ctx.rows``; returns whether the batch must be subset."""
        subset = False
        for p in policies:
            keep = p.select(ctx)
            if keep is not None:
                ctx.rows = ctx.rows[keep.to(ctx.rows.device)]
                subset = True
        if subset and ctx.rows.numel() == 0:
            ctx.has_samples = False
            ctx.rows = torch.zeros(1, dtype=torch.long, device=ctx.indices.device)
        return subset

    def _train(self, ctx: StepContext, policies: list["SelectionPolicy"], step: Callable[[Any], Any],
               subset: bool) -> Optional[Tensor]:
        """Stages 3-6. A non-finite loss anywhere makes the global weighted sum non-finite, so every
        rank learns of it from the reduction's own all-reduce: "raise" raises everywhere and "skip"
        re-runs everywhere, keeping collectives in step."""
        need_per_sample = [type(p).__name__ for p in policies if p.needs_per_sample_loss]
        gather = any(p.needs_global_rows for p in policies)
        count_norm = any(p.normalise_by_count for p in policies)
        chunk_size = min([s for s in [self.embedding_chunk_size, *(p.embedding_chunk_size for p in policies)] if s],
                         default=None)
        grad_cache: Optional[GradCache] = None
        for attempt in (0, 1):
            ctx.sub_batch = select_batch(ctx.batch, ctx.rows, ctx.batch_size) if subset else ctx.batch
            if chunk_size:                                                           # 3
                grad_cache = GradCache.embed(step, ctx.sub_batch, chunk_size)
                ctx.output = grad_cache.output
            else:
                ctx.output = step(ctx.sub_batch)
            ctx.losses = per_sample_losses(ctx, policies, need_per_sample, ctx.rows.numel())  # 4
            if ctx.losses is None:
                return None
            ctx.weights = self._combined_weights(ctx, policies, ctx.losses)         # 5
            loss, finite = self._reduce(ctx, gather, count_norm)                    # 6
            if finite:
                break
            self._drop_nonfinite(ctx, attempt)
            subset = True
        term, owners = policy_loss_terms(ctx, policies)                              # 6b
        if grad_cache is not None:
            if term is not None:
                raise SelectionError(
                    f"{', '.join(owners)}.loss_terms() added a term to the loss, which cannot be combined "
                    "with the gradient-cached mode (embedding_chunk_size / mini_batch_size), whose backward "
                    "re-embeds chunk by chunk and would not back-propagate the extra term exactly once. Turn the "
                    "term off (e.g. fisher_alpha=0) or train without embedding_chunk_size."
                )
            loss = grad_cache.attach(loss, ctx.module)
        elif term is not None:
            loss = loss + term
        return loss

    def _reduce(self, ctx: StepContext, gather: bool, count_norm: bool = False) -> tuple[Tensor, bool]:
        """Stage 6: the globally normalised loss and whether it is finite (agreed on every rank).

        The denominator is the global weight sum, or with ``count_norm`` (a policy with importance
        weights, ``normalise_by_count``) the global number of trained rows, which keeps
        ``E[loss]`` unbiased."""
        assert ctx.losses is not None
        world_size, losses = ctx.world_size, ctx.losses
        if world_size == 1 and ctx.weights is None:
            loss = losses.mean()
            return loss, bool(torch.isfinite(loss.detach()))
        numerator, weight_sum = weighted_sum_parts(losses, ctx.weights)
        if count_norm:
            weight_sum = losses.new_tensor(float(losses.numel()) if ctx.has_samples else 0.0)
        parts = [weight_sum.reshape(1), numerator.detach().reshape(1)]
        if world_size > 1 and gather:  # each rank's row count, so the observers' gather needs no extra collective
            counts = losses.new_zeros(world_size)
            counts[ctx.trainer.global_rank] = float(ctx.rows.numel()) if ctx.has_samples else 0.0
            parts.append(counts.detach())
        if world_size > 1:  # each rank's index verdict (see IndexGuard.check), so a refused batch stops every rank
            parts.append(self._index_guard.verdicts(ctx, losses))
        totals = torch.cat(parts)
        if world_size > 1:
            totals = ctx.trainer.strategy.reduce(totals, reduce_op="sum")
            self._index_guard.raise_refused(ctx, totals[-world_size:])
            self._rows_per_rank = totals[2:-world_size].round().long().cpu() if gather else None
        return normalise(numerator, totals[0], world_size), bool(torch.isfinite(totals[1]))

    def _observe(self, ctx: StepContext, policies: list["SelectionPolicy"]) -> None:
        """Stage 7: one gather of every rank's trained rows (if an observer needs it), then ``observe``."""
        if any(p.needs_global_rows for p in policies):
            ctx.gathered = self._gather_rows(ctx, policies)
        for p in policies:
            p.observe(ctx)

    def _gather_rows(self, ctx: StepContext, policies: list["SelectionPolicy"]) -> dict[str, Tensor]:
        assert ctx.losses is not None
        names = sorted(ctx.sample_stats)
        local = {"index": ctx.kept_indices, "loss": ctx.losses.detach(), "weight": ctx.sample_weights.detach(),
                 **{k: ctx.sample_stats[k].detach() for k in names}}
        if ctx.world_size == 1:
            return local if ctx.has_samples else {k: v[:0] for k, v in local.items()}
        assert self._rows_per_rank is not None
        counts = self._rows_per_rank
        fixed = [p.gather_capacity for p in policies if getattr(p, "gather_capacity", None)]
        capacity = max(fixed) if fixed else int(counts.max())
        if int(counts.max()) > capacity:  # every rank holds the same counts, so every rank raises this
            owners = [type(p).__name__ for p in policies if getattr(p, "gather_capacity", None)]
            over = {r: int(c) for r, c in enumerate(counts.tolist()) if c > capacity}
            raise SelectionError(
                f"{', '.join(owners)} gather(s) at most capacity={capacity} rows per rank, but at batch "
                f"{ctx.batch_idx} rank(s) {list(over)} trained {list(over.values())} rows. Set capacity= to the "
                "largest per-rank batch size, or leave it None so that the ranks agree on it every step. "
                "Nothing was recorded for this step."
            )
        table = torch.stack([v.double().to(ctx.losses.device) for v in local.values()], dim=1)
        padded = table.new_full((max(capacity, 1), table.shape[1]), -1.0)
        if ctx.has_samples:
            padded[: table.shape[0]] = table
        gathered = ctx.all_gather(padded).reshape(-1, table.shape[1])
        gathered = gathered[gathered[:, 0] >= 0]
        out = {k: gathered[:, j] for j, k in enumerate(local)}
        out["index"] = out["index"].long()
        return out

    @staticmethod
    def _log(ctx: StepContext) -> None:
        if not ctx.should_log:
            return
        assert ctx.losses is not None
        ctx.log("select/kept_fraction", ctx.rows.numel() / ctx.batch_size if ctx.has_samples else 0.0)
        w = ctx.sample_weights
        ctx.log("select/weight_mean", w.mean())
        ctx.log("select/weight_ess_fraction", effective_sample_size(w) / w.numel())
        ctx.log("select/loss_mean", ctx.losses.detach().mean())

    @staticmethod
    def _combined_weights(ctx: StepContext, policies: list["SelectionPolicy"], losses: Tensor) -> Optional[Tensor]:
        """Stage 5: product of the policies' weights; None (= all ones) when no policy weights."""
        weights: Optional[Tensor] = None
        for p in policies:
            w = p.sample_weights(ctx)
            if w is not None:
                if w.shape != losses.shape:
                    raise SelectionError(
                        f"{type(p).__name__}.sample_weights returned shape {tuple(w.shape)}; "
                        f"expected {tuple(losses.shape)}."
                    )
                w = w.detach().to(losses)
                weights = w if weights is None else weights * w
        if not ctx.has_samples:
            weights = torch.zeros_like(losses.detach())
        return weights

    def _drop_nonfinite(self, ctx: StepContext, attempt: int) -> None:
        """Apply ``nan_policy`` after the reduction showed a non-finite loss on some rank.

        Every rank is here together (the reduction said so), so the per-rank counts and offending
        indices are exchanged with two more collectives, and every rank takes the same decision and
        raises the same error.
        """
        assert ctx.losses is not None
        raw = training_loss_of(ctx.output)
        bad = ~raw.finite_rows() if isinstance(raw, EmbeddingOutput) else torch.zeros_like(ctx.losses, dtype=torch.bool)
        bad = (bad | ~torch.isfinite(ctx.losses.detach())) if not bool(bad.any()) else bad
        bad = bad.to(ctx.rows.device) & ctx.has_samples
        local_bad = ctx.kept_indices[bad]
        counts, bad_indices = exchange_bad_rows(ctx, local_bad, int(ctx.rows.numel()) if ctx.has_samples else 0)
        where = (f"sample indices {bad_indices[:20]}" + (" ..." if len(bad_indices) > 20 else "")
                 if bad_indices else "no sample that is itself non-finite (a candidate shared across ranks?)")
        if attempt == 1:
            raise SelectionError(
                f"Re-running batch {ctx.batch_idx} without the non-finite samples still produced non-finite "
                f"losses ({where}); the model itself has diverged (lower the learning rate?)."
            )
        all_bad = [r for r, (b, n) in enumerate(counts) if n > 0 and b == n]
        if self.nan_policy == "raise":
            raise SelectionError(
                f"Non-finite loss or embedding for {where} at batch {ctx.batch_idx}; nothing was recorded for this "
                "step. Fix the data or model (e.g. lower the learning rate), or pass "
                "SelectionEngine(nan_policy='skip') to drop such samples with a warning."
            )
        if all_bad:
            raise SelectionError(
                f"Non-finite loss or embedding for every sample of batch {ctx.batch_idx} on rank(s) {all_bad} "
                f"({where}), so skipping them leaves nothing to train; nothing was recorded for this step. The "
                "model or the data is broken: check the inputs and lower the learning rate."
            )
        if bool(bad.any()):
            warnings.warn(
                f"lightning_select: skipping {int(bad.sum())} sample(s) with a non-finite loss at batch "
                f"{ctx.batch_idx}: indices {local_bad[:20].tolist()}",
                RuntimeWarning,
            )
        ctx.module.log("select/nonfinite_count", float(len(bad_indices)), on_step=True, on_epoch=True,
                       reduce_fx="sum", batch_size=1)
        ctx.rows = ctx.rows[~bad]
