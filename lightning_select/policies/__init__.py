"""Policies: one thin callback per file, each wrapping a pure rule from :mod:`lightning_select.rules`.

See CONTRIBUTING.md for the pattern every policy follows.
"""

from lightning_select.policies.adaptive_batch_size import AdaptiveBatchSize
from lightning_select.policies.batch_composition import BatchComposition
from lightning_select.policies.color_filter import ColorFilter
from lightning_select.policies.dbpm import DBPM
from lightning_select.policies.dynamics_filter import DynamicsFilter
from lightning_select.policies.entropy_selection import EntropySelection
from lightning_select.policies.false_negative_audit import FalseNegativeAudit
from lightning_select.policies.focal_weighting import FocalWeighting
from lightning_select.policies.guided_negatives import GuidedNegatives
from lightning_select.policies.hardness_weighted_negatives import HardnessWeightedNegatives
from lightning_select.policies.hard_batches import HardBatches
from lightning_select.policies.selection_audit import SelectionAudit
from lightning_select.policies.importance_sampling import ImportanceSampling
from lightning_select.policies.infobatch import InfoBatch
from lightning_select.policies.loss_softmax_weighting import LossSoftmaxWeighting
from lightning_select.policies.ohem import OHEM
from lightning_select.policies.reducible_loss import ReducibleLossSelection
from lightning_select.policies.selective_backprop import SelectiveBackprop
from lightning_select.policies.uniform_subset import UniformSubset

__all__ = ["AdaptiveBatchSize", "DBPM", "DynamicsFilter", "BatchComposition", "ColorFilter", "EntropySelection", "GuidedNegatives", "HardBatches", "SelectionAudit", "ImportanceSampling", "ReducibleLossSelection", "SelectiveBackprop", "UniformSubset", "FocalWeighting", "OHEM", "LossSoftmaxWeighting", "HardnessWeightedNegatives", "InfoBatch", "FalseNegativeAudit"]
