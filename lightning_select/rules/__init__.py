"""Pure tensor rules: they import only torch, take tensors and return tensors, and are doctested.

Every policy callback in :mod:`lightning_select.policies` wraps one of these.
"""

from lightning_select.rules.contrastive import (
    ContrastiveLogits,
    EmbeddingOutput,
    LogitBlock,
    build_logits,
    info_nce_per_row,
)
from lightning_select.rules.gist import apply_gist, false_negative_mask, gist_loss, gist_thresholds
from lightning_select.rules.reduction import effective_sample_size, weighted_global_mean

__all__ = [
    "ContrastiveLogits",
    "EmbeddingOutput",
    "LogitBlock",
    "apply_gist",
    "build_logits",
    "effective_sample_size",
    "false_negative_mask",
    "gist_loss",
    "gist_thresholds",
    "info_nce_per_row",
    "weighted_global_mean",
]
