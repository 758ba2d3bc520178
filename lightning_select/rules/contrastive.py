"""In-batch contrastive outputs and their per-row InfoNCE losses.

A ``training_step`` that learns embeddings returns an :class:`EmbeddingOutput` instead of a loss.
The engine turns it into a :class:`ContrastiveLogits` (score blocks plus masks), lets policies edit
the logits (GIST masks false negatives there), and reduces it to one loss per anchor row:

    ℓ_i = logsumexp_j(z_ij) − z_{i, target_i},     z = [AP | AN_1 | … | AN_K] / τ

which is sentence-transformers' MultipleNegativesRankingLoss at ``scale = 1/τ`` (its default
scale 20 is τ = 0.05). All scores are cosine similarities computed in fp32 with autocast off.

Example::

    >>> import torch
    >>> out = EmbeddingOutput(anchor=torch.eye(2), positive=torch.eye(2), temperature=0.5)
    >>> logits = build_logits(out)
    >>> logits.logits().tolist()
    [[2.0, 0.0], [0.0, 2.0]]
    >>> round(float(logits.per_row_loss()[0]), 4)  # ln(1 + e^-2)
    0.1269
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

_WARNED_NO_ENGINE = False


@dataclass(eq=False)
class EmbeddingOutput(Mapping):
    """What a contrastive ``training_step`` returns.

    With a lightning_select engine installed (any policy, or a ``SelectionEngine`` callback) the
    engine builds the logits, lets policies edit them and reduces them. Without one, the output is
    still a valid Lightning ``training_step`` result: it is a read-only mapping whose only key,
    ``"loss"``, is the mean in-batch InfoNCE (MNRL) loss, so a stock ``Trainer`` trains plain
    in-batch contrastive learning. A one-time warning then says that no policy is active.

    Args:
        anchor: ``[B, D]`` anchor embeddings (need not be normalised).
        positive: ``[B, D]`` positive embeddings; row ``i`` is the positive of anchor ``i``.
        negatives: optional hard negatives, ``[B, D]`` (one column) or ``[B, K, D]`` (K columns).
            Every row's negatives are candidates for every anchor, as in MNRL.
        temperature: softmax temperature τ > 0 (MNRL's ``scale`` is ``1/τ``).
    """

    anchor: Tensor
    positive: Tensor
    negatives: Optional[Tensor] = None
    temperature: float = 0.05

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"Expected `temperature` to be a positive finite float, but got {self.temperature!r}.")
        if self.anchor.dim() != 2 or self.positive.shape != self.anchor.shape:
            raise ValueError(
                "Expected `anchor` and `positive` to be [B, D] tensors of the same shape, but got "
                f"{tuple(self.anchor.shape)} and {tuple(self.positive.shape)}."
            )
        if self.negatives is not None:
            if self.negatives.dim() == 2:
                self.negatives = self.negatives.unsqueeze(1)
            if self.negatives.dim() != 3 or self.negatives.shape[0] != self.anchor.shape[0] or (
                self.negatives.shape[2] != self.anchor.shape[1]
            ):
                raise ValueError(
                    f"Expected `negatives` to be [B, D] or [B, K, D] with B={self.anchor.shape[0]}, "
                    f"D={self.anchor.shape[1]}, but got {tuple(self.negatives.shape)}."
                )

    # ------------------------------------------------------------------ the Mapping Lightning reads
    def __getitem__(self, key: str) -> Tensor:
        if key != "loss":
            raise KeyError(key)
        global _WARNED_NO_ENGINE
        if not _WARNED_NO_ENGINE:
            _WARNED_NO_ENGINE = True
            warnings.warn(
                "lightning_select: training_step returned an EmbeddingOutput but no lightning_select engine is "
                "installed, so it trains as plain in-batch InfoNCE (MNRL). Add a policy callback (e.g. "
                "GuidedNegatives, LossHistory) or SelectionEngine() to the Trainer to select, weight or filter.",
                UserWarning,
            )
        return info_nce_per_row(self).mean()

    def __iter__(self) -> Iterator[str]:
        return iter(("loss",))

    __eq__ = object.__eq__  # identity: comparing outputs must not compute a loss
    __hash__ = object.__hash__

    def __len__(self) -> int:
        return 1

    @property
    def num_negative_columns(self) -> int:
        return 0 if self.negatives is None else int(self.negatives.shape[1])

    def finite_rows(self) -> Tensor:
        """``[B]`` bool: rows whose anchor, positive and negatives are all finite."""
        # A row sum is non-finite iff the row holds a NaN or an inf: one reduction per tensor, cheap.
        total = self.anchor.detach().float().sum(1) + self.positive.detach().float().sum(1)
        if self.negatives is not None:
            total = total + self.negatives.detach().float().flatten(1).sum(1)
        return torch.isfinite(total)


@dataclass
class LogitBlock:
    """One block of candidate scores for every anchor row: ``scores[i, j]`` is a cosine similarity.

    ``bias`` is an additive logit offset, in logit units (added after the division by τ, before the
    mask), e.g. the hardness bonus ``α·stopgrad(s)`` of
    :func:`~lightning_select.rules.hardness.apply_hardness`; masked entries stay −inf.
    """

    name: str
    scores: Tensor
    mask: Optional[Tensor] = None  # True = removed from the softmax
    bias: Optional[Tensor] = None  # added to scores / τ; None = 0
    positive: Optional[Tensor] = None  # True = an extra positive of the row (multi-positive InfoNCE)

    def add_mask(self, mask: Tensor) -> None:
        if mask.shape != self.scores.shape:
            raise ValueError(
                f"Expected a mask of shape {tuple(self.scores.shape)} for block {self.name!r}, but got "
                f"{tuple(mask.shape)}."
            )
        self.mask = mask if self.mask is None else (self.mask | mask)

    def add_positive(self, positive: Tensor) -> None:
        """Mark entries as extra positives of their row (they stay in the softmax and join the numerator)."""
        if positive.shape != self.scores.shape:
            raise ValueError(
                f"Expected a positive mask of shape {tuple(self.scores.shape)} for block {self.name!r}, but got "
                f"{tuple(positive.shape)}."
            )
        self.positive = positive if self.positive is None else (self.positive | positive)

    def add_bias(self, bias: Tensor) -> None:
        """Add ``bias`` (logit units, same shape as ``scores``) to this block's logits."""
        if bias.shape != self.scores.shape:
            raise ValueError(
                f"Expected a bias of shape {tuple(self.scores.shape)} for block {self.name!r}, but got "
                f"{tuple(bias.shape)}."
            )
        self.bias = bias if self.bias is None else self.bias + bias


@dataclass
class ContrastiveLogits:
    """Score blocks for every anchor row, their masks, the target column and the temperature.

    The target of row ``i`` is column ``target[i]`` of the first block (``"ap"``). Policies edit the
    logits by adding blocks (:meth:`add_block`), masks (``block(name).add_mask``), additive logit
    offsets (``block(name).add_bias``) or extra positives (``block(name).add_positive``); the target
    entry itself is never masked, and neither is an extra positive.

    With extra positives ``P_i`` (the target always among them) the row loss is the multi-positive
    InfoNCE of supervised contrastive learning's ``L_out`` form, the mean over the positives of their
    negative log-softmax: ``ℓ_i = logsumexp_j(z_ij) − mean_{p ∈ P_i} z_ip``. Without extra positives it
    is the usual cross-entropy of the target.
    """

    blocks: list[LogitBlock]
    target: Tensor
    temperature: float
    embeddings: dict[str, Tensor] = field(default_factory=dict)

    def block(self, name: str) -> LogitBlock:
        for b in self.blocks:
            if b.name == name:
                return b
        raise KeyError(f"No logit block named {name!r}; present: {[b.name for b in self.blocks]}.")

    def add_block(self, name: str, scores: Tensor, mask: Optional[Tensor] = None) -> None:
        if any(b.name == name for b in self.blocks):
            raise ValueError(f"A logit block named {name!r} already exists.")
        self.blocks.append(LogitBlock(name, scores, mask))

    def logits(self) -> Tensor:
        """``[B, C]`` fp32 logits with masked entries at −inf (the target is always kept)."""
        parts = []
        for k, b in enumerate(self.blocks):
            z = b.scores / self.temperature
            if b.bias is not None:
                z = z + b.bias
            if b.mask is not None:
                mask = b.mask if b.positive is None else b.mask & ~b.positive
                if k == 0:
                    rows = torch.arange(self.target.shape[0], device=self.target.device)
                    mask = mask.clone()
                    mask[rows, self.target] = False
                z = z.masked_fill(mask, float("-inf"))
            parts.append(z)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def positives(self) -> Optional[Tensor]:
        """``[B, C]`` bool of every row's positives (target and extra ones), or None without extra positives."""
        if all(b.positive is None for b in self.blocks):
            return None
        parts = [b.positive if b.positive is not None else torch.zeros_like(b.scores, dtype=torch.bool)
                 for b in self.blocks]
        rows = torch.arange(self.target.shape[0], device=self.target.device)
        parts[0] = parts[0].clone()
        parts[0][rows, self.target] = True
        return torch.cat(parts, dim=1)

    def per_row_loss(self) -> Tensor:
        """``[B]`` InfoNCE losses ``logsumexp(z_i) − z_{i,target_i}`` (a fused cross-entropy), or the
        multi-positive form ``logsumexp(z_i) − mean_{p ∈ P_i} z_ip`` when extra positives are marked."""
        z = self.logits()
        positives = self.positives()
        if positives is None:
            return F.cross_entropy(z, self.target, reduction="none")
        positive_sum = torch.where(positives, z, torch.zeros_like(z)).sum(1)
        return torch.logsumexp(z, dim=1) - positive_sum / positives.sum(1)

    def attracted_fraction(self) -> dict[str, Tensor]:
        """Fraction of each block's entries turned into extra positives (the target excluded)."""
        out = {}
        for k, b in enumerate(self.blocks):
            if b.positive is None:
                out[b.name] = b.scores.new_zeros(())
                continue
            n = b.positive.numel() - (self.target.shape[0] if k == 0 else 0)
            rows = torch.arange(self.target.shape[0], device=b.positive.device)
            extra = b.positive.sum() - (b.positive[rows, self.target].sum() if k == 0 else 0)
            out[b.name] = extra.float() / max(n, 1)
        return out

    def masked_fraction(self) -> dict[str, Tensor]:
        """Fraction of entries removed from each block (the target entry excluded from ``ap``)."""
        out = {}
        for k, b in enumerate(self.blocks):
            if b.mask is None:
                out[b.name] = b.scores.new_zeros(())
                continue
            n = b.mask.numel() - (self.target.shape[0] if k == 0 else 0)
            removed = b.mask.sum() - (b.mask[torch.arange(self.target.shape[0]), self.target].sum() if k == 0 else 0)
            out[b.name] = removed.float() / max(n, 1)
        return out


def build_logits(output: EmbeddingOutput) -> ContrastiveLogits:
    """MNRL logits for an :class:`EmbeddingOutput`: ``AP = cos(a, p)`` and one ``AN_k`` block per
    hard-negative column, all in fp32. Positives of other rows are the in-batch negatives."""
    with torch.autocast(device_type=output.anchor.device.type, enabled=False):
        a = F.normalize(output.anchor.float(), dim=-1)
        p = F.normalize(output.positive.float(), dim=-1)
        blocks = [LogitBlock("ap", a @ p.T)]
        embeddings = {"anchor": a, "positive": p}
        if output.negatives is not None:
            n = F.normalize(output.negatives.float(), dim=-1)
            embeddings["negatives"] = n
            for k in range(n.shape[1]):
                blocks.append(LogitBlock(f"an{k}", a @ n[:, k].T))
    target = torch.arange(a.shape[0], device=a.device)
    return ContrastiveLogits(blocks, target, float(output.temperature), embeddings)


def info_nce_per_row(output: EmbeddingOutput) -> Tensor:
    """``[B]`` per-row MNRL/InfoNCE losses of an :class:`EmbeddingOutput` (no masking)."""
    return build_logits(output).per_row_loss()
