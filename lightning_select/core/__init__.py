"""The engine core: step context, policy base class, the per-step engine, gradient caching,
strategies and batch plumbing. Pure tensor rules live in :mod:`lightning_select.rules`."""

from lightning_select.core.batch import (
    IndexedDataset,
    SampleIndex,
    SampleIndexError,
    batch_size_of,
    get_indices,
    select_batch,
)
from lightning_select.core.context import SelectionError, StepContext, training_loss_of
from lightning_select.core.engine import SelectionEngine
from lightning_select.core.policy import SelectionPolicy
from lightning_select.core.preemption import PreemptionCheckpoint, TrainingPreempted
from lightning_select.core.strategies import DDPSelectStrategy, SingleDeviceSelectStrategy, register_strategies

__all__ = [
    "DDPSelectStrategy",
    "IndexedDataset",
    "PreemptionCheckpoint",
    "SampleIndex",
    "SampleIndexError",
    "SelectionEngine",
    "SelectionError",
    "SelectionPolicy",
    "SingleDeviceSelectStrategy",
    "StepContext",
    "TrainingPreempted",
    "batch_size_of",
    "get_indices",
    "register_strategies",
    "select_batch",
    "training_loss_of",
]
