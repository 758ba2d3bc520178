"""The parts of one engine step that need no engine state.

:class:`~lightning_select.core.engine.SelectionEngine` runs the stages; this module holds what they
call: the per-sample loss contract (stage 4), the policies' additive loss terms (stage 6b), how the
user's ``training_step`` is called, the module-mode helpers of the scoring pass, and the sample-index
guard whose verdict rides on the reduction's all-reduce.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

import torch
from torch import Tensor

from lightning_select.core.batch import INDEX_REFUSALS, SampleIndexError, index_value_problem
from lightning_select.core.context import SelectionError, StepContext, training_loss_of
from lightning_select.rules.contrastive import EmbeddingOutput, build_logits

if TYPE_CHECKING:  # pragma: no cover
    import lightning.pytorch as pl

    from lightning_select.core.policy import SelectionPolicy


def per_sample_losses(ctx: StepContext, policies: list["SelectionPolicy"], requesters: list[str],
                      expected: int) -> Optional[Tensor]:
    """Stage 4: ``[expected]`` fp32 per-sample losses of ``ctx.output`` (None for a permitted scalar)."""
    raw = training_loss_of(ctx.output)
    if isinstance(raw, EmbeddingOutput):
        ctx.logits = build_logits(raw)
        for p in policies:
            p.edit_logits(ctx, ctx.logits)
        return ctx.logits.per_row_loss()
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


def policy_loss_terms(ctx: StepContext, policies: list["SelectionPolicy"]) -> tuple[Optional[Tensor], list[str]]:
    """Stage 6b: the sum of the policies' ``loss_terms`` (None when none adds one) and who added one.

    Added once per micro-batch, after the finite check of the per-sample losses. A term must be the
    same on every rank (see ``loss_terms``), so its own finite check is agreed without a collective."""
    total: Optional[Tensor] = None
    owners: list[str] = []
    for p in policies:
        term = p.loss_terms(ctx)
        if term is None:
            continue
        owners.append(type(p).__name__)
        if not isinstance(term, Tensor) or term.dim() != 0 or not term.is_floating_point():
            raise SelectionError(f"{type(p).__name__}.loss_terms must return a float scalar tensor or None, "
                                 f"but returned {term!r}.")
        if not bool(torch.isfinite(term.detach())):
            raise SelectionError(f"{type(p).__name__}.loss_terms returned a non-finite value "
                                 f"({float(term.detach())}) at batch {ctx.batch_idx}; the parameters have "
                                 "diverged (lower the learning rate or the term's weight).")
        total = term.float() if total is None else total + term.float()
    if total is not None:
        ctx.log("select/penalty", total.detach())
    return total, owners


def call_step(step_fn: Callable[..., Any], rest: tuple, kwargs: dict, batch: Any) -> Any:
    """The user's ``training_step`` on ``batch`` with the original ``batch_idx`` (and other) arguments."""
    return step_fn(batch, *rest, **kwargs)


@contextlib.contextmanager
def module_mode(module: torch.nn.Module, mode: str) -> Iterator[None]:
    was_training = module.training
    module.train(mode == "train")
    try:
        yield
    finally:
        module.train(was_training)


@contextlib.contextmanager
def muted_logging(module: "pl.LightningModule") -> Iterator[None]:
    """Silence ``self.log``/``self.log_dict`` during the scoring pass so metrics are not doubled."""
    noop = lambda *a, **k: None  # noqa: E731
    module.log, module.log_dict = noop, noop  # type: ignore[method-assign]
    try:
        yield
    finally:
        del module.log, module.log_dict


class IndexGuard:
    """Refuses negative and repeated sample indices so that every rank raises together.

    ``problem`` is this rank's refusal of the current batch: ``(kind, offending values)`` or None.
    """

    def __init__(self) -> None:
        self.problem: Optional[tuple[str, list[int]]] = None

    def check(self, trainer: "pl.Trainer", batch_idx: int, indices: Tensor, allow_repeated: bool) -> Tensor:
        """Refuse negative and (unless ``allow_repeated_indices``) repeated indices before anything runs.

        Missing, float/bool and misshapen indices were already refused by ``get_indices``; they depend
        only on the dataset and collate function, so every rank raises them at the same point, before
        any collective. Values can differ between ranks, so under DDP a refused batch is not raised
        here (this rank alone would raise while the others wait in the reduction's all-reduce): the
        verdict rides on that all-reduce (:meth:`verdicts`) and every rank raises together,
        before any observer records or any gradient exists. Until then this rank runs on stand-in
        indices clamped to ``>= 0``. In one process the error is raised at once.
        """
        self.problem = index_value_problem(indices, allow_repeated)
        if self.problem is None:
            return indices
        if trainer.world_size == 1:
            kind, values = self.problem
            raise SampleIndexError(
                f"Refused the sample indices of batch {batch_idx}: {INDEX_REFUSALS[kind]}. Offending values: "
                f"{values}. Nothing was recorded for this step."
            )
        return indices.clamp(min=0)

    def verdicts(self, ctx: StepContext, like: Tensor) -> Tensor:
        """``[W]`` zeros, with this rank's refusal code (1 + position in ``INDEX_REFUSALS``) at its rank."""
        verdicts = like.new_zeros(ctx.world_size)
        if self.problem is not None:
            verdicts[ctx.trainer.global_rank] = 1.0 + list(INDEX_REFUSALS).index(self.problem[0])
        return verdicts.detach()

    def raise_refused(self, ctx: StepContext, verdicts: Optional[Tensor]) -> None:
        """Raise the same :class:`SampleIndexError` on every rank if any rank refused its indices.

        ``verdicts`` is the all-reduced :meth:`verdicts`; None raises for this rank alone."""
        if verdicts is None:
            assert self.problem is not None
            codes = {ctx.trainer.global_rank: 1 + list(INDEX_REFUSALS).index(self.problem[0])}
        else:
            codes = {r: int(round(v)) for r, v in enumerate(verdicts.tolist()) if v > 0}
        if not codes:
            return
        kinds = list(INDEX_REFUSALS)
        what = "; ".join(f"rank {r}: {INDEX_REFUSALS[kinds[c - 1]]}" for r, c in codes.items())
        detail = f" This rank's offending values: {self.problem[1]}." if self.problem else ""
        raise SampleIndexError(
            f"Rank(s) {list(codes)} refused their sample indices at batch {ctx.batch_idx} ({what}). Every rank stops "
            f"here; nothing was recorded for this step.{detail}"
        )
