"""Small distributed helpers shared by the policies: dataset size, and decisions every rank takes together."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from lightning_select.core.context import SelectionError

if TYPE_CHECKING:  # pragma: no cover
    import lightning.pytorch as pl


def train_dataset_size(trainer: "pl.Trainer", who: str) -> int:
    """``len(trainer.train_dataloader.dataset)``, or a clear error naming ``who`` needs it."""
    dataset = getattr(trainer.train_dataloader, "dataset", None)
    try:
        return len(dataset)  # type: ignore[arg-type]
    except TypeError as err:
        raise SelectionError(
            f"{who} could not infer the number of samples from the training dataloader (its dataset has no "
            "len()); pass `num_samples=` explicitly."
        ) from err


def raise_together(trainer: "pl.Trainer", local_problem: Optional[str], summary: str) -> None:
    """Raise the same :class:`SelectionError` on every rank if any rank has a problem.

    For checks outside the training step (e.g. at ``on_train_start``); inside the step, ride on the
    reduction's all-reduce instead (see :mod:`lightning_select.core.engine`). Every rank must call
    this at the same point. The error message is ``summary`` (identical on every rank), followed by
    this rank's own ``local_problem`` where it has one.

    Example::

        >>> class OneProcess:
        ...     world_size = 1
        >>> raise_together(OneProcess(), None, "never raised")
    """
    failed = local_problem is not None
    if trainer.world_size > 1:
        failed = bool(trainer.strategy.reduce_boolean_decision(failed, all=False))
    if failed:
        detail = f" This rank: {local_problem}" if local_problem else ""
        raise SelectionError(summary + detail)
