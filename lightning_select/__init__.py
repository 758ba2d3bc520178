"""lightning_select: per-step sample selection, weighting and negative filtering for PyTorch Lightning.

Add policy callbacks to any ``Trainer``; the engine (:mod:`lightning_select.engine`) runs one
pipeline per training step. Importing the package registers the ``*_select`` strategy names.
"""

from lightning_select.batch import IndexedDataset, batch_size_of, get_indices, select_batch
from lightning_select.contrastive import ContrastiveLogits, EmbeddingOutput, build_logits, info_nce_per_row
from lightning_select.engine import SelectionEngine, SelectionError, SelectionPolicy, StepContext
from lightning_select.gist import (
    GuideEmbeddingCache,
    GuidedNegatives,
    SentenceTransformerGuide,
    TransformerGuide,
    apply_gist,
    false_negative_mask,
    gist_loss,
    gist_thresholds,
    load_guide,
)
from lightning_select.history import LossHistory, SampleLossStore
from lightning_select.reduction import effective_sample_size, weighted_global_mean
from lightning_select.strategies import DDPSelectStrategy, SingleDeviceSelectStrategy, register_strategies

register_strategies()

__version__ = "0.1.0"

__all__ = [
    "ContrastiveLogits",
    "DDPSelectStrategy",
    "EmbeddingOutput",
    "GuideEmbeddingCache",
    "GuidedNegatives",
    "IndexedDataset",
    "LossHistory",
    "SampleLossStore",
    "SelectionEngine",
    "SelectionError",
    "SelectionPolicy",
    "SentenceTransformerGuide",
    "TransformerGuide",
    "SingleDeviceSelectStrategy",
    "StepContext",
    "batch_size_of",
    "apply_gist",
    "build_logits",
    "effective_sample_size",
    "false_negative_mask",
    "get_indices",
    "gist_loss",
    "gist_thresholds",
    "info_nce_per_row",
    "load_guide",
    "select_batch",
    "weighted_global_mean",
]
