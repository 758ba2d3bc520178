"""Test-time adaptation by entropy minimisation (Tent, EATA): a LightningModule around a trained classifier.

``EntropyAdaptation(net)`` trains ``net`` on unlabelled batches with the per-sample prediction
entropy as its loss, ``{"loss": prediction_entropy(logits), "logits": logits}``. Alone (the engine
takes the plain mean) this is Tent; with
:class:`~lightning_select.policies.entropy_selection.EntropySelection` as a callback it is EATA: the
reliable and non-redundant filter, the ``exp(E0 − E)`` weights and, with ``fisher_alpha > 0``, the
Fisher penalty against forgetting.

Example::

    >>> import torch
    >>> from lightning_select.models.classifier import small_cnn
    >>> module = EntropyAdaptation(small_cnn(in_channels=1, width=8), adapt="norm")
    >>> sum(p.numel() for p in module.parameters() if p.requires_grad)  # BatchNorm scale and shift only
    112
    >>> out = module.training_step({"image": torch.rand(4, 1, 8, 8)}, 0)
    >>> out["loss"].shape, out["logits"].shape
    (torch.Size([4]), torch.Size([4, 10]))
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_select.rules.entropy import prediction_entropy

ADAPT = ("norm", "all")


def configure_norm_adaptation(net: nn.Module) -> nn.Module:
    """EATA's (and Tent's) model configuration, in place: only the affine parameters of the BatchNorm layers
    are trained, and BatchNorm normalises with the statistics of the current batch (running statistics
    dropped), in train and eval mode alike. Returns ``net``."""
    net.requires_grad_(False)
    found = False
    for m in net.modules():
        if isinstance(m, _BatchNorm):
            found = True
            m.requires_grad_(True)
            m.track_running_stats = False
            m.running_mean, m.running_var = None, None
    if not found:
        raise ValueError("adapt='norm' trains the BatchNorm affine parameters, but the network has no BatchNorm layer; "
                         "use adapt='all' (every parameter) or a network with BatchNorm.")
    return net


class EntropyAdaptation(pl.LightningModule):
    """Adapt a trained classifier network at test time by minimising its prediction entropy.

    The loss never reads a label. If the batch has one (``label_key``), the predictions of the
    forward pass that adapts, made before its update, are counted as EATA's online accuracy
    (``tta/online_accuracy``, and :attr:`online_accuracy`); ``validation_step`` logs ``tta/accuracy``.

    Args:
        net: the trained network (inputs to logits); adapted in place (pass a copy to keep the source).
        adapt: ``"norm"`` (EATA: BatchNorm affine parameters only, batch statistics; see
            :func:`configure_norm_adaptation`) or ``"all"`` (every parameter, the network unchanged).
        lr: SGD learning rate (EATA: 0.00025 at batch size 64 for an ImageNet ResNet-50).
        momentum: SGD momentum (EATA: 0.9).
        input_key: batch key of the inputs.
        label_key: batch key of the labels, used for measuring only.
    """

    def __init__(self, net: nn.Module, adapt: str = "norm", lr: float = 0.00025, momentum: float = 0.9,
                 input_key: str = "image", label_key: str = "label") -> None:
        super().__init__()
        if adapt not in ADAPT:
            raise ValueError(f"Expected `adapt` in {list(ADAPT)}, but got {adapt!r}.")
        if not (isinstance(lr, (int, float)) and lr > 0):
            raise ValueError(f"Expected a positive `lr`, but got {lr!r}.")
        self.net = configure_norm_adaptation(net) if adapt == "norm" else net
        self.adapt, self.lr, self.momentum = adapt, float(lr), float(momentum)
        self.input_key, self.label_key = input_key, label_key
        self.online_correct, self.online_seen = 0, 0

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Tensor]:
        logits = self(batch[self.input_key]).float()
        return {"loss": prediction_entropy(logits), "logits": logits}

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        labels = batch.get(self.label_key) if isinstance(batch, dict) else None
        logits = outputs.get("logits") if isinstance(outputs, dict) else None
        if labels is None or logits is None:
            return
        self.online_correct += int((logits.argmax(dim=-1) == labels).sum())
        self.online_seen += int(labels.numel())
        self.log("tta/online_accuracy", self.online_accuracy, on_step=True, on_epoch=False, batch_size=labels.numel())

    @property
    def online_accuracy(self) -> float:
        """Accuracy of the adapting forward passes so far (EATA's protocol); NaN before any labelled batch."""
        return self.online_correct / self.online_seen if self.online_seen else float("nan")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        logits = self(batch[self.input_key])
        correct = (logits.argmax(dim=-1) == batch[self.label_key]).float().mean()
        self.log("tta/accuracy", correct, on_epoch=True, batch_size=logits.shape[0])

    @torch.no_grad()
    def accuracy(self, loader: Iterable[dict[str, Any]]) -> float:
        """Accuracy of the network as it is now over ``loader`` (eval mode, no update)."""
        was_training = self.training
        self.eval()
        correct = seen = 0
        for batch in loader:
            logits = self(batch[self.input_key].to(self.device))
            correct += int((logits.argmax(dim=-1).cpu() == batch[self.label_key]).sum())
            seen += int(batch[self.label_key].numel())
        self.train(was_training)
        return correct / max(seen, 1)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=self.lr, momentum=self.momentum)
