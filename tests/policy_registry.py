"""The policy test registry: one entry per policy, and every entry gets the same tests.

``tests/test_registry.py`` (fit, exact resume, Hydra) and ``tests/ddp_scenarios.py`` (2-process DDP)
run for every :class:`PolicyCase` in :data:`REGISTRY`. To test a new policy, add one entry: how to build
its callbacks, a tiny task, how to read its comparable state, how much it did, and its Hydra selector.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_select import GuidedNegatives, LossHistory
from lightning_select.data import DigitsLDAGuide, DigitsPairsDataModule
from lightning_select.models import DigitsEmbeddingModule
from registry_dynamics import dbpm_activity, dbpm_check, dbpm_policies, dbpm_state, dynamics_check, \
    dynamics_policies, dynamics_state, filter_check, filter_policies, filter_state


@dataclass(frozen=True)
class PolicyCase:
    """One registry entry.

    Attributes:
        name: test id.
        selector: its Hydra selector (``conf/selector/<selector>.yaml``).
        make_policies: fresh policy callbacks (new objects every call).
        make_task: a fresh ``(LightningModule, datamodule or dataloader)``; ``batch_size`` is per process.
        state: the policies' comparable state after a fit, as a flat ``{name: tensor}``.
        activity: how much the policy did, from ``state`` (must be > 0 after a fit).
        metric: a metric the policy logs (must be in ``trainer.callback_metrics`` after a logged fit, > 0).
        check: invariants of ``state`` after a fit of ``epochs`` epochs (raises AssertionError).
        hydra_kept_fraction: at most this share of each loaded batch is trained per step with the
            selector's Hydra defaults (1.0: every row, checked exactly).
        hydra_metric: the held-out metric of the task the selector's Hydra file trains.
    """

    name: str
    selector: str
    make_policies: Callable[[], list[pl.Callback]]
    make_task: Callable[..., tuple[pl.LightningModule, Any]]
    state: Callable[[list[pl.Callback]], dict[str, Tensor]]
    activity: Callable[[dict[str, Tensor]], int]
    metric: str
    check: Callable[[dict[str, Tensor], int], None]
    hydra_kept_fraction: float = 1.0
    hydra_metric: str = "heldout/precision@1"


def assert_same_state(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    """Bit-exact, NaN-aware equality of two flat states (dtype, shape and values)."""
    assert sorted(a) == sorted(b), sorted(set(a) ^ set(b))
    differ = [k for k in a if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape
              or not torch.equal(a[k].nan_to_num(-7), b[k].nan_to_num(-7))]
    assert not differ, f"policy state differs in {differ}"


def flatten(tree: Any, prefix: str = "") -> dict[str, Tensor]:
    """The tensors of a nested dict as ``{"a/b": tensor}`` (non-tensor leaves dropped), cloned."""
    if isinstance(tree, Tensor):
        return {prefix: tree.detach().clone()}
    if isinstance(tree, dict):
        out: dict[str, Tensor] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}/{key}" if prefix else str(key)))
        return out
    return {}


def digits_task(batch_size: int = 256) -> tuple[pl.LightningModule, Any]:
    """The embedded digits contrastive task with a small encoder (1437 training images)."""
    return DigitsEmbeddingModule(hidden=32, dim=16), DigitsPairsDataModule(batch_size=batch_size)


DIGITS_TRAIN_SIZE = 1437


def noisy_digits_task(batch_size: int = 256) -> tuple[pl.LightningModule, Any]:
    """Digits classification with 30% symmetric label noise (1149 training images, ``train_noisy_mask``
    on the datamodule); ``training_step`` returns ``{"loss": [B], "logits": [B, 10]}``."""
    from lightning_select.data.noisy_labels import NoisyDigitsDataModule
    from lightning_select.models.classifier import NoisyLabelClassifier

    return NoisyLabelClassifier(arch="mlp", hidden=32), NoisyDigitsDataModule(batch_size=batch_size)


NOISY_DIGITS_TRAIN_SIZE = 1149


# ---------------------------------------------------------------------------- LossHistory
def _history_state(policies: list[pl.Callback]) -> dict[str, Tensor]:
    return flatten(policies[0].store.state_dict())


def _history_check(state: dict[str, Tensor], epochs: int) -> None:
    # single process: every training sample is observed exactly once per epoch
    assert int(state["count"].sum()) == epochs * DIGITS_TRAIN_SIZE, int(state["count"].sum())
    assert int(state["last_epoch"].max()) == epochs - 1
    assert bool(torch.isfinite(state["ema_loss"]).all()) and float(state["ema_loss"].min()) > 0


# ---------------------------------------------------------------------------- GuidedNegatives
def _gist_policies() -> list[pl.Callback]:
    return [GuidedNegatives(DigitsLDAGuide.fit(seed=0), anchor_column="image", positive_column="image",
                            margin=0.2, record_flagged_pairs=True)]


def _gist_state(policies: list[pl.Callback]) -> dict[str, Tensor]:
    gist = policies[0]
    return {**flatten(gist.flagged_pairs(), "pairs"), **flatten(gist.state_dict(), "state")}


def _gist_check(state: dict[str, Tensor], epochs: int) -> None:
    score, threshold = state["pairs/guide_score"], state["pairs/threshold"]
    assert bool((score > threshold).all())  # the rule flags strictly above the cut-off
    assert set(state["pairs/block"].unique().tolist()) == {0, 1, 2}  # AP, AA and PP all flag pairs here
    assert set(state["pairs/epoch"].unique().tolist()) == set(range(epochs))
    assert bool((state["pairs/anchor_index"] != state["pairs/candidate_index"]).all())  # own pairs excluded
    for key in ("anchor_index", "candidate_index", "guide_score", "epoch", "step"):  # the checkpointed log
        assert torch.equal(state[f"pairs/{key}"], state[f"state/flagged_pairs/columns/{key}"]), key


# ---------------------------------------------------------------------------- GIST's modes: attract, self-guide
def _gist_attract_policies() -> list[pl.Callback]:
    return [GuidedNegatives(DigitsLDAGuide.fit(seed=0), anchor_column="image", positive_column="image",
                            margin=0.2, record_flagged_pairs=True, false_negatives="attract")]


def _self_guide_policies() -> list[pl.Callback]:
    # digits views of one image are near-identical for the untrained student, so margin -0.1 flags real candidates
    return [GuidedNegatives("self", anchor_column="image", positive_column="image", margin=-0.1,
                            record_flagged_pairs=True)]


def _flagged_pairs_check(state: dict[str, Tensor], epochs: int) -> None:
    assert bool((state["pairs/guide_score"] > state["pairs/threshold"]).all())
    assert bool((state["pairs/anchor_index"] != state["pairs/candidate_index"]).all())  # own pairs excluded
    assert set(state["pairs/epoch"].unique().tolist()) <= set(range(epochs))
    for key in ("anchor_index", "candidate_index", "guide_score", "epoch", "step"):  # the checkpointed log
        assert torch.equal(state[f"pairs/{key}"], state[f"state/flagged_pairs/columns/{key}"]), key


def _audit_policies() -> list[pl.Callback]:
    from lightning_select import FalseNegativeAudit

    # the batches alone (no guide): GIST's flags against gold are tested in tests/test_false_negative_modes.py
    return [FalseNegativeAudit(key="label")]


def _audit_check(state: dict[str, Tensor], epochs: int) -> None:
    candidates, gold, flagged, true_flags = state["sums"][0].tolist()
    assert candidates == epochs * (5 * 256 * 255 + 157 * 156)  # single process: every AP candidate, own excluded
    assert gold > 0 and flagged == true_flags == 0 and int(state["steps"]) == epochs * DIGITS_STEPS_PER_EPOCH


# ---------------------------------------------------------------------------- ImportanceSampling
def _importance_policies() -> list[pl.Callback]:
    from lightning_select import ImportanceSampling

    # a low switch-on threshold so that the importance-sampled branch runs within the short fits
    return [ImportanceSampling(keep=0.5, score="loss", tau_threshold=1.0001, seed=1)]


def _importance_state(policies: list[pl.Callback]) -> dict[str, Tensor]:
    return {"tau": torch.tensor([policies[0].tau], dtype=torch.float64)}


def _importance_check(state: dict[str, Tensor], epochs: int) -> None:
    assert float(state["tau"]) >= 1.0  # tau >= 1 by construction (uniform sampling gives exactly 1)


# ---------------------------------------------------------------------------- SelectiveBackprop, UniformSubset
DIGITS_STEPS_PER_EPOCH = 6  # 1437 rows in batches of 256: 5 full batches and one of 157


def _sb_policies(**options: Any) -> list[pl.Callback]:
    from lightning_select import SelectiveBackprop

    return [SelectiveBackprop(**options)]


def _uniform_policies() -> list[pl.Callback]:
    from lightning_select import UniformSubset

    return [UniformSubset(keep=0.25, seed=5)]


def _sb_state(policies: list[pl.Callback]) -> dict[str, Tensor]:
    """The loss history ring buffer, its next slot, the step count and (stale mode) the per-sample table."""
    state = policies[0].state_dict()
    out = {"history": state["history"].clone(), "history_next": torch.tensor(state["history_next"]),
           "selecting_steps": torch.tensor(state["selecting_steps"])}
    return {**out, **flatten(state["table"], "table")} if state["table"] is not None else out


def _sb_check(state: dict[str, Tensor], epochs: int) -> None:
    # the paper rule pushes every scored loss: all 1437 per epoch (single process), R = 1024
    assert int(state["selecting_steps"]) == epochs * DIGITS_STEPS_PER_EPOCH
    assert int(state["history_next"]) == epochs * DIGITS_TRAIN_SIZE % 1024
    assert bool((state["history"] > 0).all())  # full, and InfoNCE losses are positive


def _sb_stale_check(state: dict[str, Tensor], epochs: int) -> None:
    # epoch 0 trains everything (no sample has a loss yet); later epochs push the stale scores of all rows
    assert int(state["selecting_steps"]) == (epochs - 1) * DIGITS_STEPS_PER_EPOCH
    assert int(state["history_next"]) == (epochs - 1) * DIGITS_TRAIN_SIZE % 1024
    loss, epoch = state["table/columns/loss"], state["table/columns/epoch"]
    assert bool(torch.isfinite(loss).all()) and int(epoch.min()) >= 0  # every sample was trained in epoch 0
    assert 0 < int((epoch == epochs - 1).sum()) < DIGITS_TRAIN_SIZE  # the last epoch trained a subset only


def _uniform_check(state: dict[str, Tensor], epochs: int) -> None:
    assert int(state["steps"]) == epochs * DIGITS_STEPS_PER_EPOCH
    assert int(state["kept_rows"]) == epochs * (5 * 64 + round(0.25 * 157))  # keep=0.25 of 5×256 + 157


# ---------------------------------------------------------------------------- ReducibleLossSelection (RHO-LOSS)
NOISY_DIGITS_STEPS_PER_EPOCH = 5  # 1149 rows in batches of 256: 4 full batches and one of 125


@functools.lru_cache(maxsize=None)
def rho_table_path() -> str:
    """A prebuilt irreducible-loss table for :func:`noisy_digits_task` in a per-process temp folder (built once)."""
    import tempfile

    from lightning_select.data.noisy_labels import NoisyDigitsDataModule
    from lightning_select.models.classifier import NoisyLabelClassifier
    from lightning_select.policies.reducible_loss import build_irreducible_table

    dm = NoisyDigitsDataModule()
    dm.setup("fit")
    path = Path(tempfile.mkdtemp(prefix="rho_table_")) / "digits_noisy.pt"
    build_irreducible_table(lambda: NoisyLabelClassifier(arch="mlp", hidden=32), dm.holdout_dataloader(64, True),
                            dm.scoring_dataloader(), epochs=10, path=path, lr=3e-3, progress=False)
    return str(path)


def _rho_policies() -> list[pl.Callback]:
    from lightning_select import ReducibleLossSelection

    return [ReducibleLossSelection(rho_table_path(), keep=0.1, build_if_missing=False, progress=False)]


def _rho_check(state: dict[str, Tensor], epochs: int) -> None:
    # single process, keep=0.1: ⌈25.6⌉ = 26 of each full batch of 256 and ⌈12.5⌉ = 13 of the last 125
    assert int(state["steps"]) == epochs * NOISY_DIGITS_STEPS_PER_EPOCH
    assert int(state["kept_rows"]) == epochs * (4 * 26 + 13)


# ---------------------------------------------------------------------------- EntropySelection (EATA)
def _eata_policies() -> list[pl.Callback]:
    from lightning_select import EntropySelection

    # from scratch the paper's E0 = 0.4·ln C and ε = 0.05 keep nothing: the reliability filter is off (E0 = ln C,
    # kept unless exactly uniform) and the redundancy filter is off (ε > 1); the weights exp(E0 − E) still apply.
    # The Fisher regulariser is on (estimated at the start from the datamodule's train_dataloader(), the logits of
    # the classifier's forward on "image"), so the resume and DDP tests cover its state: the Fisher and the anchors.
    return [EntropySelection(entropy_fraction=1.0, epsilon=1.01, fisher_alpha=100.0, fisher_input_key="image",
                             progress=False)]


def _eata_state(policies: list[pl.Callback]) -> dict[str, Tensor]:
    return flatten(policies[0].state_dict())  # moving_average, fisher/<param> and anchors/<param>


def _eata_check(state: dict[str, Tensor], epochs: int) -> None:
    average = state["moving_average"]
    assert average.shape == (10,) and average.dtype == torch.float32
    assert bool((average > 0).all()) and abs(float(average.sum()) - 1.0) < 1e-5  # a mean of softmax outputs
    fisher = {k[len("fisher/"):]: v for k, v in state.items() if k.startswith("fisher/")}
    anchors = {k[len("anchors/"):]: v for k, v in state.items() if k.startswith("anchors/")}
    assert sorted(fisher) == sorted(anchors) == ["net.1.bias", "net.1.weight", "net.4.bias", "net.4.weight"]
    assert all(bool((w >= 0).all()) and bool(torch.isfinite(w).all()) and w.shape == anchors[k].shape
               for k, w in fisher.items())
    assert all(float(w.max()) > 0 for w in fisher.values())  # every parameter matters for the pseudo-labels


# ---------------------------------------------------------------------------- AdaptiveBatchSize
def _abs_policies() -> list[pl.Callback]:
    from lightning_select import AdaptiveBatchSize

    # η small enough that the contrastive digits gradients fail the norm test within the first epoch, so the
    # accumulation grows 2 → 4 (the cap) and the resume test covers a run whose batch has grown
    return [AdaptiveBatchSize(eta=0.05, initial_accumulation=2, max_accumulation=4, check_every=1),
            LossHistory()]


def _abs_state(policies: list[pl.Callback]) -> dict[str, Tensor]:
    state = policies[0].state_dict()
    decisions = torch.tensor([[d["step"], d["norm"], d["required_micro_batches"], d["accumulation"]]
                              for d in state["decisions"]]).reshape(-1, 4)
    return {"accumulation": torch.tensor(state["accumulation"]), "pending": torch.tensor(state["pending"] or 0),
            "schedule_position": torch.tensor(state["schedule_position"]), "decisions": decisions,
            "window": torch.stack(state["window"]) if state["window"] else torch.zeros(0, 7),
            **flatten(policies[1].store.state_dict(), "history")}


def _abs_check(state: dict[str, Tensor], epochs: int) -> None:
    grown = state["decisions"][:, 3]
    assert bool((grown[1:] >= grown[:-1]).all()) and int(state["accumulation"]) == 4  # grew, never shrank
    assert bool(torch.isfinite(state["decisions"][:, 1]).all())
    # the batch grows, not the data: every sample still trained once per epoch (LossHistory is exact)
    assert int(state["history/count"].sum()) == epochs * DIGITS_TRAIN_SIZE


# ---------------------------------------------------------------------------- ColorFilter (CoLoR-Filter)
COLOR_KEPT = 287  # ⌊1149 / 4⌋ with tau=4


@functools.lru_cache(maxsize=None)
def color_subset_path() -> str:
    """A prebuilt CoLoR-Filter subset file (tau=4) for :func:`noisy_digits_task` in a per-process temp folder."""
    import tempfile

    from lightning_select.data.noisy_labels import NoisyDigitsDataModule
    from lightning_select.models.classifier import NoisyLabelClassifier
    from lightning_select.policies.color_filter import build_color_subset_from_datamodule

    dm = NoisyDigitsDataModule()
    dm.setup("fit")
    path = Path(tempfile.mkdtemp(prefix="color_subset_")) / "digits_noisy.pt"
    build_color_subset_from_datamodule(dm, lambda: NoisyLabelClassifier(arch="mlp", hidden=32), path, tau=4,
                                       prior_epochs=5, conditional_epochs=5, lr=3e-3, progress=False)
    return str(path)


def color_task(batch_size: int = 256) -> tuple[pl.LightningModule, Any]:
    """:func:`noisy_digits_task` training on the kept quarter of :func:`color_subset_path` (``sampler="subset_file"``)."""
    from lightning_select.data.noisy_labels import NoisyDigitsDataModule
    from lightning_select.models.classifier import NoisyLabelClassifier

    return NoisyLabelClassifier(arch="mlp", hidden=32), NoisyDigitsDataModule(
        batch_size=batch_size, sampler="subset_file", subset_path=color_subset_path())


def _color_policies() -> list[pl.Callback]:
    from lightning_select import ColorFilter

    return [ColorFilter(color_subset_path(), tau=4, build_if_missing=False, check_options=False, progress=False)]


def _color_check(state: dict[str, Tensor], epochs: int) -> None:
    # single process: the kept 287 once per epoch, in batches of 256 and 31
    assert int(state["trained_rows"]) == epochs * COLOR_KEPT and int(state["steps"]) == epochs * 2
    assert int(state["num_kept"]) == COLOR_KEPT and int(state["num_samples"]) == NOISY_DIGITS_TRAIN_SIZE


# ---------------------------------------------------------------------------- RS2 and hard batches (epoch samplers)
RS2_FRACTION = 0.3  # m = ⌈0.3 · 1149⌉ = 345 per epoch (odd: padded under DDP); epoch 3 straddles two permutations


def rs2_task(batch_size: int = 256) -> tuple[pl.LightningModule, Any]:
    """:func:`noisy_digits_task`, each epoch on a fresh RS2 subset (``sampler="rs2"``); observed by ``LossHistory``."""
    from lightning_select.data.noisy_labels import NoisyDigitsDataModule
    from lightning_select.models.classifier import NoisyLabelClassifier

    return NoisyLabelClassifier(arch="mlp", hidden=32), NoisyDigitsDataModule(
        batch_size=batch_size, sampler="rs2", rs2_fraction=RS2_FRACTION)


def _rs2_policies() -> list[pl.Callback]:
    # epoch 3 straddles two permutations: the sampler keeps it free of repeated samples
    return [LossHistory()]


def _rs2_check(state: dict[str, Tensor], epochs: int) -> None:
    # single process: the history counts each sample once per step that trained it; replay the sampler's subsets
    from lightning_select.samplers import RS2Sampler

    sampler, expected = RS2Sampler(NOISY_DIGITS_TRAIN_SIZE, RS2_FRACTION, seed=0), torch.zeros(NOISY_DIGITS_TRAIN_SIZE)
    for epoch in range(epochs):
        subset = torch.tensor(sampler.indices(epoch))
        for step in subset.split(256):
            expected[step.unique()] += 1
    assert torch.equal(state["count"].double(), expected.double()) and int(expected.sum()) == epochs * 345


# δ = 0.8 keeps k = 4 of the b = 5 batches of 256 (single process; under DDP 5 global batches of 2 · 128), so the
# 4-epoch run (5 + 3 · 4 = 17 steps) has twice the steps of the resumed 2 epochs (2 · 4) plus one, as the resume
# tests expect (len(resumed) == len(full) // 2); the resumed epochs 2 and 3 train the 4 hardest batches.
HARD_FRACTION = 0.8


def hard_batches_task(batch_size: int = 256) -> tuple[pl.LightningModule, Any]:
    """:func:`noisy_digits_task` with fixed batches, later epochs only the hardest (``sampler="hard_batches"``)."""
    from lightning_select.data.noisy_labels import NoisyDigitsDataModule
    from lightning_select.models.classifier import NoisyLabelClassifier

    return NoisyLabelClassifier(arch="mlp", hidden=32), NoisyDigitsDataModule(
        batch_size=batch_size, sampler="hard_batches", hard_fraction=HARD_FRACTION)


def _hard_policies() -> list[pl.Callback]:
    from lightning_select.policies import HardBatches

    return [HardBatches()]


def _hard_check(state: dict[str, Tensor], epochs: int) -> None:
    losses = state["sampler/losses"]  # epoch 0 trains (and records) every batch once
    assert losses.shape == (5,) and losses.dtype == torch.float32
    assert bool(torch.isfinite(losses).all()) and float(losses.min()) > 0


# ---------------------------------------------------------------------------- InfoBatch
# δ = 0.75: epochs e < 0.75·E prune, so the 2-epoch fit prunes epoch 1 and the 4-epoch runs prune epochs 1 and 2 and
# anneal in epoch 3 (epoch 0 has no scores yet: full). With r = 0.5 about half of the 1149 samples are well-learned
# and a pruned epoch keeps ~850 (measured 849-864): 4 steps of 256 (DDP: 4 of 2 · 128) against 5 for a full epoch,
# so the 4-epoch run has 5 + 4 + 4 + 5 = 18 steps, twice the resumed epochs 2 and 3, as the resume tests expect.
INFOBATCH_DELTA = 0.75


def infobatch_task(batch_size: int = 256) -> tuple[pl.LightningModule, Any]:
    """:func:`noisy_digits_task` on InfoBatch's per-epoch subsets (``sampler="infobatch"``, r = 0.5, δ = 0.75)."""
    from lightning_select.data.noisy_labels import NoisyDigitsDataModule
    from lightning_select.models.classifier import NoisyLabelClassifier

    return NoisyLabelClassifier(arch="mlp", hidden=32), NoisyDigitsDataModule(
        batch_size=batch_size, sampler="infobatch", infobatch_prune=0.5, infobatch_delta=INFOBATCH_DELTA)


