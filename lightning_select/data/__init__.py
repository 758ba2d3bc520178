"""Data modules: the embedded scikit-learn digits default (offline, shipped by scikit-learn) and text pairs."""

from lightning_select.data.digits import DigitsLDAGuide, DigitsPairsDataModule, EpochSeededSampler, hashed_uniform
from lightning_select.data.text import (
    NoDuplicatesBatchSampler,
    QuoraDuplicatesDataModule,
    SickDataModule,
    load_sick,
    load_stsb,
    quora_clusters,
    resolve_data_dir,
)

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
