"""Classification with known label noise: the test bed of selection policies (selective backprop,
RHO-LOSS, importance sampling).

Two datamodules, one batch layout. Every batch is a dict ``{"image", "label", "clean_label",
"index"}``: ``label`` is the (noisy) training label, ``clean_label`` the true one, ``index`` the
sample's position in its split. After ``setup``, ``train_labels``, ``train_clean_labels`` and
``train_noisy_mask`` (``[N]``, aligned with ``index``) tell which training samples are mislabelled,
so the share of mislabelled samples a policy trains on can be measured
(:class:`~lightning_select.policies.selection_audit.SelectionAudit`).

* :class:`NoisyDigitsDataModule`: scikit-learn digits (offline) with synthetic symmetric noise. Fast.
* :class:`Cifar10NDataModule`: CIFAR-10 with the CIFAR-10N human re-annotations (real noise), read
  from the shared data folder (``classification/cifar10``, see ``DATA.md``).

Splits: *train*, *holdout* (carved from the training pool, stratified, with the same noisy labels:
the irreducible-loss model of RHO-LOSS trains on it) and *test* (clean labels, the validation set).
``train_dataloader`` is a :class:`~lightning_select.samplers.resumable.ResumableDataLoader` seeded per
epoch, so mid-epoch resume is exact; ``scoring_dataloader`` walks the training set in index order
(for per-sample tables).

Example::

    >>> dm = NoisyDigitsDataModule(noise_rate=0.3, seed=0)
    >>> dm.setup("fit")
    >>> len(dm.train_set), len(dm.holdout_set), len(dm.test_set), dm.num_classes
    (1149, 288, 360, 10)
    >>> round(float(dm.train_noisy_mask.float().mean()), 2)
    0.3
    >>> sorted(next(iter(dm.train_dataloader())))
    ['clean_label', 'image', 'index', 'label']
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Any, Optional, Union

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightning_select.core.batch import IndexedDataset
from lightning_select.data.files import DEFAULT_DATA_DIR, require_file
from lightning_select.samplers.epoch import shuffled_loader_kwargs
from lightning_select.samplers.hard_batches import HardBatchSampler
from lightning_select.samplers.infobatch import InfoBatchSampler, check_infobatch_options
from lightning_select.samplers.resumable import ResumableDataLoader
from lightning_select.samplers.rs2 import RS2Sampler

CIFAR10_IMAGES = "classification/cifar10/cifar10_jpeg.npz"
CIFAR10N_LABELS = "classification/cifar10/cifar10n_labels.npz"
CIFAR10N_LABEL_SETS = {"clean": "clean_label", "aggre": "aggre_label", "worse": "worse_label",
                       "random1": "random_label1", "random2": "random_label2", "random3": "random_label3"}
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def inject_symmetric_noise(labels: Tensor, rate: float, num_classes: int, generator: torch.Generator) -> Tensor:
    """Flip exactly ``round(rate · N)`` labels, chosen uniformly, to a class drawn uniformly from the others.

    Symmetric (uniform) label noise; the flipped set and the new labels depend only on ``generator``.

    Example::

        >>> y = torch.arange(10).repeat(100)
        >>> noisy = inject_symmetric_noise(y, 0.3, 10, torch.Generator().manual_seed(0))
        >>> int((noisy != y).sum()), bool(((noisy >= 0) & (noisy < 10)).all())
        (300, True)
    """
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"Expected `noise_rate` in [0, 1), but got {rate}.")
    n = labels.numel()
    flip = torch.randperm(n, generator=generator)[: round(rate * n)]
    offset = torch.randint(1, num_classes, (flip.numel(),), generator=generator)  # never 0: always a wrong class
    noisy = labels.clone()
    noisy[flip] = (labels[flip] + offset) % num_classes
    return noisy


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(rest, part)``: sorted positions, ``part`` a stratified share (a float in (0, 1) or a count).

    ``fraction=0`` returns everything in ``rest``.

    Example::

        >>> rest, part = stratified_split(np.array([0, 0, 0, 0, 1, 1, 1, 1]), 0.5, seed=0)
        >>> len(part), sorted(np.array([0, 0, 0, 0, 1, 1, 1, 1])[part].tolist())
        (4, [0, 0, 1, 1])
    """
    positions = np.arange(len(labels))
    if not fraction:
        return positions, positions[:0]
    from sklearn.model_selection import train_test_split

    rest, part = train_test_split(positions, test_size=fraction, random_state=seed, stratify=labels)
    return np.sort(rest), np.sort(part)


