"""``FalseNegativeAudit``: how many in-batch false negatives a batch holds, and what GIST did about them.

Gold false negatives need gold keys: a candidate is a gold false negative of anchor ``i`` when its
key equals the anchor's (a Quora duplicate cluster, a digit class, an exact SICK sentence). The audit
counts them per logit block and compares them with the candidates a
:class:`~lightning_select.policies.guided_negatives.GuidedNegatives` in the same Trainer flagged
(masked in ``drop`` mode, made positives in ``attract`` mode), so every batch composition and every
false-negative mode can be compared on one scale: the share of candidates that are false negatives
the policy *leaves in* as negatives.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_select.core import SelectionPolicy, StepContext
from lightning_select.core.engine import override
from lightning_select.core.options import str_list_option, str_option
from lightning_select.policies.guided_negatives import GuidedNegatives

#: Running totals per block: candidates, gold false negatives, flagged candidates, flagged gold ones.
AUDIT_FIELDS = ("candidates", "gold", "flagged", "true_flags")


def audit_block(gold: Tensor, flagged: Optional[Tensor], exclude: Optional[Tensor] = None) -> Tensor:
    """``[4]`` float64 counts (:data:`AUDIT_FIELDS`) of one ``[B, C]`` block.

    ``gold`` marks gold false negatives, ``flagged`` what a guide flagged (None: nothing), ``exclude``
    entries that are not candidates at all (a row's own positive).

    Example::

        >>> gold = torch.tensor([[False, True], [False, False]])
        >>> flagged = torch.tensor([[False, True], [True, False]])
        >>> audit_block(gold, flagged).tolist()
        [4.0, 1.0, 2.0, 1.0]
    """
    keep = torch.ones_like(gold) if exclude is None else ~exclude
    gold = gold & keep
    flagged = torch.zeros_like(gold) if flagged is None else flagged & keep
    return torch.stack([keep.sum(), gold.sum(), flagged.sum(), (gold & flagged).sum()]).double()


def audit_summary(sums: Tensor, block_names: Sequence[str]) -> dict[str, float]:
    """Fractions from the totals: per block ``gold_fraction`` (false negatives among candidates),
    ``flagged_fraction``, ``precision`` and ``recall`` of the flags against gold, and
    ``left_in_fraction`` (gold false negatives not flagged, among candidates).

    Example::

        >>> audit_summary(torch.tensor([[100.0, 10.0, 8.0, 6.0]]), ["ap"])["ap/left_in_fraction"]
        0.04
    """
    out: dict[str, float] = {}
    for name, (candidates, gold, flagged, true_flags) in zip(block_names, sums.tolist()):
        out[f"{name}/gold_fraction"] = gold / max(candidates, 1.0)
        out[f"{name}/flagged_fraction"] = flagged / max(candidates, 1.0)
        out[f"{name}/precision"] = true_flags / flagged if flagged else float("nan")
        out[f"{name}/recall"] = true_flags / gold if gold else float("nan")
        out[f"{name}/left_in_fraction"] = (gold - true_flags) / max(candidates, 1.0)
    return out


class FalseNegativeAudit(SelectionPolicy):
    """Count gold in-batch false negatives per logit block, and score a guide's flags against them.

    - **What it changes**: nothing (an observer).
    - **Unbiased**: not applicable.
    - **Extra cost**: a few ``[B, C]`` comparisons per step; under DDP one all-reduce of a
      ``[blocks, 4]`` tensor per step, so every rank holds the same totals.
    - **Reference**: the gold-cluster audit of the GISTEmbed benchmarks (issue "hard-negative-aware
      batch composition": false-negative density, and the guide's precision and recall).
    - **Defaults**: blocks ``ap`` (anchor × in-batch positives, the row's own positive excluded) and one
      ``an{k}`` per negative key (anchor × every row's ``k``-th hard negative, the own one included,
      as GIST's rule treats it); AA/PP blocks are not audited.

    With a :class:`GuidedNegatives` in the Trainer (found by type) the audit reads the flags of the
    step (``GuidedNegatives.last_masks``: masked in ``drop`` mode, attracted in ``attract`` mode).
    Without one, nothing is flagged and the audit measures the batches alone: how many false
    negatives a batch composition brings. Under ``gather_across_devices`` the AP candidates are
    every rank's positives, and so are the keys compared (gathered).

    Logged at the engine's cadence, as running totals: ``fn_audit/<block>_gold_fraction``,
    ``_flagged_fraction``, ``_precision``, ``_recall`` and ``_left_in_fraction``.

    Args:
        key: batch key of the anchors' gold keys (e.g. ``"label"``, ``"anchor_cluster"``).
        positive_key: batch key of the positives' gold keys (default: ``key``).
        negative_keys: batch keys of the gold keys of each hard-negative column, in the order of the
            ``EmbeddingOutput``'s negatives.

    Example::

        >>> audit = FalseNegativeAudit(key="anchor_cluster", positive_key="positive_cluster")
        >>> # Trainer(callbacks=[GuidedNegatives("minilm"), audit]).fit(...); audit.summary()
    """

    order = 960
    needs_embeddings = True

    def __init__(self, key: str = "label", positive_key: Optional[str] = None,
                 negative_keys: Sequence[str] = ()) -> None:
        who = type(self).__name__
        self.key = str_option(who, "key", key)
        self.positive_key = self.key if positive_key is None else str_option(who, "positive_key", positive_key)
        self.negative_keys = str_list_option(who, "negative_keys", negative_keys)
        self.block_names = ["ap"] + [f"an{k}" for k in range(len(self.negative_keys))]
        self.sums = torch.zeros(len(self.block_names), len(AUDIT_FIELDS), dtype=torch.float64)
        self.steps = 0
        self._gist: Optional[GuidedNegatives] = None

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        found = [cb for cb in trainer.callbacks if isinstance(cb, GuidedNegatives)]  # type: ignore[attr-defined]
        self._gist = found[0] if found else None

    @staticmethod
    def _keys(ctx: StepContext, name: str) -> Tensor:
        return ctx.row_column(name, "FalseNegativeAudit", "gold keys",
                              "set `key`/`positive_key`/`negative_keys` to the batch keys of the gold labels (e.g. a "
                              "Quora cluster id or a class label)")

    def observe(self, ctx: StepContext) -> None:
        if ctx.phase != "train":
            return
        n = int(ctx.rows.numel())
        device = ctx.losses.device if ctx.losses is not None else torch.device("cpu")
        counts = torch.zeros_like(self.sums, device=device)
        if ctx.has_samples and n:
            anchor = self._keys(ctx, self.key).to(device)
            positive = self._keys(ctx, self.positive_key).to(device)
            masks = self._gist.last_masks if self._gist is not None else {}
            flagged = masks.get("ap")
            if flagged is not None and flagged.shape[1] != n:  # gathered candidates (gather_across_devices)
                positive = ctx.all_gather(positive).reshape(-1)
            rows = torch.arange(n, device=device)
            own = torch.zeros(n, positive.numel(), dtype=torch.bool, device=device)
            own[rows, rows + (ctx.trainer.global_rank * n if positive.numel() != n else 0)] = True
            counts[0] = audit_block(anchor.view(-1, 1) == positive.view(1, -1), flagged, own).to(device)
            for k, name in enumerate(self.negative_keys):
                negative = self._keys(ctx, name).to(device)
                flagged_k = masks.get(f"an{k}")
                if flagged_k is not None and flagged_k.shape[1] != n:
                    negative = ctx.all_gather(negative).reshape(-1)
                counts[1 + k] = audit_block(anchor.view(-1, 1) == negative.view(1, -1), flagged_k).to(device)
        if ctx.world_size > 1:  # every rank observes every step
            counts = ctx.trainer.strategy.reduce(counts, reduce_op="sum")
        self.sums = self.sums.to(device) + counts
        self.steps += 1
        if ctx.should_log:
            for name, value in self.summary().items():
                if value == value:  # NaN (nothing flagged or no gold yet) is not logged
                    ctx.log(f"fn_audit/{name.replace('/', '_')}", value)

    def summary(self) -> dict[str, float]:
        """The running fractions (:func:`audit_summary`) since the start of training."""
        return audit_summary(self.sums.cpu(), self.block_names)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"sums": self.sums.cpu().clone(), "steps": self.steps, "blocks": list(self.block_names)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("blocks") != self.block_names:
            raise ValueError(f"FalseNegativeAudit: the checkpoint audited blocks {state_dict.get('blocks')}, but this "
                             f"audit has {self.block_names}; resume with the same negative_keys.")
        self.sums = state_dict["sums"].detach().to(torch.float64).clone()
        self.steps = int(state_dict["steps"])
