"""Pure tensor rules: they import only torch, take tensors and return tensors, and are doctested.

Every policy callback in :mod:`lightning_select.policies` wraps one of these.
"""

from lightning_select.rules.color_filter import color_scores, selection_weights, top_fraction_mask
from lightning_select.rules.contrastive import (
    ContrastiveLogits,
    EmbeddingOutput,
    LogitBlock,
    build_logits,
    info_nce_per_row,
)
from lightning_select.rules.entropy import (
    eata_weights,
    prediction_entropy,
    redundancy_mask,
    reliable_mask,
    update_moving_average,
)
from lightning_select.rules.fisher import diagonal_fisher, fisher_penalty
from lightning_select.rules.gradient_noise import gradient_noise_statistics, required_micro_batches
from lightning_select.rules.gist import apply_gist, false_negative_mask, gist_loss, gist_thresholds
from lightning_select.rules.infobatch import InfoBatchPlan, infobatch_plan
from lightning_select.rules.hardness import apply_hardness, hardness_logits, hardness_loss, negative_masks
from lightning_select.rules.reduction import effective_sample_size, weighted_global_mean
from lightning_select.rules.weighting import (
    bound_weights,
    focal_gradient_weights,
    focal_weights,
    loss_softmax_weights,
    ohem_mask,
)
from lightning_select.rules.selection import (
    bernoulli_keep,
    composer_keep,
    loss_percentiles,
    push_history,
    selective_backprop_probabilities,
    uniform_keep,
)

__all__ = [
    "ContrastiveLogits",
    "InfoBatchPlan",
    "EmbeddingOutput",
    "LogitBlock",
    "apply_gist",
    "bernoulli_keep",
    "color_scores",
    "composer_keep",
    "eata_weights",
    "build_logits",
    "effective_sample_size",
    "false_negative_mask",
    "diagonal_fisher",
    "fisher_penalty",
    "gist_loss",
    "gist_thresholds",
    "gradient_noise_statistics",
    "info_nce_per_row",
    "infobatch_plan",
    "loss_percentiles",
    "prediction_entropy",
    "push_history",
    "redundancy_mask",
    "reliable_mask",
    "required_micro_batches",
    "selection_weights",
    "selective_backprop_probabilities",
    "top_fraction_mask",
    "uniform_keep",
    "update_moving_average",
    "weighted_global_mean",
    "bound_weights",
    "focal_gradient_weights",
    "focal_weights",
    "loss_softmax_weights",
    "ohem_mask",
    "apply_hardness",
    "hardness_logits",
    "hardness_loss",
    "negative_masks",
]
