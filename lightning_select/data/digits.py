"""scikit-learn's handwritten digits as an in-batch contrastive task (the embedded default).

Each training sample is one 8×8 image; its two *views* (random ±1-pixel shift, intensity scale and
pixel noise) form an anchor/positive pair, so every other image in the batch is an in-batch negative,
and same-digit negatives are real false negatives. Held-out images (a stratified split) are used for
retrieval by digit class.

Augmentations are a pure function of ``(seed, epoch, sample index)`` (a counter-based hash, see
:func:`hashed_uniform`), so they do not depend on batch composition, worker count or selection:
the scoring pass and the training pass see the same views, and a resumed run sees the same views
as an uninterrupted one.

Example::

    >>> dm = DigitsPairsDataModule(batch_size=64)
    >>> dm.setup("fit")
    >>> len(dm.train_set), len(dm.heldout_set)
    (1437, 360)
"""

from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightning_select.core.batch import IndexedDataset
from lightning_select.samplers.epoch import shuffled_loader_kwargs
from lightning_select.samplers.factory import BatchSamplerFactory, batch_sampler_loader
from lightning_select.samplers.resumable import ResumableDataLoader

_MASK64 = (1 << 63) - 1


def hashed_uniform(index: Tensor, epoch: int, seed: int, n: int) -> Tensor:
    """``[B, n]`` floats in ``[0, 1)`` that depend only on ``(seed, epoch, index, column)``.

    A splitmix64-style mixer over int64 tensors (wrap-around arithmetic), fully vectorised.
    """
    counter = torch.arange(n, dtype=torch.int64, device=index.device)
    x = index.long().unsqueeze(1) * 0x9E3779B1 + counter * 0x85EBCA77 + (epoch * 0xC2B2AE3D + seed * 0x27D4EB2F)
    for shift, mult in ((33, 0x62A9D9ED799705F5 & _MASK64), (29, 0x4BE98134A5976FD3 & _MASK64), (32, 1)):
        x = x ^ ((x >> shift) & ((1 << (64 - shift)) - 1))
        x = x * mult
    return ((x >> 11) & ((1 << 52) - 1)).double().div(2.0**52).float()


def augment_digits(images: Tensor, index: Tensor, epoch: int, seed: int) -> Tensor:
    """One random view of ``[B, 64]`` digit images (values 0..16 scaled to 0..1): shift, scale, noise."""
    b = images.shape[0]
    u = hashed_uniform(index, epoch, seed, 3 + 64).to(images.device)
    img = images.view(b, 1, 8, 8)
    padded = torch.nn.functional.pad(img, (1, 1, 1, 1))
    dx = (u[:, 0] * 3).long().clamp(max=2)
    dy = (u[:, 1] * 3).long().clamp(max=2)
    rows = (dy.view(b, 1, 1) + torch.arange(8, device=img.device).view(1, 8, 1)).expand(b, 8, 8)
    cols = (dx.view(b, 1, 1) + torch.arange(8, device=img.device).view(1, 1, 8)).expand(b, 8, 8)
    shifted = padded[torch.arange(b, device=img.device).view(b, 1, 1), 0, rows, cols]
    scale = 0.7 + 0.6 * u[:, 2:3]
    noise = (u[:, 3:] - 0.5) * 0.4
    return (shifted.reshape(b, 64) * scale + noise).clamp(0.0, 1.0)


class _DigitsTable(Dataset):
    def __init__(self, images: Tensor, labels: Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"image": self.images[i], "label": self.labels[i]}


