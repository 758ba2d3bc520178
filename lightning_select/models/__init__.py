"""LightningModules used by the embedded default, the recipes and the benchmarks."""

from lightning_select.models.adaptation import EntropyAdaptation
from lightning_select.models.embedding import DigitsEmbeddingModule, retrieval_metrics
from lightning_select.models.text import HFTransformerEncoder, StaticEmbeddingEncoder, TextEmbeddingModule

__all__ = [
    "DigitsEmbeddingModule",
    "EntropyAdaptation",
    "HFTransformerEncoder",
    "StaticEmbeddingEncoder",
    "TextEmbeddingModule",
    "retrieval_metrics",
]
