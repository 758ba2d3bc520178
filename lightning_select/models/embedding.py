"""A small contrastive embedding model for the digits default, and held-out retrieval metrics."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.retrieval import RetrievalMAP, RetrievalNormalizedDCG, RetrievalPrecision

from lightning_select.evaluation import retrieval_scores
from lightning_select.rules.contrastive import EmbeddingOutput, info_nce_per_row


def retrieval_metrics(embeddings: Tensor, labels: Tensor) -> dict[str, Tensor]:
    """Leave-one-out retrieval by class with torchmetrics: every item queries all the others.

    Returns ``precision@1`` (is the nearest other item of the same class), ``map`` and ``ndcg@10``.

    Example::

        >>> e = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
        >>> {k: round(float(v), 3) for k, v in retrieval_metrics(e, torch.tensor([0, 0, 1, 1])).items()}
        {'precision@1': 1.0, 'map': 1.0, 'ndcg@10': 1.0}
    """
    e = F.normalize(embeddings.float(), dim=-1)
    n = e.shape[0]
    sims = e @ e.T
    off_diag = ~torch.eye(n, dtype=torch.bool, device=e.device)
    preds = retrieval_scores(sims[off_diag])
    target = (labels.view(-1, 1) == labels.view(1, -1))[off_diag]
    indexes = torch.arange(n, device=e.device).view(-1, 1).expand(n, n)[off_diag]
    metrics = {
        "precision@1": RetrievalPrecision(top_k=1),
        "map": RetrievalMAP(),
        "ndcg@10": RetrievalNormalizedDCG(top_k=10),
    }
    return {name: m(preds, target, indexes=indexes) for name, m in metrics.items()}


class DigitsEmbeddingModule(pl.LightningModule):
    """MLP encoder trained with in-batch InfoNCE on two views of each digit.

    ``training_step`` returns an :class:`EmbeddingOutput`; the lightning_select engine turns it into
    per-row losses. With ``plain_loss=True`` it returns the reduced scalar instead, i.e. a module
    that runs on a stock Lightning ``Trainer`` with no lightning_select callback (the benchmark
    baseline).

    Args:
        hidden: hidden width.
        dim: embedding dimension.
        temperature: InfoNCE temperature τ.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        plain_loss: return a scalar mean loss (no engine needed).
    """

    def __init__(
        self,
        hidden: int = 256,
        dim: int = 64,
        temperature: float = 0.1,
        lr: float = 3e-3,
        weight_decay: float = 1e-4,
        plain_loss: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.encoder = nn.Sequential(
            nn.Linear(64, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, dim)
        )
        self._heldout: list[tuple[Tensor, Tensor]] = []

    def forward(self, x: Tensor) -> Tensor:
        return self.encoder(x)

    def cluster_embedding(self, batch: dict[str, Any]) -> Tensor:
        """``[B, D]`` embeddings of the raw (un-augmented) images, for batch composition by the student."""
        return self.encoder(batch["image"])

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Any:
        out = EmbeddingOutput(
            anchor=self(batch["view1"]), positive=self(batch["view2"]), temperature=self.hparams.temperature
        )
        if self.hparams.plain_loss:
            loss = info_nce_per_row(out).mean()
            return loss
        return out

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._heldout.append((self(batch["image"]).detach(), batch["label"]))

    def on_validation_epoch_end(self) -> None:
        if not self._heldout:
            return
        emb = torch.cat([e for e, _ in self._heldout])
        labels = torch.cat([y for _, y in self._heldout])
        self._heldout.clear()
        if self.trainer.world_size > 1:  # evaluate the full held-out set on every rank
            emb = self.all_gather(emb).flatten(0, 1)
            labels = self.all_gather(labels).flatten(0, 1)
        for name, value in retrieval_metrics(emb, labels).items():
            self.log(f"heldout/{name}", value, prog_bar=name == "precision@1", rank_zero_only=False)

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
