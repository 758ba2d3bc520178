"""scikit-learn digits under a distribution shift: the test bed of test-time adaptation (EATA).

A classifier is trained on the clean *source* split; the *target* split is corrupted (pixel shift
and Gaussian noise, the digits analogue of ImageNet-C's corruptions) and adapted to without its
labels. Every batch is a dict ``{"image": [B, 1, 8, 8], "label", "index"}``; the target's labels are
there only to measure accuracy (the adaptation loss never reads them).

Loaders: :meth:`ShiftedDigitsDataModule.source_dataloader` (clean, labelled: train the source model),
``train_dataloader`` (the corrupted target stream, shuffled once with ``seed``: what adaptation
trains on), ``val_dataloader`` (the corrupted target in index order, for accuracy) and
:meth:`~ShiftedDigitsDataModule.fisher_dataloader` (clean source images: the in-distribution samples
EATA estimates its Fisher on, ``EntropySelection(fisher_loader="fisher_dataloader")``).

Example::

    >>> dm = ShiftedDigitsDataModule(noise_std=0.5, shift=0)
    >>> dm.setup("fit")
    >>> len(dm.source_set), len(dm.target_set)
    (1078, 719)
    >>> batch = next(iter(dm.train_dataloader()))
    >>> batch["image"].shape, sorted(batch)
    (torch.Size([64, 1, 8, 8]), ['image', 'index', 'label'])
"""

from __future__ import annotations

from typing import Optional

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_select.core.batch import IndexedDataset
from lightning_select.data.noisy_labels import stratified_split


def corrupt_digits(images: Tensor, noise_std: float, shift: int, generator: torch.Generator) -> Tensor:
    """``[N, 1, 8, 8]`` images in [0, 1]: moved ``shift`` pixels right and down (zero fill), plus Gaussian
    noise of standard deviation ``noise_std`` (drawn from ``generator``), clipped to [0, 1].

    Example::

        >>> img = torch.zeros(1, 1, 8, 8)
        >>> img[0, 0, 0, 0] = 1.0
        >>> out = corrupt_digits(img, 0.0, 2, torch.Generator().manual_seed(0))
        >>> out[0, 0, 2, 2].item(), out.sum().item()
        (1.0, 1.0)
    """
    if shift < 0 or shift >= images.shape[-1]:
        raise ValueError(f"Expected `shift` in [0, {images.shape[-1]}), but got {shift}.")
    if noise_std < 0:
        raise ValueError(f"Expected `noise_std` >= 0, but got {noise_std}.")
    out = torch.zeros_like(images)
    side = images.shape[-1]
    out[..., shift:, shift:] = images[..., : side - shift, : side - shift]
    noise = torch.randn(images.shape, generator=generator, dtype=images.dtype)
    return (out + noise_std * noise).clamp(0.0, 1.0)


class ShiftedDigitsDataModule(pl.LightningDataModule):
    """Clean source digits and a corrupted target split (see the module docstring).

    Args:
        batch_size: batch size of every loader (EATA: 64).
        noise_std: standard deviation of the target's Gaussian pixel noise (pixels are in [0, 1]). At the
            default 0.5 a small CNN trained on the source (99 % on clean target images) drops to about 49 %.
        shift: the target's shift in pixels (right and down); 1 pixel with noise 0.4 leaves about 20 %.
        target_fraction: stratified share of the 1797 images in the target split.
        seed: seed of the split, the noise and the target stream's order.
        index_key: key of the sample index in each batch.
    """

    num_classes = 10

    def __init__(self, batch_size: int = 64, noise_std: float = 0.5, shift: int = 0, target_fraction: float = 0.4,
                 seed: int = 0, index_key: str = "index") -> None:
        super().__init__()
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"Expected `batch_size` to be a positive integer, but got {batch_size!r}.")
        if not 0.0 < target_fraction < 1.0:
            raise ValueError(f"Expected `target_fraction` in (0, 1), but got {target_fraction}.")
        self.batch_size, self.noise_std, self.shift = batch_size, float(noise_std), int(shift)
        self.target_fraction, self.seed, self.index_key = target_fraction, seed, index_key
        self.source_set: Optional[IndexedDataset] = None
        self.target_set: Optional[IndexedDataset] = None
        self.clean_target_set: Optional[IndexedDataset] = None  # the target images before the corruption

    def setup(self, stage: Optional[str] = None) -> None:
        if self.source_set is not None:
            return
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.tensor(digits.data, dtype=torch.float32).div(16.0).view(-1, 1, 8, 8)
        labels = torch.tensor(digits.target, dtype=torch.long)
        source, target = (torch.as_tensor(p) for p in stratified_split(labels.numpy(), self.target_fraction, self.seed))
        shifted = corrupt_digits(images[target], self.noise_std, self.shift, torch.Generator().manual_seed(self.seed))

        def table(x: Tensor, y: Tensor) -> IndexedDataset:
            return IndexedDataset(_Images(x, y), self.index_key)

        self.source_set = table(images[source], labels[source])
        self.target_set = table(shifted, labels[target])
        self.clean_target_set = table(images[target], labels[target])

    def _loader(self, dataset: Optional[IndexedDataset], shuffle: bool = False) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}: call setup() before asking for a dataloader.")
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, generator=generator)

    def source_dataloader(self, shuffle: bool = True) -> DataLoader:
        """The clean, labelled source split (train the source model on it)."""
        return self._loader(self.source_set, shuffle)

    def fisher_dataloader(self) -> DataLoader:
        """Clean source images in a fixed order: the in-distribution samples of EATA's Fisher."""
        return self._loader(self.source_set)

    def train_dataloader(self) -> DataLoader:
        """The corrupted target stream (labels only for measuring), in one seeded shuffled order."""
        return self._loader(self.target_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """The corrupted target split in index order (for accuracy)."""
        return self._loader(self.target_set)


class _Images(torch.utils.data.Dataset):
    """Items ``{"image": images[i], "label": labels[i]}``."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"image": self.images[i], "label": self.labels[i]}