class LabelledImages(Dataset):
    """Items ``{"image": images[i], "label": labels[i], "clean_label": clean_labels[i]}``."""

    def __init__(self, images: Tensor, labels: Tensor, clean_labels: Tensor) -> None:
        if not images.shape[0] == labels.shape[0] == clean_labels.shape[0]:
            raise ValueError(f"Expected one label per image, but got {images.shape[0]} images, {labels.shape[0]} "
                             f"labels and {clean_labels.shape[0]} clean labels.")
        self.images, self.labels, self.clean_labels = images, labels.long(), clean_labels.long()

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"image": self.images[i], "label": self.labels[i], "clean_label": self.clean_labels[i]}


class NoisyClassificationDataModule(pl.LightningDataModule):
    """Loaders and label views shared by the noisy-label datamodules; subclasses fill the three splits."""

    num_classes: int = 10

    def __init__(self, batch_size: int, holdout_fraction: float, seed: int, num_workers: int, index_key: str,
                 eval_batch_size: int) -> None:
        super().__init__()
        if not 0.0 <= holdout_fraction < 1.0:
            raise ValueError(f"Expected `holdout_fraction` in [0, 1), but got {holdout_fraction}.")
        for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Expected `{name}` to be a positive integer, but got {value!r}.")
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.holdout_fraction, self.seed = holdout_fraction, seed
        self.num_workers, self.index_key = num_workers, index_key
        self.train_set: Optional[IndexedDataset] = None
        self.holdout_set: Optional[IndexedDataset] = None
        self.test_set: Optional[IndexedDataset] = None
        #: position of each sample of each split in the source data (sklearn's digits, CIFAR-10's train/test)
        self.source_index: dict[str, Tensor] = {}

    def _set_splits(self, images: Tensor, labels: Tensor, clean: Tensor, train: np.ndarray, holdout: np.ndarray,
                    test_images: Tensor, test_labels: Tensor, pool_source: np.ndarray, test_source: np.ndarray) -> None:
        """``images/labels/clean`` form the training pool (positions ``pool_source`` of the source data);
        ``train``/``holdout`` are positions into the pool."""
        tr, ho = torch.as_tensor(train), torch.as_tensor(holdout)
        self.train_set = IndexedDataset(LabelledImages(images[tr], labels[tr], clean[tr]), self.index_key)
        self.holdout_set = IndexedDataset(LabelledImages(images[ho], labels[ho], clean[ho]), self.index_key)
        self.test_set = IndexedDataset(LabelledImages(test_images, test_labels, test_labels), self.index_key)
        self.source_index = {"train": torch.as_tensor(pool_source[train]),
                             "holdout": torch.as_tensor(pool_source[holdout]), "test": torch.as_tensor(test_source)}

    def _table(self, which: str = "train") -> LabelledImages:
        split = getattr(self, f"{which}_set")
        if split is None:
            raise RuntimeError(f"{type(self).__name__}: call setup() before reading the {which} split.")
        return split.dataset

    @property
    def train_labels(self) -> Tensor:
        """``[N]`` long: the (noisy) training labels, ``train_labels[i]`` is the label of ``index == i``."""
        return self._table().labels

    @property
    def train_clean_labels(self) -> Tensor:
        """``[N]`` long: the true labels of the training samples."""
        return self._table().clean_labels

    @property
    def train_noisy_mask(self) -> Tensor:
        """``[N]`` bool: training sample ``i`` is mislabelled (``label != clean_label``)."""
        table = self._table()
        return table.labels != table.clean_labels

    def _loader(self, dataset: Optional[Dataset], **kwargs: Any) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}: call setup() before asking for a dataloader.")
        kwargs.setdefault("batch_size", self.eval_batch_size)
        return DataLoader(dataset, num_workers=self.num_workers, persistent_workers=self.num_workers > 0, **kwargs)

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None, "call setup() first"
        world = self.trainer.world_size if self.trainer is not None else 1
        return ResumableDataLoader(self.train_set, batch_size=self.batch_size, num_workers=self.num_workers,
                                   persistent_workers=self.num_workers > 0, drop_last=False,
                                   **shuffled_loader_kwargs(len(self.train_set), self.seed, world))

    def val_dataloader(self) -> DataLoader:
        """The clean test set."""
        return self._loader(self.test_set)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set)

    def holdout_dataloader(self, batch_size: Optional[int] = None, shuffle: bool = False) -> DataLoader:
        """The holdout split (noisy labels, like training): RHO-LOSS's irreducible-loss model trains on it."""
        kwargs: dict[str, Any] = {"batch_size": batch_size or self.eval_batch_size}
        if shuffle:
            kwargs["generator"] = torch.Generator().manual_seed(self.seed)
        return self._loader(self.holdout_set, shuffle=shuffle, **kwargs)

    def scoring_dataloader(self, batch_size: Optional[int] = None) -> DataLoader:
        """The training set in index order, not shuffled (for per-sample tables such as irreducible losses)."""
        return self._loader(self.train_set, batch_size=batch_size or self.eval_batch_size, shuffle=False)

    def subset_dataloader(self, subset_path: Union[str, os.PathLike], weighted: bool = False) -> DataLoader:
        """The training loader over the kept samples of a CoLoR-Filter subset file (checked against the
        training labels; :class:`~lightning_select.samplers.subset.SubsetSampler`, sharded under DDP)."""
        from lightning_select.data.subset_file import load_subset_file
        from lightning_select.samplers.subset import SubsetSampler

        subset = load_subset_file(subset_path, targets=self.train_labels)
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer is not None else (1, 0)
        sampler = SubsetSampler(subset.indices, seed=self.seed, weights=subset.kept_weights if weighted else None,
                                num_replicas=world, rank=rank)
        return ResumableDataLoader(self.train_set, batch_size=self.batch_size, drop_last=False, sampler=sampler,
                                   num_workers=self.num_workers, persistent_workers=self.num_workers > 0)