def _infobatch_policies() -> list[pl.Callback]:
    from lightning_select import InfoBatch

    return [InfoBatch()]


def _infobatch_state(policies: list[pl.Callback]) -> dict[str, Tensor]:
    state = policies[0].state_dict()  # the score table, the sampler's scores and epoch sizes, the schedule's count
    return {**flatten(state), "planned_steps": torch.tensor(state["planned_steps"]),
            "scores_epoch": torch.tensor(state["sampler"]["scores_epoch"])}


def _infobatch_check(state: dict[str, Tensor], epochs: int) -> None:
    score = state["table/columns/score"]  # epoch 0 trains (and scores) every sample
    assert score.shape == (NOISY_DIGITS_TRAIN_SIZE,) and bool(torch.isfinite(score).all()) and float(score.min()) > 0
    sizes = state["sampler/kept_sizes"].tolist()
    pruning = -(-3 * epochs // 4)  # ⌈0.75 · E⌉
    assert len(sizes) == epochs and sizes[0] == NOISY_DIGITS_TRAIN_SIZE and int(state["scores_epoch"]) == epochs - 1
    assert all(0 < m < NOISY_DIGITS_TRAIN_SIZE for m in sizes[1:pruning]), sizes
    assert all(m == NOISY_DIGITS_TRAIN_SIZE for m in sizes[pruning:]), sizes  # the anneal: full data
    assert int(state["planned_steps"]) == sum(-(-m // 256) for m in sizes)  # the step count became exact


# ---------------------------------------------------------------------------- FocalWeighting, OHEM, LossSoftmaxWeighting
# Stateless rules: each policy keeps running totals of what it did (steps; rows, kept rows, Σw, Σw², Σ score summed
# over every rank), which the resume and DDP tests compare bit for bit.
FOCAL_ALPHA = [0.05 + 0.95 * (c / 9) ** 2 for c in range(10)]  # per-class α: the cap max(w)/mean(w) <= 2 bites


def _weighting_state(policies: list[pl.Callback]) -> dict[str, Tensor]:
    return {k: torch.as_tensor(v) for k, v in policies[0].state_dict().items()}  # steps, sums [5] fp64


def _focal_policies() -> list[pl.Callback]:
    from lightning_select import FocalWeighting

    return [FocalWeighting(gamma=2.0, alpha=FOCAL_ALPHA, max_weight_ratio=2.0)]


def _focal_check(state: dict[str, Tensor], epochs: int) -> None:
    rows, kept, w_sum, w_sq, pt_sum = state["sums"].tolist()
    assert int(state["steps"]) == epochs * NOISY_DIGITS_STEPS_PER_EPOCH
    assert rows == kept == epochs * NOISY_DIGITS_TRAIN_SIZE
    assert 0 < w_sum and w_sq > 0 and 0 < pt_sum < rows  # p_t in (0, 1)


def _ohem_policies() -> list[pl.Callback]:
    from lightning_select import OHEM

    return [OHEM(keep=0.25, scope="global", mode="select")]


def _ohem_check(state: dict[str, Tensor], epochs: int) -> None:
    # single process, keep=0.25: ⌈64⌉ of each full batch of 256 and ⌈31.25⌉ = 32 of the last 125
    rows, kept, w_sum, w_sq, loss_sum = state["sums"].tolist()
    assert int(state["steps"]) == epochs * NOISY_DIGITS_STEPS_PER_EPOCH
    assert rows == epochs * NOISY_DIGITS_TRAIN_SIZE and kept == w_sum == w_sq == epochs * (4 * 64 + 32)
    assert loss_sum > 0


def _loss_softmax_policies() -> list[pl.Callback]:
    from lightning_select import LossSoftmaxWeighting

    return [LossSoftmaxWeighting(temperature=1.0, max_weight_ratio=4.0)]


def _loss_softmax_check(state: dict[str, Tensor], epochs: int) -> None:
    rows, kept, w_sum, w_sq, loss_sum = state["sums"].tolist()
    assert int(state["steps"]) == epochs * DIGITS_STEPS_PER_EPOCH
    assert rows == kept == epochs * DIGITS_TRAIN_SIZE
    assert abs(w_sum - rows) < 1e-3 * rows  # mean weight 1, kept by the cap
    assert w_sq > rows and loss_sum > 0  # the weights are not all equal


# ---------------------------------------------------------------------------- HardnessWeightedNegatives
# A stateless logit edit: its running totals (steps; negatives, weighted, masked, Σ bonus, Σ bonus², Σ exp(bonus),
# fp64, summed over every rank) are the compared state.
def _hardness_policies() -> list[pl.Callback]:
    from lightning_select import HardnessWeightedNegatives

    return [HardnessWeightedNegatives(alpha=2.0)]  # α = 9 lifts the batch-256 InfoNCE above the fit test's bound of 10


def _hardness_check(state: dict[str, Tensor], epochs: int) -> None:
    negatives, weighted, masked, bonus_sum, bonus_sq, weight_sum = state["sums"].tolist()
    assert int(state["steps"]) == epochs * DIGITS_STEPS_PER_EPOCH and state["sums"].dtype == torch.float64
    # single process, no GIST: every off-diagonal AP entry of 5 batches of 256 and one of 157, none masked
    assert negatives == weighted == epochs * (5 * 256 * 255 + 157 * 156) and masked == 0
    assert bonus_sq > 0 and weight_sum > 0 and abs(bonus_sum) <= 2.0 * weighted  # |α·cos| <= α


# ---------------------------------------------------------------------------- BatchComposition (composed batches)
# Clustered batches from the guide cache of GIST (k = 10, a quarter of each batch random); and cluster-reweighted
# epochs of 862 = round(0.6 · 1437) samples from the student's clusters (re-clustered at epochs 0 and 2, so the
# resumed run re-clusters at epoch 2 from the restored model), weighted by LossHistory's EMA losses. Every epoch has
# the same number of steps (6, and 4 of 256; DDP: 6 and 4 per rank), as the resume tests expect.
COMPOSITION_CLUSTERS, REWEIGHT_BUDGET_SIZE = 10, 862


def clustered_batches_task(batch_size: int = 256) -> tuple[pl.LightningModule, Any]:
    """:func:`digits_task` with batches from one k-means cluster each (plus 25% random fillers)."""
    from lightning_select.samplers import ClusteredBatchSampler

    factory = functools.partial(ClusteredBatchSampler, num_clusters=COMPOSITION_CLUSTERS, mix=0.25)
    return DigitsEmbeddingModule(hidden=32, dim=16), DigitsPairsDataModule(batch_size=batch_size, batch_sampler=factory)


def cluster_reweighted_task(batch_size: int = 256) -> tuple[pl.LightningModule, Any]:
    """:func:`digits_task` training 60% of the samples per epoch, drawn per student cluster by loss."""
    from lightning_select.samplers import ClusterReweightedBatchSampler

    factory = functools.partial(ClusterReweightedBatchSampler, num_clusters=COMPOSITION_CLUSTERS, budget=0.6,
                                temperature=0.05, max_cluster_share=0.3)
    return DigitsEmbeddingModule(hidden=32, dim=16), DigitsPairsDataModule(batch_size=batch_size, batch_sampler=factory)


def _clustered_policies() -> list[pl.Callback]:
    from lightning_select import BatchComposition

    return [*_gist_policies(), BatchComposition(source="guide", progress=False)]


def _reweighted_policies() -> list[pl.Callback]:
    from lightning_select import BatchComposition

    return [LossHistory(), BatchComposition(source="student", refresh_every_n_epochs=2, progress=False)]


def _check_cluster_ids(ids: Tensor) -> None:
    assert ids.shape == (DIGITS_TRAIN_SIZE,) and ids.dtype == torch.int64
    assert ids.unique().tolist() == list(range(COMPOSITION_CLUSTERS))  # k = 10, none empty
    first = [int((ids == c).nonzero()[0]) for c in range(COMPOSITION_CLUSTERS)]
    assert first == sorted(first)  # canonical: clusters numbered by their smallest member


def _clustered_check(state: dict[str, Tensor], epochs: int) -> None:
    from lightning_select.samplers import kmeans_cluster_ids

    _gist_check(state, epochs)
    ids = state["composition/sampler/structure/cluster_ids"]
    _check_cluster_ids(ids)
    guide, data = DigitsLDAGuide.fit(seed=0), DigitsPairsDataModule()
    data.setup("fit")
    with torch.no_grad():  # the guide's embeddings computed here, in the cache's batches of 256
        images = data.train_set.dataset.images
        embedded = torch.cat([guide(images[a:a + 256]) for a in range(0, len(images), 256)])
    assert torch.equal(ids, kmeans_cluster_ids(embedded, COMPOSITION_CLUSTERS, seed=0))


def _reweighted_check(state: dict[str, Tensor], epochs: int) -> None:
    import math

    ids, prefix = state["composition/sampler/structure/cluster_ids"], "composition/sampler/structure/"
    _check_cluster_ids(ids)
    losses, ema = state[prefix + "sample_losses"], state["history/ema_loss"]
    assert torch.equal(losses.nan_to_num(-1), ema.nan_to_num(-1))  # read from LossHistory at the last epoch end
    assert int(state["history/count"].sum()) == epochs * REWEIGHT_BUDGET_SIZE  # single process: 862 distinct per epoch
    sizes = torch.bincount(ids).double()
    mean = [losses[ids == c][~losses[ids == c].isnan()].double().mean() for c in range(COMPOSITION_CLUSTERS)]
    assert torch.allclose(state[prefix + "cluster_losses"], torch.stack(mean), rtol=1e-12)
    w = state[prefix + "weights"]
    assert abs(float(w.sum()) - 1) < 1e-12 and float(w.max()) <= 0.3 + 1e-12
    free = w < 0.3 - 1e-12  # uncapped clusters: w ∝ size · exp(L / T) with T = 0.05
    offset = (w[free] / sizes[free]).log() - torch.stack(mean)[free] / 0.05
    assert bool(free.any()) and float(offset.max() - offset.min()) < 1e-9 * max(1.0, math.fabs(float(offset[0])))


# ---------------------------------------------------------------------------- BatchComposition (neighbour exclusion)
# No two samples closer than cosine 0.99 in the digits LDA guide (50 pairs) share a batch. Every epoch has 6 batches
# (256 per step; DDP: 6 of 128 per rank) whatever the pairs, and at this threshold the fill places no sample next to
# a neighbour in epochs 0-3 (at 0.98, 450 pairs, epoch 2 leaves 4 of 1437 next to one: the sampler's `collisions`).
NEIGHBOUR_THRESHOLD, NEIGHBOUR_MAX = 0.99, 32


def neighbour_exclusion_task(batch_size: int = 256) -> tuple[pl.LightningModule, Any]:
    """:func:`digits_task` with batches that hold no pair of guide neighbours."""
    from lightning_select.samplers import NeighbourExclusionBatchSampler

    factory = functools.partial(NeighbourExclusionBatchSampler, threshold=NEIGHBOUR_THRESHOLD,
                                max_neighbours=NEIGHBOUR_MAX)
    return DigitsEmbeddingModule(hidden=32, dim=16), DigitsPairsDataModule(batch_size=batch_size, batch_sampler=factory)


def _neighbour_check(state: dict[str, Tensor], epochs: int) -> None:
    from lightning_select.samplers import neighbour_pairs

    _gist_check(state, epochs)
    pairs = state["composition/sampler/structure/pairs"]
    guide, data = DigitsLDAGuide.fit(seed=0), DigitsPairsDataModule()
    data.setup("fit")
    with torch.no_grad():  # the guide's embeddings computed here, in the cache's batches of 256
        images = data.train_set.dataset.images
        embedded = torch.cat([guide(images[a:a + 256]) for a in range(0, len(images), 256)])
    assert torch.equal(pairs, neighbour_pairs(embedded, NEIGHBOUR_THRESHOLD, NEIGHBOUR_MAX)) and pairs.shape[0] > 20
    # GIST (t = 1, margin 0.2) flags every in-batch pair above guide cosine 0.8, so a neighbour pair (> 0.99) that
    # shared a batch would be among the flagged pairs: none is.
    n = DIGITS_TRAIN_SIZE
    flagged = set((state["pairs/anchor_index"].long() * n + state["pairs/candidate_index"].long()).tolist())
    flagged |= set((state["pairs/candidate_index"].long() * n + state["pairs/anchor_index"].long()).tolist())
    assert flagged and flagged.isdisjoint((pairs[:, 0] * n + pairs[:, 1]).tolist())


REGISTRY: list[PolicyCase] = [
    PolicyCase(
        name="gist", selector="gist", make_policies=_gist_policies, make_task=digits_task, state=_gist_state,
        activity=lambda s: int(s["pairs/anchor_index"].numel()), metric="gist/masked_fraction_ap", check=_gist_check,
    ),
    PolicyCase(
        name="gist_attract", selector="gist_attract", make_policies=_gist_attract_policies, make_task=digits_task,
        state=_gist_state, activity=lambda s: int(s["pairs/anchor_index"].numel()),
        metric="gist/attracted_fraction_ap", check=_gist_check,
    ),
    PolicyCase(
        name="false_negative_audit", selector="false_negative_audit", make_policies=_audit_policies,
        make_task=digits_task, state=lambda p: {k: torch.as_tensor(v) for k, v in p[0].state_dict().items() if k != "blocks"},
        activity=lambda s: int(s["sums"][0, 1]),
        metric="fn_audit/ap_gold_fraction", check=_audit_check,
    ),
    PolicyCase(
        name="self_guide", selector="self_guide", make_policies=_self_guide_policies, make_task=digits_task,
        state=_gist_state, activity=lambda s: int(s["pairs/anchor_index"].numel()),
        metric="gist/masked_per_row", check=_flagged_pairs_check,
    ),
    PolicyCase(
        name="loss_history", selector="loss_history", make_policies=lambda: [LossHistory(trace_epochs=4)],
        make_task=digits_task, state=_history_state, activity=lambda s: int(s["count"].sum()),
        metric="history/coverage", check=_history_check,
    ),
    PolicyCase(
        name="importance_sampling", selector="importance_sampling", make_policies=_importance_policies,
        make_task=digits_task, state=_importance_state, activity=lambda s: int(s["tau"].numel()),
        metric="is/tau", check=_importance_check, hydra_kept_fraction=1 / 3,
    ),
    PolicyCase(
        name="selective_backprop", selector="selective_backprop",
        make_policies=lambda: _sb_policies(warmup_epochs=0, seed=3),  # the paper rule over all of training
        make_task=digits_task, state=_sb_state, activity=lambda s: int(s["selecting_steps"]),
        metric="sb/kept_fraction", check=_sb_check,
    ),
    PolicyCase(
        name="selective_backprop_stale", selector="selective_backprop_stale",
        make_policies=lambda: _sb_policies(stale_scores=True, seed=4),
        make_task=digits_task, state=_sb_state, activity=lambda s: int(s["selecting_steps"]),
        metric="sb/kept_fraction", check=_sb_stale_check,
    ),
    PolicyCase(
        name="uniform_subset", selector="uniform_subset",
        make_policies=_uniform_policies,
        make_task=digits_task, state=lambda p: {k: torch.tensor(v) for k, v in p[0].state_dict().items()},
        activity=lambda s: int(s["kept_rows"]), metric="uniform/kept_fraction", check=_uniform_check,
        hydra_kept_fraction=0.5,
    ),
    PolicyCase(
        name="rho_loss", selector="rho_loss", make_policies=_rho_policies, make_task=noisy_digits_task,
        state=lambda p: {k: torch.tensor(v) for k, v in p[0].state_dict().items()},
        activity=lambda s: int(s["kept_rows"]), metric="rho/kept_fraction", check=_rho_check,
        hydra_kept_fraction=0.1, hydra_metric="heldout/accuracy",
    ),
    PolicyCase(
        name="entropy_selection", selector="entropy_selection", make_policies=_eata_policies,
        make_task=noisy_digits_task, state=_eata_state, activity=lambda s: int(s["moving_average"].numel()),
        metric="eata/entropy_mean", check=_eata_check, hydra_metric="heldout/accuracy",
    ),
    PolicyCase(
        name="adaptive_batch_size", selector="adaptive_batch_size", make_policies=_abs_policies,
        make_task=digits_task, state=_abs_state, activity=lambda s: int(s["decisions"].shape[0]),
        metric="adaptive_batch_size/accumulation", check=_abs_check,
    ),
    PolicyCase(
        name="color_filter", selector="color_filter", make_policies=_color_policies, make_task=color_task,
        state=lambda p: {k: torch.as_tensor(v) for k, v in p[0].state_dict().items()},
        activity=lambda s: int(s["trained_rows"]), metric="color/kept_share", check=_color_check,
        hydra_metric="heldout/accuracy",
    ),
    PolicyCase(
        name="rs2", selector="rs2", make_policies=_rs2_policies, make_task=rs2_task,
        state=lambda p: flatten(p[0].store.state_dict()), activity=lambda s: int(s["count"].sum()),
        metric="history/coverage", check=_rs2_check,
        hydra_metric="heldout/accuracy",
    ),
    PolicyCase(
        name="hard_batches", selector="hard_batches", make_policies=_hard_policies, make_task=hard_batches_task,
        state=lambda p: flatten(p[0].state_dict()), activity=lambda s: int(torch.isfinite(s["sampler/losses"]).sum()),
        metric="hard_batches/batch_loss", check=_hard_check, hydra_metric="heldout/accuracy",
    ),
    PolicyCase(
        name="infobatch", selector="infobatch", make_policies=_infobatch_policies, make_task=infobatch_task,
        state=_infobatch_state, activity=lambda s: int(torch.isfinite(s["table/columns/score"]).sum()),
        metric="infobatch/kept_fraction", check=_infobatch_check, hydra_metric="heldout/accuracy",
    ),
    PolicyCase(
        name="focal", selector="focal", make_policies=_focal_policies, make_task=noisy_digits_task,
        state=_weighting_state, activity=lambda s: int(s["steps"]), metric="focal/weight_mean", check=_focal_check,
        hydra_metric="heldout/accuracy",
    ),
    PolicyCase(
        name="ohem", selector="ohem", make_policies=_ohem_policies, make_task=noisy_digits_task,
        state=_weighting_state, activity=lambda s: int(s["sums"][1]), metric="ohem/kept_fraction", check=_ohem_check,
    ),  # the Hydra file runs mode="weight" on the contrastive default: every loaded row stays in the step (weight 0/1)
    PolicyCase(
        name="loss_softmax", selector="loss_softmax", make_policies=_loss_softmax_policies, make_task=digits_task,
        state=_weighting_state, activity=lambda s: int(s["steps"]), metric="loss_softmax/max_mean_ratio",
        check=_loss_softmax_check,
    ),
    PolicyCase(
        name="hardness", selector="hardness", make_policies=_hardness_policies, make_task=digits_task,
        state=lambda p: {k: torch.as_tensor(v) for k, v in p[0].state_dict().items()},
        activity=lambda s: int(s["sums"][1]), metric="hardness/weighted_fraction", check=_hardness_check,
    ),
    PolicyCase(
        name="clustered_batches", selector="clustered_batches", make_policies=_clustered_policies,
        make_task=clustered_batches_task,
        state=lambda p: {**_gist_state(p), **flatten(p[-1].state_dict(), "composition")},
        activity=lambda s: int(s["composition/sampler/structure/cluster_ids"].unique().numel()),
        metric="batch_composition/purity", check=_clustered_check,
    ),
    PolicyCase(
        name="cluster_reweighted", selector="cluster_reweighted", make_policies=_reweighted_policies,
        make_task=cluster_reweighted_task,
        state=lambda p: {**flatten(p[0].store.state_dict(), "history"), **flatten(p[1].state_dict(), "composition")},
        activity=lambda s: int(s["composition/sampler/structure/sample_losses"].isfinite().sum()),
        metric="batch_composition/max_weight_share", check=_reweighted_check,
    ),
    PolicyCase(
        name="neighbour_exclusion", selector="neighbour_exclusion", make_policies=_clustered_policies,
        make_task=neighbour_exclusion_task,
        state=lambda p: {**_gist_state(p), **flatten(p[-1].state_dict(), "composition")},
        activity=lambda s: int(s["composition/sampler/structure/pairs"].shape[0]),
        metric="batch_composition/refresh_seconds", check=_neighbour_check,
    ),
    PolicyCase(  # tests/registry_dynamics.py
        name="training_dynamics", selector="training_dynamics", make_policies=dynamics_policies,
        make_task=noisy_digits_task, state=dynamics_state,
        activity=lambda s: int(s["store/table/columns/presentations"].sum()), metric="dynamics/confidence_mean",
        check=dynamics_check, hydra_metric="heldout/accuracy",
    ),
    PolicyCase(  # tests/registry_dynamics.py; warm-up 1 epoch: flags and weights active in every fit
        name="dbpm", selector="dbpm", make_policies=dbpm_policies, make_task=digits_task, state=dbpm_state,
        activity=dbpm_activity, metric="dbpm/history_coverage", check=dbpm_check,
    ),
    PolicyCase(  # tests/registry_dynamics.py; warm-up 1 epoch, then the 20% lowest AUMs are not trained
        name="dynamics_filter", selector="dynamics_filter", make_policies=filter_policies, make_task=noisy_digits_task,
        state=filter_state, activity=lambda s: int(s["flags"].sum()), metric="dynamics/confidence_mean",
        check=filter_check, hydra_metric="heldout/accuracy",
    ),
]
REGISTRY_BY_NAME = {case.name: case for case in REGISTRY}
