"""Data modules: the embedded scikit-learn digits default (offline, shipped by scikit-learn)."""

from lightning_select.data.digits import DigitsLDAGuide, DigitsPairsDataModule, EpochSeededSampler, hashed_uniform

__all__ = ["DigitsLDAGuide", "DigitsPairsDataModule", "EpochSeededSampler", "hashed_uniform"]