class NoisyDigitsDataModule(NoisyClassificationDataModule):
    """scikit-learn digits (1797 images, ``[64]`` floats in [0, 1]) with symmetric label noise.

    The test split (``test_fraction``, stratified) keeps clean labels. The rest is the training
    pool; noise is injected into the pool (exactly ``round(noise_rate · pool)`` labels, each moved
    to a class drawn uniformly from the 9 others), then ``holdout_fraction`` of the pool is held out
    (stratified by the clean label) with its noisy labels.

    Args:
        batch_size: training batch size (per process).
        noise_rate: fraction of the training pool whose label is wrong.
        holdout_fraction: fraction of the training pool held out (0 for none).
        test_fraction: fraction of all images in the clean test set.
        seed: seed of the splits, the noise (unless ``noise_seed``) and the data order.
        noise_seed: seed of the noise only; default ``seed``.
        num_workers: DataLoader workers.
        index_key: key of the sample index in each batch.
        eval_batch_size: batch size of the test, holdout and scoring loaders.
        sampler: training order: ``"shuffle"`` (every sample once per epoch, seeded per epoch),
            ``"rs2"`` (:class:`~lightning_select.samplers.rs2.RS2Sampler`, a fresh ``rs2_fraction``
            of the set per epoch) or ``"hard_batches"`` (fixed batches, later epochs only the hardest
            ``hard_fraction`` of them: :class:`~lightning_select.samplers.hard_batches.HardBatchSampler`,
            fed by the :class:`~lightning_select.policies.hard_batches.HardBatches` callback). Under
            DDP both shard themselves (they get ``trainer.world_size`` and ``trainer.global_rank``;
            Lightning leaves them in place): RS2 shards each epoch's subset, hard batches are global
            batches of ``batch_size · world_size``, each rank training its slice.
            ``"subset_file"``: every epoch the kept samples of the CoLoR-Filter subset file ``subset_path``
            (:meth:`subset_dataloader`; sharded under DDP).
            ``"infobatch"``: InfoBatch's per-epoch subset
            (:class:`~lightning_select.samplers.infobatch.InfoBatchSampler`, ``num_epochs=trainer.max_epochs``,
            sharded under DDP), fed and weighted by the :class:`~lightning_select.policies.infobatch.InfoBatch`
            callback.
        rs2_fraction: share of the training set per epoch with ``sampler="rs2"``.
        hard_fraction: share of the batches per epoch after the first with ``sampler="hard_batches"``.
        subset_path: the subset file of ``sampler="subset_file"`` (:mod:`lightning_select.data.subset_file`).
        subset_weighted: with ``sampler="subset_file"``, draw the kept samples by the file's weights (with
            replacement) instead of a permutation.
        infobatch_prune: InfoBatch's ``r`` in [0, 1) with ``sampler="infobatch"``: the share of the well-learned
            samples pruned per epoch.
        infobatch_delta: InfoBatch's ``δ`` in (0, 1] with ``sampler="infobatch"``: epochs ``< δ·max_epochs`` prune,
            the rest train on the full data.
    """

    def __init__(self, batch_size: int = 64, noise_rate: float = 0.3, holdout_fraction: float = 0.2,
                 test_fraction: float = 0.2, seed: int = 0, noise_seed: Optional[int] = None, num_workers: int = 0,
                 index_key: str = "index", eval_batch_size: int = 512, sampler: str = "shuffle",
                 rs2_fraction: float = 0.1, hard_fraction: float = 0.5,
                 subset_path: Union[str, os.PathLike, None] = None, subset_weighted: bool = False,
                 infobatch_prune: float = 0.5, infobatch_delta: float = 0.875) -> None:
        super().__init__(batch_size, holdout_fraction, seed, num_workers, index_key, eval_batch_size)
        if sampler not in ("shuffle", "rs2", "hard_batches", "subset_file", "infobatch"):
            raise ValueError(f"Expected `sampler` in ['shuffle', 'rs2', 'hard_batches', 'subset_file', 'infobatch'], "
                             f"but got {sampler!r}.")
        check_infobatch_options("NoisyDigitsDataModule", infobatch_prune, infobatch_delta, "infobatch_prune",
                                "infobatch_delta")
        self.infobatch_prune, self.infobatch_delta = float(infobatch_prune), float(infobatch_delta)
        if (sampler == "subset_file") != (subset_path is not None):
            raise ValueError(f"Expected `subset_path` (a CoLoR-Filter subset file) exactly with sampler='subset_file', "
                             f"but got sampler={sampler!r}, subset_path={subset_path!r}.")
        self.subset_path, self.subset_weighted = subset_path, bool(subset_weighted)
        for name, value in (("rs2_fraction", rs2_fraction), ("hard_fraction", hard_fraction)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
                raise ValueError(f"Expected `{name}` in (0, 1], but got {value!r}.")
        self.sampler, self.rs2_fraction, self.hard_fraction = sampler, float(rs2_fraction), float(hard_fraction)
        if not 0.0 <= noise_rate < 0.9:
            raise ValueError(f"Expected `noise_rate` in [0, 0.9) (above 0.9 the wrong class is the majority), "
                             f"but got {noise_rate}.")
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"Expected `test_fraction` in (0, 1), but got {test_fraction}.")
        self.noise_rate, self.test_fraction = noise_rate, test_fraction
        self.noise_seed = seed if noise_seed is None else noise_seed

    def train_dataloader(self) -> DataLoader:
        if self.sampler == "shuffle":
            return super().train_dataloader()
        assert self.train_set is not None, "call setup() first"
        if self.sampler == "subset_file":
            return self.subset_dataloader(self.subset_path, self.subset_weighted)  # type: ignore[arg-type]
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer is not None else (1, 0)
        common: dict[str, Any] = {"num_workers": self.num_workers, "persistent_workers": self.num_workers > 0}
        n = len(self.train_set)
        if self.sampler == "infobatch":
            epochs = getattr(self.trainer, "max_epochs", None)
            return ResumableDataLoader(self.train_set, batch_size=self.batch_size, drop_last=False, **common,
                                       sampler=InfoBatchSampler(n, self.infobatch_prune, self.infobatch_delta,
                                                                num_epochs=epochs if epochs and epochs > 0 else None,
                                                                seed=self.seed, num_replicas=world, rank=rank))
        if self.sampler == "rs2":
            return ResumableDataLoader(self.train_set, batch_size=self.batch_size, drop_last=False, **common,
                                       sampler=RS2Sampler(n, self.rs2_fraction, seed=self.seed, num_replicas=world,
                                                          rank=rank))
        return ResumableDataLoader(self.train_set, **common, batch_sampler=HardBatchSampler(
            n, self.batch_size, fraction=self.hard_fraction, seed=self.seed, num_replicas=world, rank=rank))

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is not None:
            return
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.tensor(digits.data, dtype=torch.float32) / 16.0
        clean = torch.tensor(digits.target, dtype=torch.long)
        pool, test = stratified_split(clean.numpy(), self.test_fraction, self.seed)
        images_pool, clean_pool = images[torch.as_tensor(pool)], clean[torch.as_tensor(pool)]
        noisy_pool = inject_symmetric_noise(clean_pool, self.noise_rate, self.num_classes,
                                            torch.Generator().manual_seed(self.noise_seed))
        train, holdout = stratified_split(clean_pool.numpy(), self.holdout_fraction, self.seed + 1)
        test_t = torch.as_tensor(test)
        self._set_splits(images_pool, noisy_pool, clean_pool, train, holdout, images[test_t], clean[test_t], pool, test)


