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


def timed_digits_fit(callbacks: list, plain_loss: bool, epochs: int, batch_size: int, hidden: int,
                     accelerator: str = "cpu") -> float:
    """Seed 0, then fit the digits embedder with ``callbacks`` (no validation, logging or checkpoints);
    returns the fit's wall time in seconds."""
    from lightning_select.data import DigitsPairsDataModule
    from lightning_select.models import DigitsEmbeddingModule

    pl.seed_everything(0)
    model = DigitsEmbeddingModule(hidden=hidden, plain_loss=plain_loss)
    trainer = pl.Trainer(
        accelerator=accelerator, devices=1, max_epochs=epochs, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=callbacks,
    )
    start = time.perf_counter()
    trainer.fit(model, DigitsPairsDataModule(batch_size=batch_size))
    return time.perf_counter() - start

