"""Per-sample statistics: the shared :class:`SampleTable`, ``LossHistory``, ``TrainingDynamics`` and the flagged-pair log."""

from lightning_select.stats.flagged_pairs import FlaggedPairLog
from lightning_select.stats.history import LossHistory, SampleLossStore
from lightning_select.stats.dynamics import DynamicsStore, TrainingDynamics
from lightning_select.stats.dynamics_files import load_dynamics, subsample_dynamics
from lightning_select.stats.table import Column, SampleTable

__all__ = ["Column", "DynamicsStore", "TrainingDynamics", "load_dynamics", "subsample_dynamics", "FlaggedPairLog", "LossHistory", "SampleLossStore", "SampleTable"]
