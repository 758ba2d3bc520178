"""``SelectionAudit``: how many of the samples a policy trained on were mislabelled, against the base rate.

A selection policy that favours hard examples (selective backprop, OHEM) tends to train on the
mislabelled ones, and one that discounts irreducible loss (RHO-LOSS) should avoid them. With a task
whose mislabelled samples are known (:mod:`lightning_select.data.noisy_labels`), this observer
measures it: the *share* of trained rows that are mislabelled, and the *ratio* of that share to the
dataset's base rate (1 = no preference, > 1 = the policy seeks out noise, < 1 = it avoids it).
"""

from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_select.core import SelectionError, SelectionPolicy, StepContext
from lightning_select.core.engine import override
from lightning_select.core.options import str_option

_COUNTERS = ("rows", "mislabelled", "weight", "weight_mislabelled", "epoch_rows", "epoch_mislabelled")


class SelectionAudit(SelectionPolicy):
    """Measure the share of mislabelled samples among the trained rows, and its ratio to the base rate.

    - **What it changes**: nothing (an observer).
    - **Unbiased**: yes; it does not touch the gradient.
    - **Extra cost**: none beyond the engine's one per-step gather of every rank's trained rows
      (``ctx.gathered``, shared with every other observer); one ``[N]`` bool mask (1 byte per sample)
      on the training device; a few scalar counters.
    - **Reference**: the share of corrupted points among the selected ones that Mindermann et al.
      report for RHO-LOSS ("Prioritized Training on Points that are Learnable, Worth Learning, and
      Not Yet Learnt", ICML 2022), here on CIFAR-10N real label noise (Wei et al., ICLR 2022). It is
      a count, so there is no implementation to check it against; the tests check ratio ≈ 1 under
      uniform selection and > 1 for a keep-the-highest-loss policy.
    - **Defaults**: counts every trained row once per step (a row trained twice in one step, e.g. by
      DistributedSampler padding, counts twice); the weighted variant uses the engine's final weights.

    Per step (at the engine's logging cadence) it logs ``audit/mislabelled_share`` and
    ``audit/mislabelled_ratio`` of that step's trained rows and ``audit/weighted_mislabelled_ratio``
    (rows weighted by their final weights); at each epoch end ``audit/epoch_mislabelled_ratio``.
    Running totals since the start of training (:attr:`share`, :attr:`ratio`,
    :attr:`weighted_ratio`) are kept in :meth:`state_dict`, so a resumed run continues them exactly.
    Under DDP every rank observes every rank's rows, so every rank holds the same totals.

    Args:
        noisy_mask: ``[N]`` bool, ``noisy_mask[i]`` = training sample ``i`` is mislabelled.
        datamodule_attr: instead of ``noisy_mask``, read the mask from this attribute of
            ``trainer.datamodule`` at ``on_train_start`` (e.g. ``"train_noisy_mask"``).

    Example::

        >>> import torch
        >>> audit = SelectionAudit(noisy_mask=torch.tensor([True, False, False, False]))
        >>> audit.base_rate
        0.25
        >>> # Trainer(callbacks=[SelectiveBackprop(...), audit]).fit(...)  ->  audit.ratio
    """

    order = 950
    needs_global_rows = True

    def __init__(self, noisy_mask: Optional[Tensor] = None, datamodule_attr: Optional[str] = None) -> None:
        str_option("SelectionAudit", "datamodule_attr", datamodule_attr, optional=True)
        if (noisy_mask is None) == (datamodule_attr is None):
            raise ValueError("SelectionAudit: pass exactly one of `noisy_mask` (a [N] bool tensor) and "
                             "`datamodule_attr` (e.g. 'train_noisy_mask'), but got "
                             f"noisy_mask={'None' if noisy_mask is None else 'a tensor'}, "
                             f"datamodule_attr={datamodule_attr!r}.")
        self.datamodule_attr = datamodule_attr
        self._mask: Optional[Tensor] = None
        self._base_rate = float("nan")
        if noisy_mask is not None:
            self._set_mask(noisy_mask, "noisy_mask")
        self._totals = {k: torch.zeros((), dtype=torch.float64 if "weight" in k else torch.int64) for k in _COUNTERS}
        self._epoch = -1
        self._restored_mask: Optional[tuple[int, int]] = None

    def _set_mask(self, mask: Any, source: str) -> None:
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.dim() != 1 or mask.numel() == 0:
            shown = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, Tensor) else type(mask).__name__
            raise TypeError(f"SelectionAudit: expected `{source}` to be a non-empty [N] bool tensor, but got {shown}.")
        self._mask = mask.detach()
        self._base_rate = int(mask.sum()) / mask.numel()

    @property
    def noisy_mask(self) -> Optional[Tensor]:
        """The ``[N]`` bool mask of mislabelled training samples (None before it is read from the datamodule)."""
        return self._mask

    @property
    def base_rate(self) -> float:
        """Fraction of the training set that is mislabelled."""
        if self._mask is None:
            raise SelectionError("SelectionAudit has no mask yet: it reads it from the datamodule at on_train_start.")
        return self._base_rate

    def _ratio(self, share: float) -> float:
        base = self.base_rate
        return share / base if base > 0 else float("nan")

    @property
    def share(self) -> float:
        """Share of all trained rows so far that were mislabelled (NaN before any)."""
        rows = int(self._totals["rows"])
        return int(self._totals["mislabelled"]) / rows if rows else float("nan")

    @property
    def ratio(self) -> float:
        """:attr:`share` divided by :attr:`base_rate` (1 = no preference for or against noise)."""
        return self._ratio(self.share)

    @property
    def weighted_ratio(self) -> float:
        """Weight-weighted share of mislabelled rows divided by the base rate."""
        weight = float(self._totals["weight"])
        return self._ratio(float(self._totals["weight_mislabelled"]) / weight) if weight > 0 else float("nan")

    @property
    def totals(self) -> dict[str, Tensor]:
        """The running counters (``rows``, ``mislabelled``, their weighted sums and this epoch's counts)."""
        return {k: v.detach().cpu().clone() for k, v in self._totals.items()}

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.datamodule_attr is not None:
            datamodule = getattr(trainer, "datamodule", None)
            if datamodule is None or not hasattr(datamodule, self.datamodule_attr):
                raise SelectionError(
                    f"SelectionAudit(datamodule_attr={self.datamodule_attr!r}): the trainer's datamodule "
                    f"({type(datamodule).__name__}) has no such attribute. Use a datamodule that provides it "
                    "(lightning_select.data.noisy_labels) or pass `noisy_mask=` explicitly.")
            self._set_mask(getattr(datamodule, self.datamodule_attr), f"datamodule.{self.datamodule_attr}")
        assert self._mask is not None
        if self._restored_mask is not None and self._restored_mask != self._mask_key():
            raise SelectionError(
                f"The restored SelectionAudit counted against a mask of {self._restored_mask[0]} samples with "
                f"{self._restored_mask[1]} mislabelled, but this run's has {self._mask_key()[0]} and "
                f"{self._mask_key()[1]}; resume with the same data (seed, noise rate, label set).")
        self._mask = self._mask.to(pl_module.device)
        self._totals = {k: v.to(pl_module.device) for k, v in self._totals.items()}

    def _mask_key(self) -> tuple[int, int]:
        assert self._mask is not None
        return int(self._mask.numel()), int(self._mask.sum())

    def observe(self, ctx: StepContext) -> None:
        if ctx.phase != "train":
            return
        if self._mask is None:
            raise SelectionError("SelectionAudit was used before on_train_start; it must be a Trainer callback.")
        rows = ctx.gathered
        assert rows is not None
        index = rows["index"]
        if ctx.trainer.current_epoch != self._epoch:
            self._epoch = ctx.trainer.current_epoch
            self._totals["epoch_rows"].zero_()
            self._totals["epoch_mislabelled"].zero_()
        if index.numel() == 0:
            return
        mask = self._mask
        if mask.device != index.device:
            mask = self._mask = mask.to(index.device)
        if bool((index >= mask.numel()).any()):  # the indices were already refused if negative
            raise IndexError(f"SelectionAudit: sample index {int(index.max())} is out of range for a mask of "
                             f"{mask.numel()} samples; is the mask the training set's?")
        noisy = mask[index]
        weight = rows["weight"].to(torch.float64)
        n_noisy = noisy.sum()
        step = {"rows": index.numel(), "mislabelled": n_noisy, "weight": weight.sum(),
                "weight_mislabelled": (weight * noisy).sum(), "epoch_rows": index.numel(), "epoch_mislabelled": n_noisy}
        for key, value in step.items():
            total = self._totals[key]
            if total.device != index.device:
                total = self._totals[key] = total.to(index.device)
            total += value
        if ctx.should_log:
            share = n_noisy.double() / index.numel()
            base = self.base_rate
            ctx.log("audit/mislabelled_share", share.float())
            ctx.log("audit/mislabelled_ratio", (share / base).float() if base > 0 else float("nan"))
            w_sum = step["weight"]
            if float(w_sum) > 0 and base > 0:
                ctx.log("audit/weighted_mislabelled_ratio", (step["weight_mislabelled"] / w_sum / base).float())

    @override
    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        rows = int(self._totals["epoch_rows"])
        if rows and self._mask is not None and trainer.current_epoch == self._epoch:
            share = int(self._totals["epoch_mislabelled"]) / rows
            pl_module.log("audit/epoch_mislabelled_ratio", self._ratio(share), on_step=False, on_epoch=True)

    @override
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {k: v.detach().cpu().clone() for k, v in self._totals.items()}
        state["epoch"] = self._epoch
        if self._mask is not None:
            state["mask_size"], state["mask_mislabelled"] = self._mask_key()
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._totals = {k: state_dict[k].clone() for k in _COUNTERS}
        self._epoch = int(state_dict["epoch"])
        if "mask_size" in state_dict:
            self._restored_mask = (int(state_dict["mask_size"]), int(state_dict["mask_mislabelled"]))
