"""``UniformSubset``: a uniform random subset of every batch, the fair baseline for any selection policy."""

from __future__ import annotations

from typing import Any, Optional

from torch import Tensor

from lightning_select.core import SelectionPolicy, StepContext
from lightning_select.core.engine import override
from lightning_select.core.options import int_option, real_option
from lightning_select.rules.selection import uniform_keep


class UniformSubset(SelectionPolicy):
    """Train on a uniform random subset of ``round(keep·B)`` rows of every batch (at least one).

    **Card.** What it changes: the selection (weights stay 1). Unbiased: yes for the batch's mean
    loss: every row is kept with the same probability and every subset of that size is equally
    likely, so the subset's mean loss has the full batch's mean as its expectation. Extra cost: none
    (no scoring pass, no collective, no per-sample state; one ``randperm`` per step). Reference: the
    uniform baseline every data-selection paper compares against (e.g. Selective-Backprop, RHO-LOSS);
    compare a policy with this at the *same kept fraction* and the same number of trained rows,
    so that the comparison isolates which rows are chosen from how many. Defaults: ``keep=0.5``.

    Randomness comes from ``StepContext.generator(seed)`` only (position-seeded), so a resumed run
    makes bit-identical selections. Under DDP each rank draws from its own batch. Logged:
    ``uniform/kept_fraction``. The counts of steps and kept rows are checkpointed.

    Args:
        keep: the kept fraction, in (0, 1].
        seed: seed of the position-seeded draws.

    Example::

        >>> from lightning_select import UniformSubset
        >>> baseline = UniformSubset(keep=0.25, seed=0)     # e.g. against SelectiveBackprop(beta=3) (keeps ~1/4)
        >>> baseline.needs_scores
        False
        >>> # Trainer(callbacks=[baseline]).fit(model)   # training_step returns per-sample losses [B]
    """

    order = 100

    def __init__(self, keep: float = 0.5, seed: int = 0) -> None:
        who = type(self).__name__
        keep = real_option(who, "keep", keep)
        if not 0.0 < keep <= 1.0:
            raise ValueError(f"{who}: expected `keep` in (0, 1] (the kept fraction), but got {keep}.")
        self.keep = keep
        self.seed = int_option(who, "seed", seed)
        self.steps = 0
        self.kept_rows = 0

    def select(self, ctx: StepContext) -> Optional[Tensor]:
        n = ctx.rows.numel()
        positions = uniform_keep(n, self.keep, ctx.generator(self.seed))
        self.steps += 1
        self.kept_rows += positions.numel()
        ctx.log("uniform/kept_fraction", positions.numel() / n if n else 0.0)
        return positions

    @property
    def state_key(self) -> str:
        return self._generate_state_key(keep=self.keep, seed=self.seed)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "kept_rows": self.kept_rows}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps = int(state_dict.get("steps", 0))
        self.kept_rows = int(state_dict.get("kept_rows", 0))