class DigitsPairsDataModule(pl.LightningDataModule):
    """Two augmented views per digit image; stratified held-out split for retrieval evaluation.

    Batches are dicts: ``image`` [B, 64], ``label`` [B], ``index`` [B] and, for training batches
    after transfer to the device, ``view1``/``view2`` [B, 64].

    Args:
        batch_size: training batch size (per process).
        heldout_fraction: fraction of images held out (stratified by class).
        seed: seed of the split, the data order and the augmentations.
        num_workers: DataLoader workers.
        index_key: key of the sample index in each batch.
        batch_sampler: a factory of a composing batch sampler (e.g.
            ``functools.partial(ClusteredBatchSampler, num_clusters=10)``), called as in
            :mod:`lightning_select.samplers.factory`; ``None`` shuffles (seeded per epoch).
    """

    def __init__(
        self,
        batch_size: int = 128,
        heldout_fraction: float = 0.2,
        seed: int = 0,
        num_workers: int = 0,
        index_key: str = "index",
        batch_sampler: Optional[BatchSamplerFactory] = None,
    ) -> None:
        super().__init__()
        if not 0.0 < heldout_fraction < 1.0:
            raise ValueError(f"Expected `heldout_fraction` in (0, 1), but got {heldout_fraction}.")
        self.batch_size = batch_size
        self.heldout_fraction = heldout_fraction
        self.seed = seed
        self.num_workers = num_workers
        self.index_key = index_key
        self.batch_sampler = batch_sampler
        self.train_set: Optional[IndexedDataset] = None
        self.heldout_set: Optional[IndexedDataset] = None

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is not None:
            return
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        images = torch.tensor(digits.data, dtype=torch.float32) / 16.0
        labels = torch.tensor(digits.target, dtype=torch.long)
        train_idx, held_idx = train_test_split(
            torch.arange(len(labels)).numpy(),
            test_size=self.heldout_fraction,
            random_state=self.seed,
            stratify=labels.numpy(),
        )
        train_idx, held_idx = torch.as_tensor(train_idx), torch.as_tensor(held_idx)
        self.train_set = IndexedDataset(_DigitsTable(images[train_idx], labels[train_idx]), self.index_key)
        self.heldout_set = IndexedDataset(_DigitsTable(images[held_idx], labels[held_idx]), self.index_key)

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None
        world = self.trainer.world_size if self.trainer is not None else 1
        if self.batch_sampler is not None:
            rank = self.trainer.global_rank if self.trainer is not None else 0
            return batch_sampler_loader(self.train_set, self.batch_sampler, self.batch_size, self.seed, world, rank,
                                        num_workers=self.num_workers)
        return ResumableDataLoader(self.train_set, batch_size=self.batch_size, num_workers=self.num_workers, drop_last=False,
                          **shuffled_loader_kwargs(len(self.train_set), self.seed, world))

    def val_dataloader(self) -> DataLoader:
        assert self.heldout_set is not None
        return DataLoader(self.heldout_set, batch_size=512, num_workers=self.num_workers)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = self.trainer
        if trainer is not None and trainer.training and isinstance(batch, dict) and "image" in batch:
            epoch, idx = trainer.current_epoch, batch[self.index_key]
            batch["view1"] = augment_digits(batch["image"], idx, epoch, self.seed * 2)
            batch["view2"] = augment_digits(batch["image"], idx, epoch, self.seed * 2 + 1)
        return batch


class DigitsLDAGuide(torch.nn.Module):
    """A frozen guide for the digits default: a linear discriminant projection of the raw image.

    Fitted with scikit-learn's LDA on the *training split only* (the same stratified split as
    :class:`DigitsPairsDataModule` with the same ``seed`` and ``heldout_fraction``), so it never sees
    the evaluation images. Same-digit images land close together, so the guide flags same-class
    in-batch negatives: the real false negatives of this task.

    Example::

        >>> guide = DigitsLDAGuide.fit(seed=0)
        >>> guide(torch.rand(3, 64)).shape
        torch.Size([3, 9])
    """

    def __init__(self, mean: Tensor, projection: Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean.float())
        self.register_buffer("projection", projection.float())

    @classmethod
    def fit(cls, seed: int = 0, heldout_fraction: float = 0.2) -> "DigitsLDAGuide":
        from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

        dm = DigitsPairsDataModule(seed=seed, heldout_fraction=heldout_fraction)
        dm.setup("fit")
        assert dm.train_set is not None
        table = dm.train_set.dataset
        lda = LinearDiscriminantAnalysis().fit(table.images.numpy(), table.labels.numpy())
        return cls(torch.as_tensor(lda.xbar_), torch.as_tensor(lda.scalings_[:, : lda._max_components]))

    def forward(self, images: Tensor) -> Tensor:
        if not isinstance(images, Tensor) or images.dim() != 2 or images.shape[1] != self.mean.shape[0]:
            raise TypeError(
                f"DigitsLDAGuide expects [B, {self.mean.shape[0]}] image tensors, but got "
                f"{type(images).__name__} {tuple(getattr(images, 'shape', ()))}."
            )
        return (images.float() - self.mean) @ self.projection
