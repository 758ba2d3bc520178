"""LightningModules used by the embedded default, the recipes and the benchmarks."""

from lightning_select.models.embedding import DigitsEmbeddingModule, retrieval_metrics

__all__ = ["DigitsEmbeddingModule", "retrieval_metrics"]
