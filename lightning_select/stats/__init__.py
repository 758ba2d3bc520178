"""Per-sample statistics: the shared :class:`SampleTable`, ``LossHistory`` and the flagged-pair log."""

from lightning_select.stats.flagged_pairs import FlaggedPairLog
from lightning_select.stats.history import LossHistory, SampleLossStore
from lightning_select.stats.table import Column, SampleTable

__all__ = ["Column", "FlaggedPairLog", "LossHistory", "SampleLossStore", "SampleTable"]
