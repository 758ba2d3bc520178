"""Small distributed helpers shared by the policies: dataset size, gathers of per-rank row sets of
different lengths, and decisions every rank takes together."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional

import torch
from torch import Tensor

from lightning_select.core.context import SelectionError, StepContext

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


def build_on_rank_zero(trainer: "pl.Trainer", build: Optional[Callable[[], object]], summary: str, barrier: str,
                       local_problem: Optional[str] = None) -> None:
    """Run ``build()`` on rank 0 only (an offline file that every rank then reads), then raise on every rank
    together if it failed or if any rank has ``local_problem``, then wait for rank 0 (a barrier under DDP).

    Every rank must call it at the same point; ``build=None`` builds nothing (the file is there). An
    exception of ``build`` becomes this rank's problem, so no rank raises alone before the collectives.

    Example::

        >>> class OneProcess:
        ...     world_size, global_rank = 1, 0
        >>> built = []
        >>> build_on_rank_zero(OneProcess(), lambda: built.append(1), "never raised", "demo")
        >>> built
        [1]
    """
    if local_problem is None and build is not None and trainer.global_rank == 0:
        try:
            build()
        except Exception as err:  # noqa: BLE001  (reported by every rank together, below)
            local_problem = f"{type(err).__name__}: {err}"
    raise_together(trainer, local_problem, summary)
    if trainer.world_size > 1:
        trainer.strategy.barrier(barrier)


def exchange_bad_rows(ctx: StepContext, local_bad: Tensor, local_rows: int) -> tuple[list[tuple[int, int]], list[int]]:
    """Every rank's ``(non-finite rows, rows)`` and all non-finite sample indices, on every rank.

    Two collectives; call it on every rank together (the engine does, after the reduction showed a
    non-finite loss somewhere), so every rank can raise the same error.
    """
    if ctx.world_size == 1:
        return [(int(local_bad.numel()), local_rows)], local_bad.tolist()
    device = ctx.losses.device if ctx.losses is not None else local_bad.device
    counts = torch.zeros(ctx.world_size, 2, device=device)
    counts[ctx.trainer.global_rank] = torch.tensor([float(local_bad.numel()), float(local_rows)], device=device)
    counts = ctx.trainer.strategy.reduce(counts, reduce_op="sum").round().long().cpu()
    width = max(int(counts[:, 0].max()), 1)
    padded = torch.full((width,), -1, dtype=torch.long, device=device)
    padded[: local_bad.numel()] = local_bad.to(device)
    everyone = ctx.all_gather(padded).reshape(-1)
    return [tuple(c) for c in counts.tolist()], everyone[everyone >= 0].tolist()


def all_gather_rows(ctx: StepContext, rows: Tensor, fill: float = 0.0) -> tuple[Tensor, Tensor]:
    """Gather ``[n, ...]`` rows whose count ``n`` differs per rank: ``([W, max n, ...], counts [W])``.

    Each rank's rows are padded with ``fill`` to the largest count. Two collectives (the counts, then
    the rows): every rank must call it at the same point. In one process: ``(rows[None], [n])``.
    :func:`valid_rows` concatenates the real rows in rank order.

    Example::

        >>> class OneProcess:
        ...     world_size = 1
        >>> gathered, counts = all_gather_rows(StepContext(OneProcess(), None, None, 0, None, 0, None),
        ...                                    torch.tensor([3.0, 4.0]))
        >>> gathered.shape, counts.tolist(), valid_rows(gathered, counts).tolist()
        (torch.Size([1, 2]), [2], [3.0, 4.0])
    """
    n = rows.shape[0]
    if ctx.world_size == 1:
        return rows.unsqueeze(0), torch.tensor([n], device=rows.device)
    counts = ctx.all_gather(torch.tensor([n], device=rows.device)).reshape(-1)
    width = max(int(counts.max()), 1)
    padded = rows.new_full((width, *rows.shape[1:]), fill)
    padded[:n] = rows
    return ctx.all_gather(padded).reshape(ctx.world_size, width, *rows.shape[1:]), counts


def valid_rows(gathered: Tensor, counts: Tensor) -> Tensor:
    """The real rows of :func:`all_gather_rows`' result, concatenated in rank order."""
    return torch.cat([gathered[r, :c] for r, c in enumerate(counts.tolist())])

