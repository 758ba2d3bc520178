"""The CoLoR-Filter subset file: which training samples an offline selection keeps, keyed by sample index.

A ``torch.save`` file in the format of RHO-LOSS's irreducible-loss table
(:func:`lightning_select.io.write_index_table`): ``[N]`` columns ``prior_loss``, ``conditional_loss``,
``score`` (their difference), ``kept`` (bool), ``weight`` (0 outside the subset) and ``targets`` (the
training labels it was scored against), plus ``meta`` (``num_samples``, the options it was built
with). :func:`load_subset_file` refuses a file built for other data (another length, or other stored
targets) with an error that names the file, the mismatch and the command that rebuilds it.

Built by :func:`lightning_select.policies.color_filter.build_color_subset`, by
``python -m lightning_select.color_filter`` (noisy digits / CIFAR-10N) or on first use by
:class:`~lightning_select.policies.color_filter.ColorFilter`; read by the datamodules'
``sampler="subset_file"`` through :class:`~lightning_select.samplers.subset.SubsetSampler`.

Example::

    >>> import os, tempfile, torch
    >>> path = os.path.join(tempfile.mkdtemp(), "subset.pt")
    >>> _ = write_subset_file(path, prior_loss=torch.tensor([2.0, 1.0, 3.0]), conditional_loss=torch.tensor(
    ...     [1.0, 1.5, 0.5]), kept=torch.tensor([True, False, True]), weight=torch.tensor([1.0, 0.0, 1.0]),
    ...     targets=torch.tensor([4, 5, 6]), meta={"keep": 0.5})
    >>> subset = load_subset_file(path, targets=torch.tensor([4, 5, 6]))
    >>> subset.indices.tolist(), subset.kept_weights.tolist(), subset.meta["num_samples"]
    ([0, 2], [1.0, 1.0], 3)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor

from lightning_select.io import read_index_table, write_index_table

PathLike = Union[str, "os.PathLike[str]"]
SUBSET_KEYS = ("score", "kept", "weight", "prior_loss", "conditional_loss", "targets")
WHAT = "CoLoR-Filter subset file"
BUILD_HINT = ("build it with `python -m lightning_select.color_filter --out PATH` (noisy digits; --help for "
              "CIFAR-10N and the options), or `lightning_select.policies.color_filter.build_color_subset(...)`, "
              "or delete it and let ColorFilter(build_if_missing=True) build it on first use "
              "(`python train.py +selector=color_filter` does)")


@dataclass(frozen=True)
class SubsetFile:
    """A loaded, checked subset file (all tensors ``[N]``, on the CPU)."""

    path: str
    kept: Tensor
    weights: Tensor
    scores: Tensor
    prior_loss: Tensor
    conditional_loss: Tensor
    targets: Tensor
    meta: dict

    @property
    def indices(self) -> Tensor:
        """Sorted ``int64`` sample indices of the kept samples."""
        return self.kept.nonzero().flatten()

    @property
    def kept_weights(self) -> Tensor:
        """``float32`` weights of :attr:`indices`, in the same order."""
        return self.weights[self.kept]

    @property
    def num_samples(self) -> int:
        return int(self.kept.numel())


def write_subset_file(path: PathLike, prior_loss: Tensor, conditional_loss: Tensor, kept: Tensor, weight: Tensor,
                      targets: Tensor, meta: dict[str, Any]) -> Path:
    """Write the ``[N]`` columns (dense, by sample index) atomically; ``score`` is ``prior − conditional``."""
    columns = {"prior_loss": prior_loss.float().cpu(), "conditional_loss": conditional_loss.float().cpu(),
               "score": (prior_loss.float() - conditional_loss.float()).cpu(), "kept": kept.bool().cpu(),
               "weight": weight.float().cpu(), "targets": targets.long().cpu()}
    meta = {"method": "color_filter", **meta, "num_kept": int(kept.sum())}
    return write_index_table(path, columns, meta)


def load_subset_file(path: PathLike, targets: Optional[Tensor] = None) -> SubsetFile:
    """The subset file at ``path``, checked against the training set's ``targets`` (``[N]``, by sample index).

    Raises :class:`~lightning_select.core.SelectionError` naming the file, the problem and the command
    that rebuilds it when the file is missing, is not a subset file, holds another number of samples
    or other stored targets, keeps nothing, or has negative or non-finite weights.
    """
    from lightning_select.core.context import SelectionError

    columns, meta = read_index_table(path, SUBSET_KEYS, targets, WHAT, BUILD_HINT)
    kept, weights = columns["kept"], columns["weight"].float()
    if kept.dtype != torch.bool or int(kept.sum()) == 0:
        raise SelectionError(f"The {WHAT} {str(path)!r} keeps no sample (or its 'kept' column is not bool); "
                             f"{BUILD_HINT}.")
    if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()) or float(weights[kept].sum()) <= 0:
        raise SelectionError(f"The {WHAT} {str(path)!r} has negative or non-finite weights, or none positive on "
                             f"the kept samples; {BUILD_HINT}.")
    return SubsetFile(str(path), kept, weights, columns["score"].float(), columns["prior_loss"].float(),
                      columns["conditional_loss"].float(), columns["targets"].long(), meta)
