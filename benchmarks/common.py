"""Pieces shared by the benchmark scripts (run as ``python benchmarks/<name>.py``)."""

from __future__ import annotations

import time

import lightning.pytorch as pl
import torch


class StepTimer(pl.Callback):
    """Wall time of every training step, from batch start to batch end."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._t0 = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append(time.perf_counter() - self._t0)


class OneHotGuide(torch.nn.Module):
    """A guide that reads the sample-index column: sample i ↦ e_i.

    Every guide cosine is 0 except a sample with itself, so GIST with this guide (and ``mask_self``)
    flags nothing: it isolates the effect of GIST's extra AA/PP blocks from the guide's filtering.
    """

    def __init__(self, num_samples: int) -> None:
        super().__init__()
        self.num_samples = num_samples

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(index.long(), self.num_samples).float()
