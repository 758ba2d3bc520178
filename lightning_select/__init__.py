"""lightning_select: per-step sample selection, weighting and negative filtering for PyTorch Lightning.

Add policy callbacks to any ``Trainer``; the engine (:mod:`lightning_select.core.engine`) runs one
pipeline per training step. Importing the package registers the ``*_select`` strategy names.

Layout: :mod:`~lightning_select.rules` (pure tensor rules), :mod:`~lightning_select.core` (engine,
context, policy base, strategies, batch plumbing), :mod:`~lightning_select.guides`,
:mod:`~lightning_select.stats` (the per-sample table and ``LossHistory``),
:mod:`~lightning_select.policies`, :mod:`~lightning_select.samplers`, and data, models, evaluation,
plots and I/O.
"""

from lightning_select.core import (
    DDPSelectStrategy,
    IndexedDataset,
    PreemptionCheckpoint,
    SampleIndex,
    SampleIndexError,
    SelectionEngine,
    SelectionError,
    SelectionPolicy,
    SingleDeviceSelectStrategy,
    StepContext,
    TrainingPreempted,
    batch_size_of,
    get_indices,
    register_strategies,
    select_batch,
)
from lightning_select.guides import GuideEmbeddingCache, SentenceTransformerGuide, TransformerGuide, load_guide
from lightning_select.policies import AdaptiveBatchSize, EntropySelection, GuidedNegatives, ImportanceSampling
from lightning_select.policies import SelectionAudit
from lightning_select.policies import ReducibleLossSelection
from lightning_select.policies import ColorFilter
from lightning_select.policies import SelectiveBackprop, UniformSubset
from lightning_select.policies import OHEM, FocalWeighting, LossSoftmaxWeighting
from lightning_select.policies import HardnessWeightedNegatives
from lightning_select.policies import InfoBatch
from lightning_select.policies import BatchComposition
from lightning_select.policies import FalseNegativeAudit
from lightning_select.policies import DBPM, DynamicsFilter
from lightning_select.rules import (
    ContrastiveLogits,
    EmbeddingOutput,
    apply_gist,
    build_logits,
    effective_sample_size,
    false_negative_mask,
    gist_loss,
    gist_thresholds,
    info_nce_per_row,
    weighted_global_mean,
)
from lightning_select.core.schedule import stepping_batches
from lightning_select.samplers import ResumableDataLoader
from lightning_select.stats import LossHistory, SampleLossStore, SampleTable
from lightning_select.stats import TrainingDynamics, load_dynamics

register_strategies()

__version__ = "0.1.0"

__all__ = [
    "AdaptiveBatchSize",
    "BatchComposition",
    "DBPM",
    "DynamicsFilter",
    "TrainingDynamics",
    "load_dynamics",
    "FalseNegativeAudit",
    "ContrastiveLogits",
    "DDPSelectStrategy",
    "EmbeddingOutput",
    "EntropySelection",
    "GuideEmbeddingCache",
    "GuidedNegatives",
    "ImportanceSampling",
    "IndexedDataset",
    "InfoBatch",
    "LossHistory",
    "PreemptionCheckpoint",
    "ResumableDataLoader",
    "SampleIndex",
    "SampleIndexError",
    "SampleLossStore",
    "ReducibleLossSelection",
    "ColorFilter",
    "SampleTable",
    "SelectionAudit",
    "SelectionEngine",
    "SelectionError",
    "SelectionPolicy",
    "SelectiveBackprop",
    "UniformSubset",
    "FocalWeighting",
    "OHEM",
    "LossSoftmaxWeighting",
    "HardnessWeightedNegatives",
    "SentenceTransformerGuide",
    "TransformerGuide",
    "SingleDeviceSelectStrategy",
    "StepContext",
    "TrainingPreempted",
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
    "stepping_batches",
    "weighted_global_mean",
]
