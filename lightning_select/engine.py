"""The per-step selection engine: one pipeline per training step.

Every training step with at least one active :class:`SelectionPolicy` runs these stages, in order:

1. **Scoring** (only if a policy sets ``needs_scores``): a no-grad pass of the user's
   ``training_step`` on the full batch, in ``"eval"`` or ``"train"`` mode, with ``self.log`` muted.
   Result: ``ctx.scores`` (``[B]`` per-sample losses).
2. **Selection**: each policy's :meth:`~SelectionPolicy.select` narrows ``ctx.rows``; the batch is
   subset (dicts, tuples, lists, dataclasses, tensors and lists of strings).
3. **The user's training_step** on the subset.
4. **Logit edits**: for an :class:`~lightning_select.contrastive.EmbeddingOutput`, policies edit
   the :class:`~lightning_select.contrastive.ContrastiveLogits` (e.g. mask false negatives), and
   the engine turns them into per-row InfoNCE losses. Per-sample losses are always fp32.
5. **Weights**: the product of every policy's :meth:`~SelectionPolicy.sample_weights`.
6. **Reduction** to one scalar, globally normalised under DDP (see :mod:`~lightning_select.reduction`).
7. **Observers**: each policy's :meth:`~SelectionPolicy.observe` (e.g. :class:`LossHistory`).

Within a stage, policies run in ascending ``order`` and then in their position in
``Trainer(callbacks=...)``: deterministic and documented.

The engine installs itself in one of two ways, both running :meth:`SelectionEngine.run_step`:

* by wrapping ``LightningModule.training_step`` when a policy is set up under any stock strategy
  (``auto``, single device, ``ddp``, ``ddp_spawn``); the wrapper runs inside DDP's forward
  redirection and is removed at teardown;
* as a registered strategy (``strategy="ddp_select"`` / ``"single_device_select"``, see
  :mod:`~lightning_select.strategies`) which calls the engine from ``Strategy.training_step``.

Add a :class:`SelectionEngine` callback only to change its settings (index key, NaN policy, logging
cadence); otherwise a default engine is created by the first policy.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Literal, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from lightning_select.batch import IndexKey, batch_size_of, get_indices, select_batch
from lightning_select.contrastive import ContrastiveLogits, EmbeddingOutput, build_logits
from lightning_select.reduction import effective_sample_size, normalise, weighted_sum_parts

try:  # lightning >= 2.1
    from typing_extensions import override
except ImportError:  # pragma: no cover
    def override(f):  # type: ignore[no-redef]
        return f

_WRAPPED_FLAG = "__lightning_select_wrapped__"
_ENGINE_ATTR = "_lightning_select_engine"


class SelectionError(RuntimeError):
    """Raised when a batch or a ``training_step`` output breaks the per-sample contract."""


@dataclass
class StepContext:
    """Everything the policies see during one training step.

    Positions (``rows``) index the full local batch; ``indices`` are the stable dataset indices
    carried by the batch. ``kept_indices = indices[rows]``.
    """

    trainer: "pl.Trainer"
    module: "pl.LightningModule"
    batch: Any
    batch_idx: int
    indices: Tensor
    batch_size: int
    rows: Tensor
    scores: Optional[Tensor] = None
    sub_batch: Any = None
    output: Any = None
    logits: Optional[ContrastiveLogits] = None
    losses: Optional[Tensor] = None
    weights: Optional[Tensor] = None
    #: False when every row was deselected on this rank; one row is then trained with weight 0 so
    #: that DDP still sees every parameter and the gradient is not halved.
    has_samples: bool = True
    #: Extra per-sample statistics (``[len(rows)]`` tensors) that observers may record.
    sample_stats: dict[str, Tensor] = field(default_factory=dict)
    should_log: bool = False

    @property
    def sample_weights(self) -> Tensor:
        """The final ``[len(rows)]`` weights (ones when no policy weighted)."""
        if self.weights is not None:
            return self.weights
        assert self.losses is not None
        return torch.ones_like(self.losses.detach())

    @property
    def kept_indices(self) -> Tensor:
        return self.indices.index_select(0, self.rows.to(self.indices.device))

    @property
    def world_size(self) -> int:
        return self.trainer.world_size

    def all_gather(self, tensor: Tensor) -> Tensor:
        """``[W, *shape]`` gather across ranks (``[1, *shape]`` in a single process). Equal shapes required."""
        if self.trainer.world_size == 1:
            return tensor.unsqueeze(0)
        return self.trainer.strategy.all_gather(tensor)

    def generator(self, seed: int) -> torch.Generator:
        """A CPU generator seeded by ``(seed, epoch, batch_idx, rank)``.

        Random selections drawn from it are a pure function of where training is, so they are
        reproducible, differ across ranks, and resume exactly without checkpointing any RNG state.
        """
        key = ((seed * 1_000_003 + self.trainer.current_epoch) * 1_000_033 + self.batch_idx) * 8_191
        return torch.Generator().manual_seed((key + self.trainer.global_rank) % (2**63 - 1))

    def log(self, name: str, value: Any) -> None:
        """Log ``value`` through Lightning's logger at the trainer's logging cadence."""
        if self.should_log:
            self.module.log(name, value, on_step=True, on_epoch=False, batch_size=int(self.rows.numel()))


class SelectionPolicy(Callback):
    """Base class of every lightning_select policy: a thin Callback around a pure tensor rule.

    Subclasses override only the stages they take part in. Class attributes declare behaviour:

    Attributes:
        order: position within each stage (lower first); ties keep the callback order.
        needs_scores: request the no-grad scoring pass (stage 1).
        needs_per_sample_loss: the policy cannot work with a scalar ``training_step`` loss.
        needs_embeddings: the policy edits contrastive logits, so ``training_step`` must return an
            :class:`~lightning_select.contrastive.EmbeddingOutput`.
        scoring_mode: ``"eval"`` or ``"train"`` mode for the scoring pass (BatchNorm statistics are
            updated in train mode).
    """

    order: int = 100
    needs_scores: bool = False
    needs_per_sample_loss: bool = True
    needs_embeddings: bool = False
    scoring_mode: Literal["eval", "train"] = "eval"

    def is_active(self, trainer: "pl.Trainer") -> bool:
        """Whether the policy takes part in the current step (e.g. after a warm-up)."""
        return True

    def select(self, ctx: StepContext) -> Optional[Tensor]:
        """Return a ``[len(ctx.rows)]`` bool keep-mask or int positions into ``ctx.rows``, or None."""
        return None

    def edit_logits(self, ctx: StepContext, logits: ContrastiveLogits) -> None:
        """Edit contrastive logits in place (add blocks or masks)."""

    def sample_weights(self, ctx: StepContext) -> Optional[Tensor]:
        """Return ``[len(ctx.rows)]`` non-negative weights, or None for all ones."""
        return None

    def observe(self, ctx: StepContext) -> None:
        """Record what happened (losses are ``ctx.losses.detach()``)."""

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage == "fit":
            SelectionEngine.ensure_installed(trainer, pl_module)


class SelectionEngine(Callback):
    """Runs the per-step pipeline for every :class:`SelectionPolicy` in the trainer.

    Args:
        index_key: where batches carry sample indices (dict key, or tuple position).
        nan_policy: what to do with a non-finite per-sample loss: ``"raise"`` (default; nothing is
            recorded for the step) or ``"skip"`` (warn, log ``select/nonfinite_count`` and re-run the
            step without those samples, so that no NaN reaches the gradient or any history).
        log_every_n_steps: logging cadence of the engine's and policies' statistics; defaults to
            the trainer's ``log_every_n_steps``.
        embedding_chunk_size: gradient-cached contrastive mode (GradCache, as in
            sentence-transformers' Cached* losses): ``training_step`` runs on chunks of this many rows
            without grad, the loss and its gradients w.r.t. the embeddings are computed on the full
            batch, and during ``backward`` each chunk is re-embedded with grad (same RNG state) and
            back-propagated. Peak activation memory is that of one chunk. Requires an
            :class:`~lightning_select.contrastive.EmbeddingOutput`. Policies may also request it
            (``GuidedNegatives(mini_batch_size=...)``); the smallest size wins.

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
    ) -> None:
        if embedding_chunk_size is not None and embedding_chunk_size < 1:
            raise ValueError(f"Expected `embedding_chunk_size` >= 1 (or None), but got {embedding_chunk_size}.")
        self.embedding_chunk_size = embedding_chunk_size
        if nan_policy not in ("raise", "skip"):
            raise ValueError(f"Expected `nan_policy` to be 'raise' or 'skip', but got {nan_policy!r}.")
        if log_every_n_steps is not None and log_every_n_steps < 1:
            raise ValueError(f"Expected `log_every_n_steps` >= 1, but got {log_every_n_steps}.")
        self.index_key = index_key
        self.nan_policy = nan_policy
        self.log_every_n_steps = log_every_n_steps
        self.policies: list[SelectionPolicy] = []
        self._trainer: Optional["pl.Trainer"] = None

    # ------------------------------------------------------------------ installation
    @staticmethod
    def ensure_installed(trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> "SelectionEngine":
        """Find (or create) the trainer's engine and install it on ``pl_module``. Idempotent."""
        engines = [cb for cb in trainer.callbacks if isinstance(cb, SelectionEngine)]
        if len(engines) > 1:
            raise ValueError("Expected at most one SelectionEngine callback, but got %d." % len(engines))
        existing = getattr(pl_module, _ENGINE_ATTR, None)
        engine = engines[0] if engines else (existing or SelectionEngine())
        engine.install(trainer, pl_module)
        return engine

    def install(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        from lightning_select.strategies import SelectStrategyMixin

        if not pl_module.automatic_optimization:
            raise SelectionError(
                f"lightning_select policies need automatic optimization, but {type(pl_module).__name__} sets "
                "`automatic_optimization = False`. With manual optimization, call the pure functions "
                "(e.g. `weighted_global_mean`, `LossHistory.update`) from your own training_step instead."
            )
        self._trainer = trainer
        positioned = [(cb.order, i, cb) for i, cb in enumerate(trainer.callbacks) if isinstance(cb, SelectionPolicy)]
        self.policies = [cb for _, _, cb in sorted(positioned, key=lambda t: (t[0], t[1]))]
        setattr(pl_module, _ENGINE_ATTR, self)
        if isinstance(trainer.strategy, SelectStrategyMixin):
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
    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        self.uninstall(pl_module)

    # ------------------------------------------------------------------ the pipeline
    def run_step(self, module: "pl.LightningModule", step_fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run one training step through the seven stages (see the module docstring)."""
        trainer = module.trainer
        policies = [p for p in self.policies if p.is_active(trainer)]
        batch, rest = args[0], args[1:]
        batch_idx = int(rest[0]) if rest else int(kwargs.get("batch_idx", 0))
        size = batch_size_of(batch)
        # Without active policies the indices are not needed: the engine only reduces per-sample outputs.
        indices = get_indices(batch, self.index_key) if policies else torch.arange(size)
        if indices.shape[0] != size:
            raise SelectionError(
                f"The batch holds {size} samples but {indices.shape[0]} sample indices; every sample needs one index."
            )
        every = self.log_every_n_steps or trainer.log_every_n_steps
        ctx = StepContext(
            trainer=trainer,
            module=module,
            batch=batch,
            batch_idx=batch_idx,
            indices=indices,
            batch_size=size,
            rows=torch.arange(size, device=indices.device),
            should_log=trainer.logger is not None and batch_idx % every == 0,
        )
        need_per_sample = [type(p).__name__ for p in policies if p.needs_per_sample_loss]

        # 1. scoring pass
        scorers = [p for p in policies if p.needs_scores]
        if scorers:
            modes = {p.scoring_mode for p in scorers}
            if len(modes) > 1:
                raise SelectionError(f"Policies disagree on the scoring-pass mode: {sorted(modes)}; set one mode.")
            with torch.no_grad(), _scoring_mode(module, modes.pop()), _muted_logging(module):
                out = step_fn(batch, *rest, **kwargs)
                ctx.scores = self._per_sample_losses(out, ctx, policies, [type(p).__name__ for p in scorers], size)
                if ctx.scores is None:  # pragma: no cover - _per_sample_losses raised already
                    raise SelectionError("scoring pass returned no per-sample losses")
                ctx.scores = ctx.scores.detach()
                ctx.logits = None

        # 2. selection
        subset = False
        for p in policies:
            keep = p.select(ctx)
            if keep is not None:
                ctx.rows = ctx.rows[keep.to(ctx.rows.device)]
                subset = True
        if subset and ctx.rows.numel() == 0:
            ctx.has_samples = False
            ctx.rows = torch.zeros(1, dtype=torch.long, device=indices.device)

        # 3-6: the user's step, logit edits and per-sample losses, weights, reduction. A non-finite
        # loss makes the (global) weighted sum non-finite, so every rank learns of it through the
        # reduction's own all-reduce (no extra collective): "raise" raises everywhere and "skip"
        # re-runs everywhere, keeping collectives in step.
        world_size = trainer.world_size
        chunk_size = self._chunk_size(policies)
        grad_cache: Optional[_GradCache] = None
        for attempt in (0, 1):
            ctx.sub_batch = select_batch(batch, ctx.rows, size) if subset else batch
            if chunk_size:
                grad_cache = _GradCache.embed(step_fn, ctx.sub_batch, chunk_size, rest, kwargs)
                ctx.output = grad_cache.output
            else:
                ctx.output = step_fn(ctx.sub_batch, *rest, **kwargs)
            losses = self._per_sample_losses(ctx.output, ctx, policies, need_per_sample, ctx.rows.numel())
            if losses is None:
                return ctx.output  # scalar loss and no policy needs per-sample values
            ctx.losses = losses
            ctx.weights = self._combined_weights(ctx, policies, losses)
            if world_size == 1 and ctx.weights is None:
                loss = losses.mean()
                finite = bool(torch.isfinite(loss.detach()))
            else:
                numerator, weight_sum = weighted_sum_parts(losses, ctx.weights)
                totals = torch.stack([weight_sum, numerator.detach()])
                if world_size > 1:
                    totals = trainer.strategy.reduce(totals, reduce_op="sum")
                loss = normalise(numerator, totals[0], world_size)
                finite = bool(torch.isfinite(totals[1]))
            if finite:
                break
            self._drop_nonfinite(ctx, attempt)
            subset = True
        if grad_cache is not None:
            loss = grad_cache.attach(loss, module)

        # 7. observers
        for p in policies:
            p.observe(ctx)

        if ctx.should_log:
            ctx.log("select/kept_fraction", ctx.rows.numel() / size if ctx.has_samples else 0.0)
            w = ctx.sample_weights
            ctx.log("select/weight_mean", w.mean())
            ctx.log("select/weight_ess_fraction", effective_sample_size(w) / w.numel())
            ctx.log("select/loss_mean", losses.detach().mean())
        out = ctx.output
        if isinstance(out, dict):
            return {**out, "loss": loss}
        return loss

    def _chunk_size(self, policies: list[SelectionPolicy]) -> Optional[int]:
        sizes = [s for s in [self.embedding_chunk_size, *(getattr(p, "embedding_chunk_size", None) for p in policies)]
                 if s]
        return min(sizes) if sizes else None

    @staticmethod
    def _combined_weights(ctx: StepContext, policies: list[SelectionPolicy], losses: Tensor) -> Optional[Tensor]:
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
        """Apply ``nan_policy`` after some rank produced a non-finite loss: raise, or narrow ``ctx.rows``."""
        assert ctx.losses is not None
        raw = ctx.output.get("loss") if isinstance(ctx.output, dict) else ctx.output
        bad = ~raw.finite_rows() if isinstance(raw, EmbeddingOutput) else torch.zeros_like(ctx.losses, dtype=torch.bool)
        bad = (bad | ~torch.isfinite(ctx.losses.detach())) if not bool(bad.any()) else bad
        bad = bad.to(ctx.rows.device)
        bad_indices = ctx.kept_indices[bad].tolist() if ctx.has_samples else []
        where = f"sample indices {bad_indices[:20]}" if bad_indices else "another rank's samples"
        if attempt == 1:
            raise SelectionError(
                f"Re-running batch {ctx.batch_idx} without the non-finite samples still produced non-finite "
                f"losses ({where}); the model itself has diverged (lower the learning rate?)."
            )
        if self.nan_policy == "raise" or (bad_indices and bool(bad.all())):
            reason = "every sample of the batch is affected, so " if self.nan_policy == "skip" else ""
            raise SelectionError(
                f"Non-finite loss or embedding for {where} at batch {ctx.batch_idx}; {reason}nothing was "
                "recorded for this step. Fix the data or model (e.g. lower the learning rate), or pass "
                "SelectionEngine(nan_policy='skip') to drop such samples with a warning."
            )
        if bad_indices:
            warnings.warn(
                f"lightning_select: skipping {len(bad_indices)} sample(s) with a non-finite loss at batch "
                f"{ctx.batch_idx}: indices {bad_indices[:20]}",
                RuntimeWarning,
            )
        ctx.module.log(
            "select/nonfinite_count", float(len(bad_indices)), on_step=True, on_epoch=True, reduce_fx="sum",
            batch_size=1,
        )
        ctx.rows = ctx.rows[~bad]

    def _per_sample_losses(
        self, out: Any, ctx: StepContext, policies: list[SelectionPolicy], requesters: list[str], expected: int
    ) -> Optional[Tensor]:
        raw = out.get("loss") if isinstance(out, dict) else out
        if isinstance(raw, EmbeddingOutput):
            logits = build_logits(raw)
            ctx.logits = logits
            for p in policies:
                p.edit_logits(ctx, logits)
            return logits.per_row_loss()
        embedders = [type(p).__name__ for p in policies if p.needs_embeddings]
        if embedders:
            raise SelectionError(
                f"{', '.join(embedders)} edit(s) contrastive logits, but training_step returned "
                f"{type(raw).__name__}. Return an EmbeddingOutput(anchor=..., positive=..., negatives=...) instead."
            )
        if not isinstance(raw, Tensor):
            raise SelectionError(
                f"training_step returned {type(raw).__name__}; lightning_select expects a [B] per-sample loss "
                "tensor, a dict whose 'loss' is [B], or an EmbeddingOutput."
            )
        if raw.dim() == 0:
            if requesters:
                raise SelectionError(
                    f"training_step returned a scalar loss, but {', '.join(requesters)} need(s) per-sample losses. "
                    "Return the unreduced loss instead, e.g. `F.cross_entropy(logits, y, reduction='none')` "
                    "(shape [B]), or a dict {'loss': per_sample_losses}, or an EmbeddingOutput."
                )
            return None
        if raw.dim() != 1 or raw.shape[0] != expected:
            raise SelectionError(
                f"Expected training_step to return per-sample losses of shape [{expected}], but got "
                f"{tuple(raw.shape)}. Reduce any extra dimensions per sample (e.g. `.mean(dim=1)`)."
            )
        return raw.float()


class _GradCache:
    """Chunked, gradient-cached embedding: see ``SelectionEngine(embedding_chunk_size=...)``."""

    def __init__(self, output: EmbeddingOutput, leaves: list[Tensor], chunks: list[tuple[Tensor, Any]],
                 step_fn: Callable[..., Any], batch: Any, size: int, rest: tuple, kwargs: dict,
                 autocast: tuple[str, bool, torch.dtype]) -> None:
        self.output, self.leaves, self.chunks = output, leaves, chunks
        self.step_fn, self.batch, self.size, self.rest, self.kwargs = step_fn, batch, size, rest, kwargs
        self.autocast = autocast

    @classmethod
    def embed(cls, step_fn: Callable[..., Any], batch: Any, chunk_size: int, rest: tuple, kwargs: dict) -> "_GradCache":
        size = batch_size_of(batch)
        outs, chunks = [], []
        with torch.no_grad():
            for start in range(0, size, chunk_size):
                rows = torch.arange(start, min(size, start + chunk_size))
                rng = torch.get_rng_state(), (torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None)
                out = step_fn(select_batch(batch, rows, size), *rest, **kwargs)
                if not isinstance(out, EmbeddingOutput):
                    raise SelectionError(
                        "The gradient-cached mode (embedding_chunk_size / mini_batch_size) needs training_step to "
                        f"return an EmbeddingOutput, but it returned {type(out).__name__}."
                    )
                outs.append(out)
                chunks.append((rows, rng))
        anchor = torch.cat([o.anchor for o in outs]).requires_grad_(True)
        positive = torch.cat([o.positive for o in outs]).requires_grad_(True)
        negatives = None
        if outs[0].negatives is not None:
            negatives = torch.cat([o.negatives for o in outs]).requires_grad_(True)  # type: ignore[misc]
        leaves = [t for t in (anchor, positive, negatives) if t is not None]
        device = anchor.device.type
        autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        output = EmbeddingOutput(anchor, positive, negatives, outs[0].temperature)
        return cls(output, leaves, chunks, step_fn, batch, size, rest, kwargs, autocast)

    def attach(self, loss: Tensor, module: torch.nn.Module) -> Tensor:
        """Cache d loss / d embeddings now; return a leaf whose backward re-embeds chunk by chunk."""
        embedding_grads = torch.autograd.grad(loss, self.leaves)
        params = [p for p in module.parameters() if p.requires_grad]
        cache = self

        def backward_hook(grad_output: Tensor) -> None:
            totals: list[Optional[Tensor]] = [None] * len(params)
            device, enabled, dtype = cache.autocast
            for rows, (cpu_rng, cuda_rng) in cache.chunks:
                saved = torch.get_rng_state(), (torch.cuda.get_rng_state_all() if cuda_rng is not None else None)
                torch.set_rng_state(cpu_rng)
                if cuda_rng is not None:
                    torch.cuda.set_rng_state_all(cuda_rng)
                with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
                    out = cache.step_fn(select_batch(cache.batch, rows, cache.size), *cache.rest, **cache.kwargs)
                torch.set_rng_state(saved[0])
                if saved[1] is not None:
                    torch.cuda.set_rng_state_all(saved[1])
                pieces = [out.anchor, out.positive] + ([out.negatives] if out.negatives is not None else [])
                grads = [g[rows.to(g.device)] * grad_output for g in embedding_grads]
                # autograd.grad does not run AccumulateGrad, so DDP's hooks fire once, below, not per chunk
                chunk_grads = torch.autograd.grad(pieces, params, grads, allow_unused=True)
                for k, g in enumerate(chunk_grads):
                    if g is not None:
                        totals[k] = g if totals[k] is None else totals[k] + g  # type: ignore[operator]
            with torch.enable_grad():  # hooks run with grad mode off
                surrogate = sum((p * g).sum() for p, g in zip(params, totals) if g is not None)
            if isinstance(surrogate, Tensor):
                surrogate.backward()

        leaf = loss.detach().requires_grad_(True)
        leaf.register_hook(backward_hook)
        return leaf


@contextlib.contextmanager
def _scoring_mode(module: torch.nn.Module, mode: str) -> Iterator[None]:
    was_training = module.training
    module.train(mode == "train")
    try:
        yield
    finally:
        module.train(was_training)


@contextlib.contextmanager
def _muted_logging(module: "pl.LightningModule") -> Iterator[None]:
    """Silence ``self.log``/``self.log_dict`` during the scoring pass so metrics are not doubled."""
    noop = lambda *a, **k: None  # noqa: E731
    module.log, module.log_dict = noop, noop  # type: ignore[method-assign]
    try:
        yield
    finally:
        del module.log, module.log_dict
