"""A classifier for the noisy-label tasks (:mod:`lightning_select.data.noisy_labels`): MLP or small CNN.

``training_step`` returns per-sample cross-entropy against the (noisy) ``label`` and the logits,
``{"loss": [B], "logits": [B, C]}``, so selection policies read the logits with
``ctx.output_field("logits")``. Validation measures accuracy against the clean labels of the test
split (``heldout/accuracy``, ``heldout/loss``).

Example::

    >>> model = NoisyLabelClassifier(arch="mlp", hidden=32)
    >>> batch = {"image": torch.rand(4, 64), "label": torch.tensor([0, 1, 2, 3])}
    >>> out = model.training_step(batch, 0)
    >>> out["loss"].shape, out["logits"].shape
    (torch.Size([4]), torch.Size([4, 10]))
    >>> NoisyLabelClassifier(arch="cnn")(torch.rand(2, 3, 16, 16)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_select.core.schedule import stepping_batches

ARCHS = ("mlp", "cnn")


def conv_block(c_in: int, c_out: int) -> nn.Sequential:
    """3×3 convolution, BatchNorm, ReLU, 2×2 max-pooling (halves the side)."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU(inplace=True), nn.MaxPool2d(2))


def small_cnn(in_channels: int = 3, width: int = 32, num_classes: int = 10, dropout: float = 0.0) -> nn.Sequential:
    """Three conv blocks (``width``, ``2·width``, ``4·width`` channels), global average pooling, linear head.

    Works at any input side ≥ 8 (16 or 32 px). ``width=32``: 94.8k parameters.

    Example::

        >>> sum(p.numel() for p in small_cnn().parameters())
        94762
    """
    return nn.Sequential(conv_block(in_channels, width), conv_block(width, 2 * width), conv_block(2 * width, 4 * width),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(4 * width, num_classes))


class NoisyLabelClassifier(pl.LightningModule):
    """Classifier trained with per-sample cross-entropy; reports clean test accuracy.

    Args:
        arch: ``"mlp"`` (``in_features → hidden → num_classes``, for digits) or ``"cnn"`` (:func:`small_cnn`).
        num_classes: number of classes.
        in_features: input size of the MLP.
        hidden: hidden width of the MLP.
        in_channels: input channels of the CNN.
        width: channels of the CNN's first block.
        dropout: dropout before the last linear layer.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        cosine_schedule: cosine-decay the learning rate to 0 per optimizer step over the run's
            optimizer steps, :func:`~lightning_select.core.schedule.stepping_batches` (Lightning's
            ``estimated_stepping_batches``, made exact for samplers whose epochs differ in length,
            such as hard batches).
        plain_loss: return the scalar mean loss (for a stock Trainer without the engine).
    """

    def __init__(self, arch: str = "mlp", num_classes: int = 10, in_features: int = 64, hidden: int = 256,
                 in_channels: int = 3, width: int = 32, dropout: float = 0.0, lr: float = 1e-3,
                 weight_decay: float = 1e-4, cosine_schedule: bool = False, plain_loss: bool = False) -> None:
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"Expected `arch` in {list(ARCHS)}, but got {arch!r}.")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"Expected `num_classes` to be an integer >= 2, but got {num_classes!r}.")
        if not (isinstance(lr, (int, float)) and lr > 0):
            raise ValueError(f"Expected a positive `lr`, but got {lr!r}.")
        self.save_hyperparameters()
        if arch == "mlp":
            self.net: nn.Module = nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(),
                                                nn.Dropout(dropout), nn.Linear(hidden, num_classes))
        else:
            self.net = small_cnn(in_channels, width, num_classes, dropout)
        self.val_accuracy = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Any:
        logits = self(batch["image"])
        losses = F.cross_entropy(logits.float(), batch["label"], reduction="none")
        if self.hparams.plain_loss:
            return losses.mean()
        return {"loss": losses, "logits": logits.detach().float()}

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        logits = self(batch["image"]).float()
        target = batch.get("clean_label", batch["label"])
        self.val_accuracy.update(logits, target)
        self.log("heldout/loss", F.cross_entropy(logits, target), on_epoch=True, sync_dist=True,
                 batch_size=target.shape[0])
        self.log("heldout/accuracy", self.val_accuracy, on_epoch=True, on_step=False, prog_bar=True)

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        if not self.hparams.cosine_schedule:
            return optimizer
        total = max(int(stepping_batches(self.trainer)), 1)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}
