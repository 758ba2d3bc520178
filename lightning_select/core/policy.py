"""The policy base class: a thin Lightning ``Callback`` around a pure tensor rule."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, Optional

from lightning.pytorch.callbacks import Callback
from torch import Tensor

from lightning_select.core.context import StepContext
from lightning_select.core.engine import SelectionEngine, override
from lightning_select.rules.contrastive import ContrastiveLogits


if TYPE_CHECKING:  # pragma: no cover
    import lightning.pytorch as pl


class SelectionPolicy(Callback):
    """Base class of every lightning_select policy: a thin Callback around a pure tensor rule.

    Subclasses override only the stages they take part in (see :mod:`lightning_select.core.engine`).
    Class attributes declare what a policy needs; the engine reads them, nothing else:

    Attributes:
        order: position within each stage (lower first); ties keep the callback order.
        needs_scores: request the no-grad scoring pass (stage 1).
        scoring_mode: ``"eval"`` or ``"train"`` mode for the scoring pass (BatchNorm statistics are
            updated in train mode).
        needs_per_sample_loss: the policy cannot work with a scalar ``training_step`` loss.
        needs_embeddings: the policy edits contrastive logits, so ``training_step`` must return an
            :class:`~lightning_select.rules.contrastive.EmbeddingOutput`.
        needs_global_rows: :meth:`observe` reads ``ctx.gathered``, every rank's trained rows, which
            the engine gathers once per step for all such observers.
        loads_larger_batch: the policy trains a fraction of a larger loaded batch (the loader's batch
            size is set for it). Two such policies in one Trainer are refused at setup, since each
            would shrink the batch the other sized.
        normalise_by_count: the policy's weights are importance weights (mean 1 in expectation): the
            reduction then divides by the global number of trained rows instead of the weight sum,
            so the loss estimate stays unbiased (a self-normalised mean would be slightly biased).
        embedding_chunk_size: request the gradient-cached mode with chunks of this many rows (the
            smallest request wins); None for the plain mode.

    Example::

        >>> import torch
        >>> class KeepEven(SelectionPolicy):
        ...     def select(self, ctx):
        ...         return ctx.kept_indices % 2 == 0
        >>> KeepEven().order
        100
    """

    is_selection_policy: bool = True  # how the engine finds policies among the trainer's callbacks
    order: int = 100
    needs_scores: bool = False
    scoring_mode: Literal["eval", "train"] = "eval"
    needs_per_sample_loss: bool = True
    needs_embeddings: bool = False
    needs_global_rows: bool = False
    normalise_by_count: bool = False
    loads_larger_batch: bool = False
    embedding_chunk_size: Optional[int] = None

    def is_active(self, trainer: "pl.Trainer") -> bool:
        """Whether the policy takes part in the current step (e.g. after a warm-up). Same on every rank."""
        return True

    def scoring_batch(self, batch: Any) -> Any:
        """The batch the scoring pass runs on (default: the loaded batch). It must keep the rows' order
        and count, e.g. a downscaled image tensor; the training pass always sees the loaded batch."""
        return batch

    def select(self, ctx: StepContext) -> Optional[Tensor]:
        """Return a ``[len(ctx.rows)]`` bool keep-mask or int positions into ``ctx.rows``, or None."""
        return None

    def edit_logits(self, ctx: StepContext, logits: ContrastiveLogits) -> None:
        """Edit contrastive logits in place (add blocks or masks). Runs in both phases."""

    def sample_weights(self, ctx: StepContext) -> Optional[Tensor]:
        """Return ``[len(ctx.rows)]`` non-negative weights, or None for all ones."""
        return None

    def loss_terms(self, ctx: StepContext) -> Optional[Tensor]:
        """Return a scalar to add to the step's reduced loss (e.g. a regulariser), or None.

        Called once per trained step (micro-batch), after the reduction (stage 6) and before the
        observers; the engine sums the terms of every policy, adds them to the training loss and logs
        the sum as ``select/penalty`` (log your own term as ``<policy>/penalty``). Under DDP each rank
        adds its own term and DDP averages the gradients, so a term that is the same on every rank
        (e.g. a function of the parameters only) contributes exactly its own gradient. The term must
        be finite and computed from values every rank holds: a non-finite term raises on every rank.
        Refused in the gradient-cached mode (``embedding_chunk_size``); not called when
        ``training_step`` returns a scalar loss (no per-sample reduction runs then).
        """
        return None

    def observe(self, ctx: StepContext) -> None:
        """Record what happened (``ctx.losses``, ``ctx.gathered`` when ``needs_global_rows``)."""

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage == "fit":
            SelectionEngine.ensure_installed(trainer, pl_module)
