"""``AdaptiveBatchSize``: grow gradient accumulation when AdAdaGrad's test says the gradient is too noisy."""

from __future__ import annotations

import math
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, GradientAccumulationScheduler
from torch import Tensor

from lightning_select.core.engine import override
from lightning_select.core.options import int_option, real_option
from lightning_select.rules.gradient_noise import gradient_noise_statistics, required_micro_batches

TESTS = ("norm", "augmented_inner_product")
# per optimizer step, summed over ranks: Σ‖h‖², Σ⟨h, ḡ⟩, M, Σ(⟨h, ḡ⟩ − ‖ḡ‖²)², Σ orthogonal part; then ‖ḡ‖², N
_FIELDS = 7


def _flat_grad(params: list[Tensor]) -> Tensor:
    """The parameters' gradients as one fp32 vector (zeros where a gradient is None)."""
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1).float()
                      for p in params])


class AdaptiveBatchSize(Callback):
    """Grow the effective batch (gradient accumulation) when the gradient estimate is too noisy (AdAdaGrad).

    - **What it changes**: ``trainer.accumulate_grad_batches``, so the number of micro-batches per
      optimizer step. Which samples are trained and their weights are unchanged.
    - **Unbiased**: yes; every sample is still trained once per epoch, and each step's gradient is the
      mean over more micro-batches (a lower-variance estimate of the same full gradient).
    - **Extra cost**: per micro-batch, one flattened fp32 copy of the gradients and a difference, i.e.
      ``O(P)`` work and ``2·P`` floats of memory for ``P`` parameters (``augmented_inner_product``
      also keeps each micro-batch's gradient until the step ends: up to ``max_accumulation·P``
      floats). Per optimizer step, a few dot products. Per ``check_every`` steps, one all-reduce of a
      ``[check_every, 7]`` tensor and one host read; nothing else syncs.
    - **Reference**: Lau, Liu & Kolar, "AdAdaGrad: Adaptive Batch Size Schemes for Adaptive Gradient
      Methods" (2024), and the public code ``timlautk/AdAdaGrad`` (``tests.py``: the norm test's new
      batch size ``Σ Var / (η²‖ḡ‖²)``, and the inner-product / orthogonality tests); the tests come from
      Byrd et al. (2012) and Bollapragada et al. (2018). Checked against the formulas, not the code.
    - **Defaults**: ``η = 0.5`` (this library's choice; the reference code takes η as a required
      argument), ``θ = 0.9``, ``ν = 5.84`` (Bollapragada et al.'s values), growth ×2, cap ×8 of the
      initial accumulation. Deviations from AdAdaGrad, each deliberate: the variance is estimated from
      micro-batch gradients, not per-sample ones (no ``vmap`` over the model, so any module works);
      the evidence of ``check_every`` steps is pooled (mean statistic) before a decision, because
      with 2–4 micro-batches one step's variance estimate has 1–3 degrees of freedom; and the batch
      grows in whole factors of ``growth`` up to ``max_accumulation``, never shrinking. It works with
      any optimizer (AdAdaGrad's analysis is for AdaGrad / AdaGrad-Norm).

    **Estimate.** Lightning divides each micro-batch's loss by ``k = accumulate_grad_batches``, so
    the micro-batch gradient is ``h_j = k·(A_j − A_{j−1})``, with ``A_j`` the accumulated gradient
    after micro-batch ``j`` (read in ``on_after_backward``), and the step's gradient is the mean of all
    ``N = k'·W`` micro-batch gradients (``k'`` micro-batches counted this step, ``W`` ranks). Under
    DDP, the last micro-batch's backward all-reduces the gradients, so each rank sees only its first
    ``k' − 1`` micro-batch gradients; they are enough (``M = (k' − 1)·W`` of the ``N``, see
    :func:`~lightning_select.rules.gradient_noise.gradient_noise_statistics`), which is why
    ``initial_accumulation ≥ 2`` is required. Everything is scale-invariant, so fp16 loss scaling does
    not matter, and a step with a non-finite gradient is skipped as evidence.

    **Decision.** Every ``check_every`` optimizer steps, the statistics of those steps (summed over
    ranks, so every rank decides the same) are averaged; if the mean statistic exceeds its threshold,
    the number of micro-batches that would pass, ``⌈N·T/c²⌉``, is turned into the smallest
    ``k·growthⁿ ≥ ⌈N·T/c²⌉ / W``, capped at ``max_accumulation``. The new ``k`` takes effect at the
    first optimizer-step boundary where Lightning's micro-batch counter is a multiple of it (at most
    ``new/old − 1`` old steps later, or the next epoch), so no step is ever cut short.

    **Learning-rate schedule.** With ``schedule="samples"`` (default), every step-interval scheduler is
    advanced to the number of optimizer steps the initial batch would have taken by now, so a
    schedule sized with ``trainer.estimated_stepping_batches`` (which Lightning computes from the
    initial accumulation) ends exactly at the end of training, whatever the growth. ``"steps"``
    leaves Lightning's one scheduler step per optimizer step (the schedule then ends late).

    **State.** The accumulation, a pending growth, the evidence of the current window, the schedule
    position and the decision log are checkpointed; a resumed run grows at the same steps.

    Needs automatic optimization, ``Trainer(accumulate_grad_batches=1)`` (this callback owns the
    accumulation; use ``initial_accumulation``) and no ``GradientAccumulationScheduler``.

    Args:
        test: ``"norm"`` or ``"augmented_inner_product"``.
        eta: the norm test's threshold ``η > 0``.
        theta: the inner-product test's threshold ``θ > 0``.
        nu: the orthogonality test's threshold ``ν > 0``.
        initial_accumulation: micro-batches per optimizer step at the start, ``≥ 2``.
        growth: factor by which the accumulation grows, an int ``≥ 2``.
        max_accumulation: cap on the accumulation, a multiple ``growthⁿ`` of ``initial_accumulation``.
        check_every: optimizer steps of evidence per decision, ``≥ 1``.
        schedule: ``"samples"`` or ``"steps"`` (see above).

    Example::

        >>> import lightning.pytorch as pl
        >>> policy = AdaptiveBatchSize(initial_accumulation=2, max_accumulation=8)
        >>> trainer = pl.Trainer(callbacks=[policy], max_epochs=1, logger=False)
        >>> # trainer.fit(model, data)  ->  policy.accumulation, policy.decisions
    """

    def __init__(self, test: str = "norm", eta: float = 0.5, theta: float = 0.9, nu: float = 5.84,
                 initial_accumulation: int = 2, growth: int = 2, max_accumulation: Optional[int] = None,
                 check_every: int = 10, schedule: str = "samples") -> None:
        if test not in TESTS:
            raise ValueError(f"AdaptiveBatchSize: expected `test` in {list(TESTS)}, but got {test!r}.")
        if schedule not in ("samples", "steps"):
            raise ValueError(f"AdaptiveBatchSize: expected `schedule` in ['samples', 'steps'], but got {schedule!r}.")
        self.test, self.schedule = test, schedule
        for name in ("eta", "theta", "nu"):
            value = real_option("AdaptiveBatchSize", name, locals()[name])
            if value <= 0:
                raise ValueError(f"AdaptiveBatchSize: expected `{name}` > 0, but got {value}; the tests compare a "
                                 "variance with threshold² · ‖ḡ‖², so 0 would always grow the batch.")
            setattr(self, name, value)
        initial = int_option("AdaptiveBatchSize", "initial_accumulation", initial_accumulation)
        if initial < 2:
            raise ValueError(f"AdaptiveBatchSize: expected `initial_accumulation` >= 2, but got {initial}; the variance "
                             "is estimated from the micro-batch gradients of a step, so a step needs at least 2 (halve "
                             "the loader's batch size and set initial_accumulation=2 to keep the same effective batch).")
        self.initial_accumulation = initial
        self.growth = int_option("AdaptiveBatchSize", "growth", growth, minimum=2)
        cap = 8 * initial if max_accumulation is None else max_accumulation
        self.max_accumulation = int_option("AdaptiveBatchSize", "max_accumulation", cap, minimum=initial)
        ratio, power = self.max_accumulation // initial, 1
        while power < ratio:
            power *= self.growth
        if self.max_accumulation % initial or power != ratio:
            raise ValueError(f"AdaptiveBatchSize: `max_accumulation`={self.max_accumulation} must be "
                             f"initial_accumulation·growthⁿ ({initial}·{self.growth}ⁿ), since the accumulation grows by "
                             "whole factors; e.g. " + ", ".join(str(initial * self.growth ** n) for n in range(1, 4)) + ".")
        self.check_every = int_option("AdaptiveBatchSize", "check_every", check_every, minimum=1)
        self.accumulation = self.initial_accumulation
        self.pending: Optional[int] = None
        self.schedule_position = 0  # scheduler steps taken so far (Lightning's and ours)
        self.window: list[Tensor] = []  # per optimizer step: the [_FIELDS] summed statistics
        self.decisions: list[dict[str, float]] = []
        self._reset_step()

    # ------------------------------------------------------------------ setup
    def _reset_step(self) -> None:
        self._previous: Optional[Tensor] = None  # A_{j-1}
        self._latest: Optional[Tensor] = None  # h_j of the newest micro-batch (counted once the next one arrives)
        self._seen: list[Tensor] = []  # h_j of the counted micro-batches (inner products need them)
        self._sums = torch.zeros(2)  # Σ‖h‖², M over the counted micro-batches
        self._sum_vector: Optional[Tensor] = None  # Σ h over them (its inner product with ḡ comes at the step's end)
        self._micro_batches = 0
        self._stepped = False

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit":
            return
        if not pl_module.automatic_optimization:
            raise RuntimeError("AdaptiveBatchSize needs automatic optimization (it sets accumulate_grad_batches); "
                               "set `self.automatic_optimization = True` or remove the callback.")
        if any(isinstance(cb, GradientAccumulationScheduler) for cb in trainer.callbacks):
            raise RuntimeError("AdaptiveBatchSize owns gradient accumulation, so it cannot run with a "
                               "GradientAccumulationScheduler; remove one of the two.")
        if trainer.accumulate_grad_batches not in (1, self.initial_accumulation):
            raise ValueError(f"AdaptiveBatchSize owns gradient accumulation, but the Trainer was built with "
                             f"accumulate_grad_batches={trainer.accumulate_grad_batches}; build it with 1 and pass "
                             f"AdaptiveBatchSize(initial_accumulation={trainer.accumulate_grad_batches}) instead.")
        if trainer.strategy.handles_gradient_accumulation:
            raise RuntimeError(f"AdaptiveBatchSize: the {type(trainer.strategy).__name__} strategy accumulates gradients "
                               "itself, so the accumulation cannot change during training; use DDP or one device.")
        # Lightning sizes estimated_stepping_batches (and so the LR schedule) with the initial accumulation.
        trainer.accumulate_grad_batches = self.initial_accumulation

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        trainer.accumulate_grad_batches = self.accumulation  # restored by load_state_dict on resume
        self._reset_step()

    # ------------------------------------------------------------------ evidence
    @override
    def on_after_backward(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        params = [p for p in pl_module.parameters() if p.requires_grad]
        accumulated = _flat_grad(params)
        previous = self._previous if self._previous is not None else torch.zeros_like(accumulated)
        if self._latest is not None:  # the previous micro-batch was not the step's last: count it
            self._count(self._latest)
        self._latest = trainer.accumulate_grad_batches * (accumulated - previous)
        self._previous = accumulated
        self._micro_batches += 1

    def _count(self, h: Tensor) -> None:
        self._sums = self._sums.to(h.device)
        self._sums[0] += h.pow(2).sum()
        self._sums[1] += 1
        self._sum_vector = h.clone() if self._sum_vector is None else self._sum_vector.add_(h)
        if self.test == "augmented_inner_product":
            self._seen.append(h)

    @override
    def on_before_optimizer_step(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", optimizer: Any) -> None:
        if self._latest is None:  # no backward this step (e.g. a skipped batch)
            self._stepped = True
            return
        if trainer.world_size == 1:
            self._count(self._latest)  # single process: the last micro-batch was not synchronised either
        assert self._previous is not None
        k, counted = trainer.accumulate_grad_batches, self._micro_batches
        mean_grad = self._previous * (k / counted)  # the step's mean micro-batch gradient, ḡ
        row = torch.zeros(_FIELDS, device=mean_grad.device)
        g2 = mean_grad.pow(2).sum()
        sums = self._sums.to(mean_grad.device)
        row[0], row[2] = sums[0], sums[1]
        if self._sum_vector is not None:
            row[1] = self._sum_vector @ mean_grad
        if self._seen:
            inner = torch.stack([h @ mean_grad for h in self._seen])
            norms = torch.stack([h.pow(2).sum() for h in self._seen])
            row[3] = (inner - g2).pow(2).sum()
            row[4] = (norms - inner.pow(2) / g2.clamp_min(1e-30)).sum()
        # ‖ḡ‖² and N are the same on every rank: pre-divide so that the cross-rank sum restores them
        row[5] = g2 / trainer.world_size
        row[6] = counted
        self.window.append(row)
        self._reset_step()
        self._stepped = True

    # ------------------------------------------------------------------ decisions
    @override
    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self._stepped:
            return
        self._stepped = False
        self._advance_schedule(trainer, batch_idx)
        if len(self.window) >= self.check_every:
            self._decide(trainer, pl_module)
        if self.pending is not None and (batch_idx + 1) % self.pending == 0:
            self._apply(trainer, self.pending)
        pl_module.log("adaptive_batch_size/accumulation", float(self.accumulation), on_step=True, on_epoch=False)

    @override
    def on_train_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.pending is not None:  # Lightning's micro-batch counter restarts at 0: any k fits
            self._apply(trainer, self.pending)

    def _apply(self, trainer: "pl.Trainer", accumulation: int) -> None:
        self.accumulation, self.pending = accumulation, None
        trainer.accumulate_grad_batches = accumulation

    def _decide(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        evidence = torch.stack(self.window)
        self.window = []
        evidence = trainer.strategy.reduce(evidence, reduce_op="sum") if trainer.world_size > 1 else evidence
        ip = self.test == "augmented_inner_product"
        total = evidence[:, 6]  # N: the micro-batches of each step, summed over ranks
        stats = gradient_noise_statistics(evidence[:, 0], evidence[:, 1], evidence[:, 2], evidence[:, 5], total,
                                          evidence[:, 3] if ip else None, evidence[:, 4] if ip else None)
        tests = [("norm", self.eta)] if not ip else [("inner_product", self.theta), ("orthogonality", self.nu)]
        needed, logged = torch.zeros(()), {}
        for name, threshold in tests:
            valid = torch.isfinite(stats[name])
            if not bool(valid.any()):
                return  # no usable evidence in this window (every step non-finite or without a gradient)
            mean_stat, mean_total = stats[name][valid].mean(), total[valid].mean()
            logged[name] = float(mean_stat)
            needed = torch.maximum(needed, required_micro_batches(mean_stat, threshold, mean_total).cpu())
        current = self.pending or self.accumulation
        target = min(self.max_accumulation, max(current, math.ceil(float(needed) / trainer.world_size)))
        new = current
        while new < target:
            new *= self.growth
        new = min(new, self.max_accumulation)
        self.decisions.append({"step": float(trainer.global_step), **logged, "required_micro_batches": float(needed),
                               "accumulation": float(new)})
        for name, value in logged.items():
            pl_module.log(f"adaptive_batch_size/{name}_statistic", value, on_step=True, on_epoch=False)
        pl_module.log("adaptive_batch_size/required_micro_batches", float(needed), on_step=True, on_epoch=False)
        if new != self.accumulation:
            self.pending = new

    def _advance_schedule(self, trainer: "pl.Trainer", batch_idx: int) -> None:
        """Bring step-interval schedulers to the step count of the initial accumulation (``schedule="samples"``)."""
        self.schedule_position += 1  # Lightning stepped them once for this optimizer step
        if self.schedule == "steps":
            return
        per_epoch = math.ceil(trainer.num_training_batches / self.initial_accumulation)
        target = trainer.current_epoch * per_epoch + math.ceil((batch_idx + 1) / self.initial_accumulation)
        extra = target - self.schedule_position
        if extra <= 0:
            return
        for config in trainer.lr_scheduler_configs:
            if config.interval == "step" and config.frequency == 1 and not config.reduce_on_plateau:
                for _ in range(extra):
                    config.scheduler.step()
        self.schedule_position = target

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"accumulation": self.accumulation, "pending": self.pending, "schedule_position": self.schedule_position,
                "window": [row.detach().cpu().clone() for row in self.window],
                "decisions": [dict(d) for d in self.decisions],
                "options": {"initial_accumulation": self.initial_accumulation, "growth": self.growth,
                            "max_accumulation": self.max_accumulation, "test": self.test}}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("options", {})
        mine = {"initial_accumulation": self.initial_accumulation, "growth": self.growth,
                "max_accumulation": self.max_accumulation, "test": self.test}
        if saved != mine:
            raise ValueError(f"AdaptiveBatchSize: the checkpoint was written with {saved}, but this callback has {mine}; "
                             "resume with the same options.")
        self.accumulation, self.pending = int(state_dict["accumulation"]), state_dict["pending"]
        self.schedule_position = int(state_dict["schedule_position"])
        self.window = [row.clone() for row in state_dict["window"]]
        self.decisions = [dict(d) for d in state_dict["decisions"]]
