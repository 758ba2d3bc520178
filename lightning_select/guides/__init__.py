"""Guides: frozen encoders for GIST, ``load_guide``, the per-sample lookup and the embedding cache."""

from lightning_select.guides.cache import GuideEmbeddingCache
from lightning_select.guides.encoders import (
    SentenceTransformerGuide,
    TransformerGuide,
    load_guide,
    minilm_guide_path,
    module_fingerprint,
)
from lightning_select.guides.lookup import GuideLookup

__all__ = [
    "GuideEmbeddingCache",
    "GuideLookup",
    "SentenceTransformerGuide",
    "TransformerGuide",
    "load_guide",
    "minilm_guide_path",
    "module_fingerprint",
]
