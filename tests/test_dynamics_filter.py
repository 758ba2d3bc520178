"""DynamicsFilter: the flags are the most suspicious samples of the statistics at each epoch start (numpy ranking),
flagged rows are dropped or down-weighted, and bad options are refused by name."""

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from lightning_select import DynamicsFilter, SelectionPolicy
from lightning_select.data.noisy_labels import NoisyDigitsDataModule
from lightning_select.models.classifier import NoisyLabelClassifier
from lightning_select.policies.dynamics_filter import most_suspicious

FIT = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
           enable_model_summary=False, limit_val_batches=0)


def test_most_suspicious_matches_a_numpy_ranking_with_ties_and_unseen():
    rng = np.random.default_rng(0)
    values = np.round(rng.normal(size=200), 1)
    values[rng.uniform(size=200) < 0.1] = np.nan
    values[:5] = np.inf
    for direction in (1, -1):
        seen = ~np.isnan(values)
        k = round(0.3 * seen.sum())
        key = np.where(seen, direction * values, -np.inf)
        order = sorted(range(200), key=lambda i: (-key[i], i))  # most suspicious first, ties by index
        expected = np.zeros(200, dtype=bool)
        expected[order[:k]] = True
        np.testing.assert_array_equal(most_suspicious(torch.tensor(values), direction, 0.3).numpy(), expected)


class EpochStart(SelectionPolicy):
    """Snapshot, at each epoch start (after the filter's), the filter's statistics and flags; and each step's rows."""

    def __init__(self, policy):
        self.policy, self.snapshots, self.steps = policy, [], []

    def on_train_epoch_start(self, trainer, pl_module):
        if self.policy.flags is not None:
            self.snapshots.append((trainer.current_epoch, self.policy.statistics(), self.policy.flags.clone()))

    def observe(self, ctx):
        self.steps.append((ctx.trainer.current_epoch, ctx.kept_indices.clone(), ctx.sample_weights.clone()))


@pytest.mark.parametrize("statistic, mode", [("aum", "select"), ("forgetting_events", "weight")])
def test_flags_rank_the_epoch_start_statistics_and_are_applied(statistic, mode):
    pl.seed_everything(0)
    policy = DynamicsFilter(statistic=statistic, fraction=0.25, warmup_epochs=2, mode=mode, flagged_weight=0.1)
    probe = EpochStart(policy)
    pl.Trainer(max_epochs=4, callbacks=[policy, probe], **FIT).fit(NoisyLabelClassifier(arch="mlp", hidden=32),
                                                                   NoisyDigitsDataModule(batch_size=128))
    assert [e for e, _, _ in probe.snapshots] == [2, 3]
    direction = 1 if statistic == "forgetting_events" else -1
    for epoch, stats, flags in probe.snapshots:
        values = stats[statistic].numpy()
        key = direction * values
        order = sorted(range(len(values)), key=lambda i: (-key[i], i))
        expected = np.zeros(len(values), dtype=bool)
        expected[order[: round(0.25 * len(values))]] = True
        np.testing.assert_array_equal(flags.numpy(), expected)
        rows = [(idx, w) for e, idx, w in probe.steps if e == epoch]
        trained = torch.cat([idx for idx, _ in rows])
        weights = torch.cat([w for _, w in rows])
        if mode == "select":
            assert not bool(flags[trained].any()) and trained.numel() == int((~flags).sum())
        else:
            assert trained.numel() == len(values)
            torch.testing.assert_close(weights, torch.where(flags[trained], 0.1, 1.0))
    assert [entry["epoch"] for entry in policy.flag_log] == [2, 3] and "flagged_noisy" in policy.flag_log[0]


@pytest.mark.parametrize("options, match", [
    (dict(statistic="loss"), "`statistic` in"),
    (dict(fraction=1.0), r"`fraction` in \(0, 1\)"),
    (dict(warmup_epochs=0), "`warmup_epochs` >= 1"),
    (dict(mode="drop"), "'select'.*'weight'.*got 'drop'"),
    (dict(flagged_weight=1.0), r"`flagged_weight` in \[0, 1\)"),
    (dict(trace_epochs=-1), "`trace_epochs` >= 0"),
])
def test_options_are_validated_with_their_name(options, match):
    with pytest.raises((ValueError, TypeError), match=match):
        DynamicsFilter(**options)