def decode_jpegs(jpeg: np.ndarray, offsets: np.ndarray, indices: np.ndarray, desc: str = "decoding",
                 progress: bool = True) -> np.ndarray:
    """``[n, H, W, 3]`` uint8 RGB images ``jpeg[offsets[i]:offsets[i + 1]]`` for ``i`` in ``indices`` (Pillow)."""
    try:
        from PIL import Image
    except ImportError as err:  # pragma: no cover
        raise ImportError("Decoding CIFAR-10 needs Pillow: pip install Pillow") from err
    from tqdm.auto import tqdm

    out: Optional[np.ndarray] = None
    for k, i in enumerate(tqdm(indices, desc=desc, disable=not progress, mininterval=1.0, leave=False)):
        with Image.open(io.BytesIO(jpeg[offsets[i]: offsets[i + 1]].tobytes())) as img:
            pixels = np.asarray(img.convert("RGB"))
        if out is None:
            out = np.empty((len(indices), *pixels.shape), dtype=np.uint8)
        if pixels.shape != out.shape[1:]:
            raise ValueError(f"Image {i} decodes to {pixels.shape}, but the first one was {out.shape[1:]}.")
        out[k] = pixels
    return out if out is not None else np.empty((0, 32, 32, 3), dtype=np.uint8)


