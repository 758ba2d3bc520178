"""Data modules: the embedded scikit-learn digits default (offline, shipped by scikit-learn) and text pairs.

Samplers live in :mod:`lightning_select.samplers`; they are re-exported here for compatibility.
"""

from lightning_select.data.digits import DigitsLDAGuide, DigitsPairsDataModule, hashed_uniform
from lightning_select.data.files import load_sick, load_stsb, resolve_data_dir
from lightning_select.data.text import QuoraDuplicatesDataModule, SickDataModule
from lightning_select.samplers import EpochSeededSampler, NoDuplicatesBatchSampler, quora_clusters

__all__ = [
    "DigitsLDAGuide",
    "DigitsPairsDataModule",
    "EpochSeededSampler",
    "NoDuplicatesBatchSampler",
    "QuoraDuplicatesDataModule",
    "SickDataModule",
    "hashed_uniform",
    "load_sick",
    "load_stsb",
    "quora_clusters",
    "resolve_data_dir",
]
