"""Registry pieces of the training-dynamics policies (``TrainingDynamics``, ``DBPM``), used by tests/policy_registry.py.

Kept in their own module so that the shared registry only lists the entries.
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
import torch
from torch import Tensor

NOISY_DIGITS_TRAIN_SIZE, DIGITS_TRAIN_SIZE = 1149, 1437
DBPM_WARMUP = 1  # flags and weights are active from epoch 1 on: in every registry fit (2 and 4 epochs)


def flat(tree, prefix: str = "") -> dict[str, Tensor]:
    """Tensors of a nested dict (ints and floats as 0-d tensors; a SampleTable's trace tuples unpacked)."""
    if isinstance(tree, Tensor):
        return {prefix: tree.detach().clone()}
    if isinstance(tree, (int, float)) and not isinstance(tree, bool):
        return {prefix: torch.tensor(tree)}
    if isinstance(tree, tuple):
        return {f"{prefix}/{i}": v.detach().clone() for i, v in enumerate(tree) if isinstance(v, Tensor)}
    out: dict[str, Tensor] = {}
    if isinstance(tree, dict):
        for key, value in tree.items():
            out.update(flat(value, f"{prefix}/{key}" if prefix else str(key)))
    return out


# ---------------------------------------------------------------------------- TrainingDynamics
def dynamics_policies() -> list[pl.Callback]:
    from lightning_select import TrainingDynamics

    return [TrainingDynamics(trace_epochs=2, el2n_epoch=1)]


def dynamics_state(policies: list[pl.Callback]) -> dict[str, Tensor]:
    return flat(policies[0].state_dict())


def dynamics_check(state: dict[str, Tensor], epochs: int) -> None:
    from lightning_select.data.noisy_labels import NoisyDigitsDataModule

    col = lambda name: state[f"store/table/columns/{name}"]  # noqa: E731
    n = col("presentations")
    # single process, shuffled loader: every training sample once per epoch
    assert n.shape == (NOISY_DIGITS_TRAIN_SIZE,) and bool((n == epochs).all()) and bool((col("epochs_seen") == epochs).all())
    assert bool((col("last_epoch") == epochs - 1).all())
    p, p2 = col("sum_p"), col("sum_p2")
    assert p.dtype == p2.dtype == torch.float64 and bool((p >= 0).all() & (p <= n).all() & (p2 <= p + 1e-12).all())
    assert bool((p2 * n >= p * p - 1e-9).all())  # Cauchy-Schwarz: the variance is non-negative
    correct, forgetting = col("correct_count"), col("forgetting")
    assert bool((correct <= n).all()) and bool((forgetting <= n // 2).all())  # a flip needs a correct presentation first
    assert torch.equal(col("ever_correct") > 0, correct > 0) and int(correct.sum()) > 0
    assert bool(((col("last_correct") == 0) | (col("last_correct") == 1)).all())
    e = col("el2n")
    assert bool(torch.isfinite(e).all() & (e >= 0).all() & (e <= math.sqrt(2) + 1e-6).all())
    dm = NoisyDigitsDataModule()
    dm.setup("fit")
    assert torch.equal(col("label").long(), dm.train_labels)  # the training (noisy) label of each index
    trace, ids = state["store/table/traces/p_true/0"], state["store/table/traces/p_true/1"]
    assert sorted(ids.tolist()) == list(range(max(0, epochs - 2), epochs))  # the last 2 epochs
    assert bool(((trace >= 0) & (trace <= 1)).all())


# ---------------------------------------------------------------------------- DBPM
def dbpm_policies() -> list[pl.Callback]:
    from lightning_select import DBPM

    return [DBPM(warmup_epochs=DBPM_WARMUP, beta_np=2.0, beta_fp=3.0)]


def dbpm_state(policies: list[pl.Callback]) -> dict[str, Tensor]:
    return flat(policies[0].state_dict())


def dbpm_activity(state: dict[str, Tensor]) -> int:
    return int((state["flags"] > 0).sum())


def dbpm_check(state: dict[str, Tensor], epochs: int) -> None:
    count = state["table/columns/count"]
    assert bool((count == epochs).all())  # single process: every pair once per epoch
    assert int(state["flags_epoch"]) == epochs - 1 and int(state["epochs"]) == epochs
    flags = state["flags"]
    assert set(flags.unique().tolist()) <= {0, 1, 2} and dbpm_activity(state) > 0
    mu, sigma = float(state["mu"]), float(state["sigma"])
    assert sigma > 0 and math.isfinite(mu)
    w = state["table/columns/last_weight"]
    assert bool(((w >= 1e-3) & (w <= 1.0)).all())  # bounded, never up-weighted
    assert bool((w[flags == 0] == 1.0).all())  # only flagged pairs are down-weighted (last epoch: these flags)
    assert float(w[flags > 0].max()) < 1.0
    rows, kept, w_sum, w_sq, flagged = state["stats/sums"].tolist()
    assert rows == kept == (epochs - DBPM_WARMUP) * DIGITS_TRAIN_SIZE  # weighted after the warm-up only
    assert 0 < flagged < rows and w_sq <= w_sum < rows


# ---------------------------------------------------------------------------- DynamicsFilter
FILTER_FRACTION, FILTER_KEPT = 0.2, 1149 - 230  # round(0.2 · 1149) = 230 flagged from epoch 1 on


def filter_policies() -> list[pl.Callback]:
    from lightning_select import DynamicsFilter

    return [DynamicsFilter(statistic="aum", fraction=FILTER_FRACTION, warmup_epochs=1, el2n_epoch=1)]


def filter_state(policies: list[pl.Callback]) -> dict[str, Tensor]:
    state = policies[0].state_dict()
    return flat({k: v for k, v in state.items() if k != "flag_log"})


def filter_check(state: dict[str, Tensor], epochs: int) -> None:
    flags, n = state["flags"], state["store/table/columns/presentations"]
    assert int(flags.sum()) == 230 and int(state["flags_epoch"]) == epochs - 1
    # single process: epoch 0 trains every sample, each later epoch every sample not flagged at its start
    assert int(n.sum()) == NOISY_DIGITS_TRAIN_SIZE + (epochs - 1) * FILTER_KEPT
    assert bool((n[flags] < epochs).all())  # the flagged samples of the last epoch were not trained in it