def to_normalised_tensor(images: np.ndarray, image_size: int, mean: tuple[float, ...] = CIFAR10_MEAN,
                         std: tuple[float, ...] = CIFAR10_STD, chunk: int = 8192) -> Tensor:
    """``[n, H, W, 3]`` uint8 → ``[n, 3, s, s]`` float32, resized (bilinear, antialiased) and normalised per channel.

    Example::

        >>> to_normalised_tensor(np.zeros((2, 32, 32, 3), dtype=np.uint8), 16).shape
        torch.Size([2, 3, 16, 16])
    """
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    out = torch.empty((images.shape[0], 3, image_size, image_size), dtype=torch.float32)
    for a in range(0, images.shape[0], chunk):  # bounded peak memory for the full 50k
        x = torch.from_numpy(np.ascontiguousarray(images[a: a + chunk])).permute(0, 3, 1, 2).float().div_(255.0)
        if x.shape[-1] != image_size or x.shape[-2] != image_size:
            x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
        out[a: a + chunk] = (x - m) / s
    return out


class Cifar10NDataModule(NoisyClassificationDataModule):
    """CIFAR-10 with the CIFAR-10N human labels (real noise: ``worse`` 40.2 %, ``aggre`` 9.0 %).

    Reads ``classification/cifar10/cifar10_jpeg.npz`` and ``cifar10n_labels.npz`` from ``data_dir``
    and decodes the JPEGs with Pillow once (about 7 s for all 60k; only the images of the chosen
    subsets are decoded). Images are resized once to ``image_size`` (antialiased) and kept in memory
    as normalised float32 ``[N, 3, s, s]`` (600 MB for the full training set at 32 px).

    Args:
        data_dir: the shared data folder (default ``../shared/data``, or ``$LIGHTNING_SELECT_DATA``).
        label_set: training labels: ``clean``, ``aggre``, ``worse``, ``random1``, ``random2``, ``random3``.
        batch_size: training batch size (per process).
        image_size: side of the images fed to the model (32 = original; 16 for CPU benchmarks).
        train_subset: size of a seeded, stratified subset of the 50k training images (None = all).
        test_subset: size of a seeded, stratified subset of the 10k test images (None = all).
        holdout_fraction: fraction of the training (sub)set held out for RHO-LOSS (stratified).
        seed: seed of the subsets, the holdout split and the data order.
        cache_dir: if set, the decoded uint8 arrays of the full splits are stored there as ``.npy``
            and reused by later runs (checked against their expected shape and size; re-decoded if
            they do not match).
        num_workers: DataLoader workers.
        index_key: key of the sample index in each batch.
        eval_batch_size: batch size of the test, holdout and scoring loaders.
        progress: show a tqdm bar while decoding.
    """

    def __init__(self, data_dir: Union[str, os.PathLike, None] = DEFAULT_DATA_DIR, label_set: str = "worse",
                 batch_size: int = 128, image_size: int = 32, train_subset: Optional[int] = None,
                 test_subset: Optional[int] = None, holdout_fraction: float = 0.2, seed: int = 0,
                 cache_dir: Union[str, os.PathLike, None] = None, num_workers: int = 0, index_key: str = "index",
                 eval_batch_size: int = 512, progress: bool = True) -> None:
        super().__init__(batch_size, holdout_fraction, seed, num_workers, index_key, eval_batch_size)
        if label_set not in CIFAR10N_LABEL_SETS:
            raise ValueError(f"Expected `label_set` in {list(CIFAR10N_LABEL_SETS)}, but got {label_set!r}.")
        if isinstance(image_size, bool) or not isinstance(image_size, int) or not 8 <= image_size <= 64:
            raise ValueError(f"Expected `image_size` to be an integer in [8, 64], but got {image_size!r}.")
        for name, value, limit in (("train_subset", train_subset, 50_000), ("test_subset", test_subset, 10_000)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or not 20 <= value <= limit):
                raise ValueError(f"Expected `{name}` to be None or an integer in [20, {limit}], but got {value!r}.")
        self.data_dir, self.label_set, self.image_size = data_dir, label_set, image_size
        self.train_subset, self.test_subset = train_subset, test_subset
        self.cache_dir, self.progress = cache_dir, progress
        self.classes: list[str] = []

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is not None:
            return
        images_path = require_file(self.data_dir, CIFAR10_IMAGES)
        labels_path = require_file(self.data_dir, CIFAR10N_LABELS)
        with np.load(labels_path) as f:
            clean, noisy = f["clean_label"].astype(np.int64), f[CIFAR10N_LABEL_SETS[self.label_set]].astype(np.int64)
        with np.load(images_path) as f:
            if not np.array_equal(f["train_labels"], clean):
                raise ValueError(f"The clean labels of {str(labels_path)!r} are not aligned with the train_labels of "
                                 f"{str(images_path)!r}; the two files must come from the same DATA.md release.")
            self.classes = [str(c) for c in f["classes"]]
            test_labels = f["test_labels"].astype(np.int64)
            pool = np.arange(len(clean)) if self.train_subset is None else \
                stratified_split(clean, len(clean) - self.train_subset, self.seed)[0]
            test = np.arange(len(test_labels)) if self.test_subset is None else \
                stratified_split(test_labels, len(test_labels) - self.test_subset, self.seed)[0]
            train_u8 = self._decoded(f, "train", pool, images_path)
            test_u8 = self._decoded(f, "test", test, images_path)
        train, holdout = stratified_split(clean[pool], self.holdout_fraction, self.seed + 1)
        self._set_splits(to_normalised_tensor(train_u8, self.image_size), torch.as_tensor(noisy[pool]),
                         torch.as_tensor(clean[pool]), train, holdout,
                         to_normalised_tensor(test_u8, self.image_size), torch.as_tensor(test_labels[test]), pool, test)

    def _decoded(self, npz: Any, split: str, indices: np.ndarray, source: Path) -> np.ndarray:
        """uint8 images ``indices`` of ``split``: decoded now, or read from (and written to) ``cache_dir``."""
        jpeg, offsets = npz[f"{split}_jpeg"], npz[f"{split}_offsets"]
        n = len(offsets) - 1
        if self.cache_dir is None:
            return decode_jpegs(jpeg, offsets, indices, f"decoding CIFAR-10 {split}", self.progress)
        cache = Path(self.cache_dir).expanduser() / f"cifar10_{split}_{n}x32x32x3_{jpeg.nbytes}.npy"
        if cache.is_file():
            try:
                arr = np.load(cache, mmap_mode="r")
                if arr.shape == (n, 32, 32, 3) and arr.dtype == np.uint8 and \
                        cache.stat().st_size == arr.offset + arr.nbytes:
                    return np.asarray(arr[indices])
                problem = f"shape {arr.shape} {arr.dtype}, {cache.stat().st_size} bytes"
            except (ValueError, OSError) as err:
                problem = str(err)
            warnings.warn(f"The decoded-image cache {str(cache)!r} does not match {str(source)!r} ({problem}); "
                          "decoding again and replacing it.", stacklevel=2)
        full = decode_jpegs(jpeg, offsets, np.arange(n), f"decoding CIFAR-10 {split} (cache)", self.progress)
        if full.shape != (n, 32, 32, 3):
            raise ValueError(f"Expected 32×32 RGB CIFAR-10 images in {str(source)!r}, but decoded {full.shape}.")
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f"{cache.stem}.{os.getpid()}.tmp.npy")
        np.save(tmp, full)
        os.replace(tmp, cache)  # atomic: a concurrent reader never sees a partial file
        return full[indices]
