"""What every policy sees during one training step: :class:`StepContext`, and the library's error type."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Optional

import torch
from torch import Tensor

from lightning_select.rules.contrastive import ContrastiveLogits, EmbeddingOutput

if TYPE_CHECKING:  # pragma: no cover
    import lightning.pytorch as pl

Phase = Literal["score", "train"]


class SelectionError(RuntimeError):
    """Raised when a batch, an option or a ``training_step`` output breaks the per-sample contract."""


def training_loss_of(output: Any) -> Any:
    """The loss part of a ``training_step`` output: ``output["loss"]`` for a dict, else ``output`` itself.

    Example::

        >>> training_loss_of({"loss": 1.0, "extra": 2}), training_loss_of(3.0)
        (1.0, 3.0)
    """
    return output.get("loss") if isinstance(output, dict) else output


@dataclass
class StepContext:
    """Everything the policies see during one training step.

    Positions (``rows``) index the full local batch; ``indices`` are the stable dataset indices
    carried by the batch, so ``kept_indices = indices[rows]``.

    Attributes:
        phase: ``"score"`` during the no-grad scoring pass (stage 1), ``"train"`` afterwards. Policies
            that record what was trained on check ``ctx.phase == "train"``.
        scores: ``[B]`` per-sample losses of the scoring pass (when a policy asked for it).
        score_output: the raw ``training_step`` output of the scoring pass (no grad), e.g. a dict
            with ``"logits"`` for policies that score with the softmax (see :meth:`output_field`).
        losses, weights: ``[len(rows)]`` per-sample losses and the final weights of the trained rows.
        has_samples: False when every row was deselected on this rank; one row is then trained with
            weight 0 so that DDP still sees every parameter and the gradient is not halved.
        sample_stats: extra ``[len(rows)]`` per-sample statistics that observers may record.
        gathered: after the reduction, the trained rows of *every* rank (``index``, ``loss``,
            ``weight`` and each ``sample_stats`` key), gathered once per step for every observer
            that sets ``needs_global_rows``; the local rows in a single process.
    """

    trainer: "pl.Trainer"
    module: "pl.LightningModule"
    batch: Any
    batch_idx: int
    indices: Tensor
    batch_size: int
    rows: Tensor
    phase: Phase = "train"
    scores: Optional[Tensor] = None
    score_output: Any = None
    sub_batch: Any = None
    output: Any = None
    logits: Optional[ContrastiveLogits] = None
    losses: Optional[Tensor] = None
    weights: Optional[Tensor] = None
    has_samples: bool = True
    sample_stats: dict[str, Tensor] = field(default_factory=dict)
    gathered: Optional[dict[str, Tensor]] = None
    should_log: bool = False

    @property
    def embedding_output(self) -> EmbeddingOutput:
        """The :class:`EmbeddingOutput` returned by ``training_step`` in the current phase."""
        out = training_loss_of(self.output)
        if not isinstance(out, EmbeddingOutput):
            raise SelectionError(f"training_step returned {type(out).__name__}, not an EmbeddingOutput.")
        return out

    def output_field(self, name: str, phase: Optional[Phase] = None) -> Optional[Tensor]:
        """``training_step``'s extra output ``name`` (e.g. ``"logits"``) of the scoring pass
        (``phase="score"``) or of the training pass (``"train"``; default: the current phase).

        A module returns extras next to its per-sample loss: ``{"loss": losses, "logits": logits}``.
        None when the output is not a dict or has no such key.

        Example::

            >>> ctx = StepContext(None, None, None, 0, torch.arange(2), 2, torch.arange(2),
            ...                   output={"loss": torch.ones(2), "logits": torch.zeros(2, 3)})
            >>> ctx.output_field("logits").shape
            torch.Size([2, 3])
        """
        out = self.score_output if phase == "score" and self.phase == "train" else self.output
        value = out.get(name) if isinstance(out, dict) else None
        return value if isinstance(value, Tensor) else None

    def row_column(self, key: str, owner: str, what: str, fix: str) -> Tensor:
        """The ``[len(rows)]`` batch column ``key`` of the trained rows (e.g. class targets, gold keys), or a
        :class:`SelectionError` saying that ``owner`` needs ``what`` under ``key``, what the batch holds, and ``fix``.

        Example::

            >>> ctx = StepContext(None, None, {"label": torch.tensor([1, 0])}, 0, torch.arange(2), 2, torch.arange(2))
            >>> ctx.row_column("label", "Policy", "class targets", "set target_key").tolist()
            [1, 0]
        """
        n = self.rows.numel()
        batch = self.sub_batch if self.sub_batch is not None else self.batch
        value = batch.get(key) if isinstance(batch, dict) else None
        if not isinstance(value, Tensor) or value.dim() != 1 or value.shape[0] != n:
            keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
            raise SelectionError(f"{owner} needs the batch to hold [{n}] {what} under {key!r}, but the batch has "
                                 f"{keys}; {fix}.")
        return value

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
        """Log ``value`` through Lightning's logger at the engine's logging cadence."""
        if self.should_log:
            self.module.log(name, value, on_step=True, on_epoch=False, batch_size=int(self.rows.numel()))
