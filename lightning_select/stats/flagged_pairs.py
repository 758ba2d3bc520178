"""The flagged-pair log: every (anchor, candidate) pair a guide flagged, capped, checkpointed, exportable."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence, Union

import torch
from torch import Tensor

from lightning_select.io import write_table

PAIR_COLUMNS = ("anchor_index", "candidate_index", "block", "guide_score", "threshold", "epoch", "step")
PAIR_DTYPES = {"anchor_index": torch.long, "candidate_index": torch.long, "block": torch.long,
               "guide_score": torch.float32, "threshold": torch.float32, "epoch": torch.long, "step": torch.long}


class FlaggedPairLog:
    """Columns of flagged pairs (``block`` is an int code into ``block_names``), appended per step.

    Args:
        max_pairs: stop recording once this many pairs are stored (``truncated`` says so).

    Example::

        >>> import torch
        >>> log = FlaggedPairLog(max_pairs=10)
        >>> log.append({k: torch.tensor([1.0, 2.0]) for k in PAIR_COLUMNS})
        >>> len(log), log.columns()["anchor_index"].tolist()
        (2, [1, 2])
    """

    def __init__(self, max_pairs: int = 2_000_000) -> None:
        if max_pairs < 0:
            raise ValueError(f"Expected `max_pairs` >= 0, but got {max_pairs}.")
        self.max_pairs = max_pairs
        self._chunks: list[dict[str, Tensor]] = []
        self._count = 0
        self.truncated = False

    def __len__(self) -> int:
        return self._count

    def append(self, pairs: dict[str, Tensor]) -> None:
        """Append equal-length columns (moved to CPU, cast to ``PAIR_DTYPES``); pairs beyond ``max_pairs`` are dropped."""
        n = int(pairs[PAIR_COLUMNS[0]].numel())
        room = self.max_pairs - self._count
        if n > room:
            self.truncated = True
            n = room
        if n <= 0:
            return
        self._chunks.append({k: pairs[k][:n].detach().to("cpu", PAIR_DTYPES[k]) for k in PAIR_COLUMNS})
        self._count += n

    def columns(self) -> dict[str, Tensor]:
        """Every recorded pair, as columns of equal length (empty columns when nothing was flagged)."""
        if not self._chunks:
            return {k: torch.zeros(0, dtype=PAIR_DTYPES[k]) for k in PAIR_COLUMNS}
        merged = {k: torch.cat([c[k] for c in self._chunks]) for k in PAIR_COLUMNS}
        self._chunks = [merged]
        return merged

    def export(self, path: Union[str, Path], block_names: Sequence[str]) -> Path:
        """Write the log to ``.parquet``, ``.csv`` or ``.npz`` with ``block`` as its name."""
        import numpy as np

        cols: dict[str, Any] = {k: v.numpy() for k, v in self.columns().items()}
        cols["block"] = np.asarray(list(block_names), dtype=object)[cols["block"].astype(int)].astype(str)
        return write_table(cols, path)

    def state_dict(self) -> dict[str, Any]:
        return {"columns": {k: v.clone() for k, v in self.columns().items()}, "truncated": self.truncated,
                "max_pairs": self.max_pairs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        columns = state["columns"]
        self._chunks = [dict(columns)] if columns[PAIR_COLUMNS[0]].numel() else []
        self._count = int(columns[PAIR_COLUMNS[0]].numel())
        self.truncated = bool(state["truncated"])
