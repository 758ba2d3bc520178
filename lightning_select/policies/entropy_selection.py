"""``EntropySelection``: EATA's reliable and non-redundant sample filter and entropy weights, for training."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Optional, Union

import torch
from torch import Tensor

from lightning_select.core import SelectionError, SelectionPolicy, StepContext
from lightning_select.core.distributed import raise_together
from lightning_select.core.engine import override
from lightning_select.core.step_parts import muted_logging
from lightning_select.core.options import bool_option, int_option, real_option, str_option
from lightning_select.rules.entropy import (
    eata_weights,
    prediction_entropy,
    redundancy_mask,
    reliable_mask,
    update_moving_average,
)
from lightning_select.rules.fisher import accumulate_fisher, fisher_penalty, pseudo_label_cross_entropy

if TYPE_CHECKING:  # pragma: no cover
    import lightning.pytorch as pl

#: ``fisher_loss(module, batch, batch_idx) -> scalar``: the loss whose squared gradients estimate the Fisher.
FisherLoss = Callable[[Any, Any, int], Tensor]


class EntropySelection(SelectionPolicy):
    """EATA's sample filter and weights (Niu et al., 2022), applied as per-sample weights, and its
    anti-forgetting Fisher regulariser.

    **Card.** What it changes: the weights, and with ``fisher_alpha > 0`` the loss (an added penalty).
    A row is kept when it is *reliable* (prediction entropy ``E < E0``, ``E0 = entropy_fraction·ln C``)
    and *non-redundant* (``|cos(softmax, m)| < ε``, with ``m`` the moving average of the softmax outputs
    of previously kept rows); kept rows get ``exp(E0 − E)`` (EATA's ``1/exp(E − E0)``; 1 with
    ``weight=False``), filtered rows get weight 0. Unbiased: no, by design: it trains on the confident,
    non-redundant rows only, weighted towards the most confident. Extra cost: none in forward passes
    (no scoring pass), a ``[B, C]`` softmax per step, and under DDP one ``C + 1``-element all-reduce per
    step (the moving-average update). With the Fisher: ``fisher_batches`` forward and backward passes
    once at the start of training, one all-reduce of the Fisher under DDP, two fp32 copies of the
    penalised parameters (Fisher and anchors), and a penalty of one pass over them per step.
    Reference: "Efficient Test-Time Model Adaptation without Forgetting", ICML 2022; checked against
    the public EATA code (``mr-eggplant/EATA``, ``eata.py``: ``softmax_entropy``, ``update_model_probs``,
    the ``ewc_loss`` of ``forward_and_adapt_eata``; ``main.py``: the Fisher estimate). Defaults: the
    paper's ``E0 = 0.4·ln C``, ``ε = 0.05`` (tuned for C = 1000), momentum 0.9; ``fisher_alpha = 0``
    (off; the paper uses 2000).

    **Why weights and not a selection.** The selection stage runs before the training pass, but EATA
    filters on the logits of the very forward pass it adapts with. So this policy reads the training
    pass's logits (``ctx.output_field("logits")``) in :meth:`sample_weights` and gives the filtered
    rows weight 0. They then contribute nothing to the loss or the gradient, exactly as in EATA, and
    the forward cost is the full batch, as in EATA's test-time setting (it too forwards every sample
    and filters afterwards). One difference: the engine's reduction is ``Σ w·ℓ / Σ w`` over the kept
    rows, where EATA's code takes ``Σ w·ℓ / n_kept``; the gradient direction is the same, its
    scale differs by the step's mean kept weight. A step where no row is kept gives a zero loss (plus
    the penalty; EATA skips the optimizer step instead).

    **State.** The moving average ``m`` (``[C]`` fp32) is updated in :meth:`observe` from the softmax
    of the kept rows, with EATA's rule (``m ← momentum·m + (1 − momentum)·mean``, initialised by the
    first step that keeps a row). Under DDP the mean is over the kept rows of every rank (each rank's
    sum of softmax outputs and count are averaged with ``trainer.strategy.reduce(..., "mean")``, which
    every rank calls every step), so every rank holds the same ``m``. ``m``, the Fisher and the anchors
    are checkpointed (``state_dict``), so a resumed run filters and penalises exactly as an
    uninterrupted one.

    **The Fisher regulariser** (``fisher_alpha > 0``; EATA's Eqns. 8-9, :mod:`lightning_select.rules.fisher`).
    At ``on_train_start`` (unless a checkpoint restored them) the policy estimates the diagonal Fisher
    ``ω = (1/K) Σ_k (∇_θ L_k)²`` over the first ``fisher_batches`` batches ``k`` of ``fisher_loader``,
    where ``L_k`` is, as in EATA's code, the batch mean of the cross-entropy of the logits against their
    own argmax (``fisher_loss`` replaces it), and stores the anchors ``θ̃`` = the parameters at that
    moment. Every step then adds ``fisher_alpha · Σ_i ω_i (θ_i − θ̃_i)²`` to the loss through
    :meth:`loss_terms` (logged as ``eata/penalty``). Details:

    - *Which parameters*: every parameter of the LightningModule with ``requires_grad`` at that moment
      (EATA adapts only the BatchNorm affine parameters: freeze the others first, as
      :class:`~lightning_select.models.adaptation.EntropyAdaptation` does with ``adapt="norm"``).
    - *Which data*: EATA uses in-distribution samples (2000 clean images in batches of 64, i.e. about
      32 batches: the default ``fisher_batches``). ``fisher_loader=None`` takes
      ``trainer.datamodule.train_dataloader()`` (a fresh loader; the trainer's own loader when fit
      without a datamodule); a string names another datamodule method (e.g. ``"val_dataloader"``);
      or pass any iterable of batches. For test-time adaptation point it at clean data.
    - *How*: the module's own ``training_step`` (not the engine's wrapped one) runs in train mode,
      with ``self.log`` muted (or its ``forward`` on ``batch[fisher_input_key]``), on batches moved by
      the strategy, in a forked RNG state; the module's buffers (e.g. BatchNorm running statistics) are
      restored afterwards, so estimating the Fisher changes nothing else. Without ``fisher_input_key``,
      ``training_step`` must return the logits with their graph (not detached). Gradients are taken
      with ``torch.autograd.grad`` (DDP's hooks stay idle).
    - *Under DDP*: each rank sums its batches' squared gradients, and one all-reduce adds the sums and
      the batch counts, so every rank holds the same Fisher: the mean over all ranks' batches. The
      anchors are identical because DDP starts every rank from rank 0's parameters. Every rank adds
      the same penalty; DDP averages gradients, so the update gets exactly ``∇ penalty`` on top of the
      global weighted mean of the data loss (tested in the 2-process scenario).

    **Test-time adaptation.** With a ``training_step`` that returns the per-sample prediction entropy as
    the loss, ``{"loss": prediction_entropy(logits), "logits": logits}``, this policy performs EATA's
    sample-efficient entropy minimisation on unlabelled data (up to the reduction's scale, above);
    :class:`~lightning_select.models.adaptation.EntropyAdaptation` is such a module. With 10 classes the
    paper's ``ε = 0.05`` keeps almost nothing (a confident prediction has cosine ``≈ 1/√C`` with a
    uniform average: 0.03 for C = 1000, 0.32 for C = 10); ``ε ≈ 1.6/√C`` is the same threshold
    relative to that (0.5 for C = 10).

    Training from scratch: an untrained model's entropy is near ``ln C``, so the paper's ``E0`` keeps
    nothing until the model is confident; and with few classes the cosine of two softmax outputs is
    rarely below 0.05. Use a larger ``entropy_fraction`` (≥ 1 turns the reliability filter off) and
    ``epsilon`` (> 1 turns the redundancy filter off) there.

    Needs ``training_step`` to return ``{"loss": [B], "logits": [B, C]}``. The penalty cannot be
    combined with the engine's gradient-cached mode (refused by the engine).

    Args:
        entropy_fraction: ``E0 / ln C``, > 0.
        epsilon: the cosine-similarity threshold ``ε``, > 0.
        momentum: momentum of the moving average of kept softmax outputs, in [0, 1).
        weight: weight kept rows by ``exp(E0 − E)``; False gives them weight 1.
        num_classes: ``C``; None reads it from the logits' width.
        fisher_alpha: the penalty's weight ``α`` ≥ 0; 0 turns the regulariser off (EATA: 2000).
        fisher_loader: where the Fisher's batches come from: None (the datamodule's
            ``train_dataloader()``), the name of a datamodule method returning a loader, or an iterable.
        fisher_batches: at most this many batches of ``fisher_loader`` (None: all of it).
        fisher_loss: ``fisher_loss(module, batch, batch_idx) -> scalar``; None: EATA's pseudo-label
            cross-entropy of the logits (see ``fisher_input_key``).
        fisher_input_key: with the default loss, take the logits from ``module(batch[fisher_input_key])``
            (the module's forward); None: from the ``"logits"`` that ``training_step`` returns, which
            must then carry their graph (``NoisyLabelClassifier`` detaches them: use ``"image"``).
        progress: a tqdm bar (on rank 0) while estimating the Fisher.

    Example::

        >>> policy = EntropySelection(entropy_fraction=0.4, epsilon=0.05)
        >>> policy.moving_average is None, policy.needs_scores
        (True, False)
        >>> round(policy.threshold(10), 4)
        0.921
        >>> EntropySelection(fisher_alpha=2000.0, fisher_loader="val_dataloader").fisher is None  # set at fit start
        True
    """

    order = 300

    def __init__(self, entropy_fraction: float = 0.4, epsilon: float = 0.05, momentum: float = 0.9,
                 weight: bool = True, num_classes: Optional[int] = None, fisher_alpha: float = 0.0,
                 fisher_loader: Union[None, str, Iterable[Any]] = None, fisher_batches: Optional[int] = 32,
                 fisher_loss: Optional[FisherLoss] = None, fisher_input_key: Optional[str] = None,
                 progress: bool = True) -> None:
        who = type(self).__name__
        entropy_fraction = real_option(who, "entropy_fraction", entropy_fraction)
        if entropy_fraction <= 0:
            raise ValueError(f"{who}: expected `entropy_fraction` > 0 (E0 = entropy_fraction·ln C; the paper uses 0.4), "
                             f"but got {entropy_fraction}.")
        epsilon = real_option(who, "epsilon", epsilon)
        if epsilon <= 0:
            raise ValueError(f"{who}: expected `epsilon` > 0 (the cosine threshold; the paper uses 0.05), but got {epsilon}.")
        momentum = real_option(who, "momentum", momentum)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"{who}: expected `momentum` in [0, 1) (the paper uses 0.9), but got {momentum}.")
        self.entropy_fraction, self.epsilon, self.momentum = entropy_fraction, epsilon, momentum
        self.weight = bool_option(who, "weight", weight)
        self.num_classes = int_option(who, "num_classes", num_classes, minimum=2, optional=True)
        fisher_alpha = real_option(who, "fisher_alpha", fisher_alpha)
        if fisher_alpha < 0:
            raise ValueError(f"{who}: expected `fisher_alpha` >= 0 (the weight of EATA's Fisher penalty; 0 turns it "
                             f"off, the paper uses 2000), but got {fisher_alpha}.")
        self.fisher_alpha = fisher_alpha
        if fisher_loader is not None and not isinstance(fisher_loader, str) and not hasattr(fisher_loader, "__iter__"):
            raise TypeError(f"{who}: expected `fisher_loader` to be None (the datamodule's train_dataloader()), the "
                            f"name of a datamodule method returning a loader (e.g. 'val_dataloader'), or an iterable "
                            f"of batches, but got {fisher_loader!r} ({type(fisher_loader).__name__}).")
        if isinstance(fisher_loader, str) and not fisher_loader:
            raise ValueError(f"{who}: `fisher_loader` is an empty string; name a datamodule method or pass None.")
        self.fisher_loader = fisher_loader
        self.fisher_batches = int_option(who, "fisher_batches", fisher_batches, minimum=1, optional=True)
        if fisher_loss is not None and not callable(fisher_loss):
            raise TypeError(f"{who}: expected `fisher_loss` to be None or a callable (module, batch, batch_idx) -> "
                            f"scalar loss, but got {fisher_loss!r}.")
        self.fisher_loss = fisher_loss
        self.fisher_input_key = str_option(who, "fisher_input_key", fisher_input_key, optional=True)
        self.progress = bool_option(who, "progress", progress)
        self.moving_average: Optional[Tensor] = None  # [C] fp32 (checkpointed)
        self.fisher: Optional[dict[str, Tensor]] = None   # {parameter name: ω} fp32 (checkpointed)
        self.anchors: Optional[dict[str, Tensor]] = None  # {parameter name: θ̃} fp32 (checkpointed)
        self._on_device: Optional[tuple[torch.device, list[Tensor], list[Tensor]]] = None  # (device, θ̃, ω) cache
        self._kept_probs: Optional[Tensor] = None     # softmax of this step's kept rows, for observe

    def threshold(self, num_classes: int) -> float:
        """``E0 = entropy_fraction · ln C``."""
        return self.entropy_fraction * math.log(num_classes)

    def _logits(self, ctx: StepContext) -> Tensor:
        logits = ctx.output_field("logits")
        if logits is None or logits.dim() != 2 or logits.shape[0] != ctx.rows.numel():
            got = "no 'logits'" if logits is None else f"'logits' of shape {tuple(logits.shape)}"
            raise SelectionError(
                f"EntropySelection needs training_step to return {{'loss': per_sample_losses, 'logits': logits}} with "
                f"logits of shape [{ctx.rows.numel()}, C], but it returned {got}."
            )
        if self.num_classes is not None and logits.shape[1] != self.num_classes:
            raise SelectionError(
                f"EntropySelection(num_classes={self.num_classes}) got logits with {logits.shape[1]} classes; "
                "set num_classes to the logits' width, or None to read it from the logits."
            )
        return logits.detach()

    def sample_weights(self, ctx: StepContext) -> Tensor:
        logits = self._logits(ctx)
        e0 = self.threshold(self.num_classes or logits.shape[1])
        entropy = prediction_entropy(logits)
        probs = torch.softmax(logits.float(), dim=-1)
        keep = reliable_mask(entropy, e0) & redundancy_mask(probs, self.moving_average, self.epsilon)
        if not ctx.has_samples:  # every row was deselected by another policy: the stand-in row is not kept
            keep = torch.zeros_like(keep)
        kept_weights = eata_weights(entropy, e0) if self.weight else torch.ones_like(entropy)
        weights = torch.where(keep, kept_weights, torch.zeros_like(kept_weights))
        self._kept_probs = probs[keep]
        ctx.log("eata/kept_fraction", keep.float().mean())
        ctx.log("eata/entropy_mean", entropy.mean())
        ctx.log("eata/weight_mean", weights.mean())
        return weights

    def observe(self, ctx: StepContext) -> None:
        kept = self._kept_probs
        self._kept_probs = None
        if kept is None:
            return
        if ctx.world_size > 1:  # the mean over every rank's kept rows; every rank calls this each step
            parts = torch.cat([kept.sum(dim=0), kept.new_tensor([float(kept.shape[0])])])
            parts = ctx.trainer.strategy.reduce(parts, reduce_op="mean")
            count = float(parts[-1])
            kept = (parts[:-1] / parts[-1]).unsqueeze(0) if count > 0 else parts[:0].reshape(0, kept.shape[1])
        self.moving_average = update_moving_average(self.moving_average, kept, self.momentum)

    # ---------------------------------------------------------------- the Fisher regulariser
    def _fisher_batches(self, trainer: "pl.Trainer") -> Iterable[Any]:
        source, datamodule = self.fisher_loader, getattr(trainer, "datamodule", None)
        if source is None:
            if datamodule is not None and callable(getattr(datamodule, "train_dataloader", None)):
                return datamodule.train_dataloader()
            if trainer.train_dataloader is not None:
                return trainer.train_dataloader
            raise SelectionError("no training dataloader to estimate the Fisher from")
        if isinstance(source, str):
            method = getattr(datamodule, source, None)
            if not callable(method):
                raise SelectionError(f"fisher_loader={source!r} names no method of the trainer's datamodule "
                                     f"({type(datamodule).__name__})")
            return method()
        return source

    def _default_fisher_loss(self, module: Any, batch: Any, batch_idx: int) -> Tensor:
        if self.fisher_input_key is not None:  # the module's forward on one input of the batch
            return pseudo_label_cross_entropy(module(batch[self.fisher_input_key]))
        out = type(module).training_step(module, batch, batch_idx)  # the module's own, not the engine's wrapper
        logits = out.get("logits") if isinstance(out, dict) else None
        if not isinstance(logits, Tensor) or logits.dim() != 2 or not logits.requires_grad:
            got = "no 'logits'" if not isinstance(logits, Tensor) else (
                "detached 'logits'" if not logits.requires_grad else f"'logits' of shape {tuple(logits.shape)}")
            raise SelectionError(f"the default Fisher loss needs training_step to return {{'loss': ..., 'logits': "
                                 f"logits}} with [B, C] logits that carry their graph (not detached), but it returned "
                                 f"{got}; return the logits undetached, set fisher_input_key to the batch key of the "
                                 "inputs of the module's forward (e.g. 'image'), or pass fisher_loss=callable(module, "
                                 "batch, batch_idx) -> scalar loss")
        return pseudo_label_cross_entropy(logits)

    def compute_fisher(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Estimate the Fisher and set the anchors now (see the class docstring); every rank must call it."""
        from tqdm.auto import tqdm

        problem, sums, count = None, [], 0
        named = [(n, p) for n, p in pl_module.named_parameters() if p.requires_grad]
        names, params = [n for n, _ in named], [p for _, p in named]
        loss_fn = self.fisher_loss or self._default_fisher_loss
        try:
            if not params:
                raise SelectionError("no parameter of the module requires grad")
            loader = self._fisher_batches(trainer)
            sizes = [n for n in (_length(loader), self.fisher_batches) if n is not None]
            batches = tqdm(loader, desc="EATA Fisher", total=min(sizes) if sizes else None,
                           disable=not self.progress or trainer.global_rank != 0, leave=False, mininterval=1.0)
            moved = ((i, trainer.strategy.batch_to_device(b)) for i, b in enumerate(batches))
            buffers = {n: b.detach().clone() for n, b in pl_module.named_buffers()}
            was_training = pl_module.training
            devices = [pl_module.device.index or 0] if pl_module.device.type == "cuda" else []  # this rank's GPU
            try:
                with torch.random.fork_rng(devices=devices), torch.enable_grad(), muted_logging(pl_module):
                    pl_module.train()
                    sums, count = accumulate_fisher(params, lambda item: loss_fn(pl_module, item[1], item[0]), moved,
                                                    self.fisher_batches)
            finally:
                pl_module.train(was_training)
                with torch.no_grad():
                    for n, b in pl_module.named_buffers():
                        b.copy_(buffers[n])
            if count == 0:
                raise SelectionError("the Fisher loader yielded no batch")
        except Exception as err:  # noqa: BLE001  (reported by every rank together, below)
            problem = f"{type(err).__name__}: {err}"
        raise_together(trainer, problem, (
            f"EntropySelection(fisher_alpha={self.fisher_alpha}) could not estimate the Fisher from "
            f"fisher_loader={self.fisher_loader!r} (fisher_batches={self.fisher_batches}). Fix the batches (a "
            "datamodule with train_dataloader(), the name of a datamodule method returning a loader, or a "
            "DataLoader) or the loss (fisher_input_key, fisher_loss) as the cause below says, or set "
            "fisher_alpha=0 to turn the regulariser off."))
        flat = torch.cat([s.reshape(-1) for s in sums] + [sums[0].new_tensor([float(count)])])
        if trainer.world_size > 1:  # the sums and counts of every rank: the mean over all ranks' batches
            flat = trainer.strategy.reduce(flat, reduce_op="sum")
        pieces = torch.split(flat[:-1] / flat[-1], [p.numel() for p in params])
        self.fisher = {n: w.reshape(p.shape).clone() for n, w, p in zip(names, pieces, params)}
        self.anchors = {n: p.detach().float().clone() for n, p in zip(names, params)}
        self._on_device = None

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.fisher_alpha == 0.0:
            return
        if self.fisher is None or self.anchors is None:
            self.compute_fisher(trainer, pl_module)
            return
        shapes = {n: p.shape for n, p in pl_module.named_parameters()}
        bad = [n for n, w in self.fisher.items() if shapes.get(n) != w.shape]
        raise_together(trainer, f"parameters {bad[:5]}" if bad else None, (
            "EntropySelection: the restored Fisher does not match the module's parameters (names or shapes); "
            "resume with the same model, or drop the policy's state to estimate a new Fisher."))

    def loss_terms(self, ctx: StepContext) -> Optional[Tensor]:
        """EATA's penalty ``fisher_alpha · Σ ω (θ − θ̃)²`` (None when ``fisher_alpha == 0``)."""
        if self.fisher_alpha == 0.0:
            return None
        if self.fisher is None or self.anchors is None:
            raise SelectionError("EntropySelection(fisher_alpha > 0) has no Fisher: it is estimated at on_train_start, "
                                 "so the policy must be a Trainer callback.")
        named = dict(ctx.module.named_parameters())
        params = [named[n] for n in self.fisher]
        device = params[0].device
        if self._on_device is None or self._on_device[0] != device:
            self._on_device = (device, [self.anchors[n].to(device) for n in self.fisher],
                               [w.to(device) for w in self.fisher.values()])
        penalty = fisher_penalty(params, self._on_device[1], self._on_device[2], self.fisher_alpha)
        ctx.log("eata/penalty", penalty.detach())
        return penalty

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        def copy(tensors: Optional[dict[str, Tensor]]) -> Optional[dict[str, Tensor]]:
            return None if tensors is None else {n: t.detach().cpu().clone() for n, t in tensors.items()}

        return {"moving_average": None if self.moving_average is None else self.moving_average.detach().cpu().clone(),
                "fisher": copy(self.fisher), "anchors": copy(self.anchors)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        average = state_dict.get("moving_average")
        self.moving_average = None if average is None else average.clone().float()
        fisher, anchors = state_dict.get("fisher"), state_dict.get("anchors")
        self.fisher = None if fisher is None else {n: t.clone().float() for n, t in fisher.items()}
        self.anchors = None if anchors is None else {n: t.clone().float() for n, t in anchors.items()}
        self._on_device = None


def _length(loader: Any) -> Optional[int]:
    try:
        return len(loader)
    except TypeError:  # an iterable without len (e.g. over an IterableDataset)
        return None
