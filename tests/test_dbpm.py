"""DBPM: the flag rule and the bounded weight against numpy, the reference density's up-weighting, a fit replayed
step by step from an independent record of the losses, the export, and bad input."""

import json
import math

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_select import DBPM, SelectionError, SelectionPolicy
from lightning_select.data import DigitsPairsDataModule
from lightning_select.data.noisy_labels import NoisyDigitsDataModule
from lightning_select.models import DigitsEmbeddingModule
from lightning_select.models.classifier import NoisyLabelClassifier
from lightning_select.rules.dbpm import dbpm_flags, dbpm_weights, history_mean

FIT = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
           enable_model_summary=False, limit_val_batches=0)


def numpy_flags(m, beta_np, beta_fp):
    valid = np.isfinite(m)
    mu, sigma = m[valid].mean(), m[valid].std(ddof=0)
    flags = np.zeros(len(m), dtype=int)
    flags[valid & (m <= mu - beta_np * sigma)] = 1
    flags[valid & (m >= mu + beta_fp * sigma)] = 2
    return flags, mu, sigma


def test_flags_match_the_numpy_formula():
    rng = np.random.default_rng(0)
    m = np.concatenate([rng.normal(1.0, 0.2, 500), [0.1, 0.2, 2.5, 3.0], [np.nan] * 5])
    for beta_np, beta_fp in ((2.0, 3.0), (1.0, 1.5)):
        flags, mu, sigma = dbpm_flags(torch.tensor(m), beta_np, beta_fp)
        ref, ref_mu, ref_sigma = numpy_flags(m, beta_np, beta_fp)
        np.testing.assert_array_equal(flags.numpy(), ref)
        assert mu == pytest.approx(ref_mu, abs=1e-12) and sigma == pytest.approx(ref_sigma, abs=1e-12)
    assert set(flags[-9:-5].tolist()) == {1, 2} and flags[-5:].tolist() == [0] * 5


def test_flags_need_a_spread():
    flags, _, sigma = dbpm_flags(torch.tensor([1.0, 1.0, 1.0]))
    assert flags.tolist() == [0, 0, 0] and sigma == 0.0
    assert math.isnan(dbpm_flags(torch.tensor([1.0, float("nan")]))[1])
    with pytest.raises(ValueError, match="`beta_np` > 0"):
        dbpm_flags(torch.tensor([1.0, 2.0]), beta_np=0.0)


def test_the_reference_density_up_weights_below_sigma_0_4_and_ours_never_does():
    losses = torch.linspace(0.0, 6.0, 601)
    flagged = torch.ones_like(losses, dtype=torch.long)
    for sigma in (0.05, 0.1, 0.2, 0.3, 0.39, 0.5, 1.0, 2.0):
        mu = 3.0
        density = torch.exp(-(losses - mu) ** 2 / (2 * sigma ** 2)) / (sigma * math.sqrt(2 * math.pi))
        ours = dbpm_weights(losses, flagged, mu, sigma, min_weight=1e-3)
        assert float(ours.max()) <= 1.0 and float(ours.min()) >= 1e-3  # bounded in [min_weight, 1]
        assert float(ours.max()) == 1.0  # the kernel peaks at exactly 1 at ℓ = μ
        assert (float(density.max()) > 1.0) == (sigma < 1 / math.sqrt(2 * math.pi))  # the reference's bug
        kernel = torch.exp(-(losses.double() - mu) ** 2 / (2 * sigma ** 2)).clamp_min(1e-3).float()
        torch.testing.assert_close(ours, kernel)
    assert dbpm_weights(losses, torch.zeros_like(flagged), 3.0, 0.1).eq(1).all()  # unflagged rows: 1


def test_history_summary_matches_loops():
    rng = np.random.default_rng(1)
    history = {i: [(e, rng.uniform(0, 5)) for e in range(6) if rng.uniform() < 0.7] for i in range(30)}
    sums = {k: torch.zeros(30, dtype=torch.float64) for k in ("loss", "count", "weighted", "weights")}
    for i, rows in history.items():
        for e, loss in rows:
            sums["loss"][i] += loss
            sums["count"][i] += 1
            sums["weighted"][i] += (e + 1) * loss
            sums["weights"][i] += e + 1
    mean = history_mean(sums["loss"], sums["count"], sums["weighted"], sums["weights"], "mean")
    weighted = history_mean(sums["loss"], sums["count"], sums["weighted"], sums["weights"], "weighted")
    for i, rows in history.items():
        if not rows:
            assert math.isnan(mean[i]) and math.isnan(weighted[i])
            continue
        assert float(mean[i]) == pytest.approx(np.mean([l for _, l in rows]))
        assert float(weighted[i]) == pytest.approx(np.average([l for _, l in rows], weights=[e + 1 for e, _ in rows]))
    with pytest.raises(ValueError, match="'mean' or 'weighted'"):
        history_mean(sums["loss"], sums["count"], sums["weighted"], sums["weights"], "ema")


class StepRecord(SelectionPolicy):
    """Independent record of each step: epoch, the rows' sample indices, losses and final weights."""

    order = 950

    def __init__(self):
        self.steps = []

    def observe(self, ctx):
        self.steps.append((ctx.trainer.current_epoch, ctx.kept_indices.clone(), ctx.losses.detach().clone(),
                           ctx.sample_weights.clone()))


@pytest.mark.parametrize("history", ["mean", "weighted"])
def test_fit_weights_equal_a_replay_of_the_recorded_losses(history, tmp_path):
    pl.seed_everything(0)
    policy, record = DBPM(warmup_epochs=1, history=history, export_path=str(tmp_path / "dbpm.parquet")), StepRecord()
    pl.Trainer(max_epochs=3, callbacks=[policy, record], **FIT).fit(DigitsEmbeddingModule(hidden=32, dim=16),
                                                                    DigitsPairsDataModule(batch_size=256))
    n = 1437
    sums = np.zeros((4, n))  # Σℓ, n, Σ(e+1)ℓ, Σ(e+1)
    flags = None
    flagged_total = 0
    for epoch in range(3):
        if epoch >= 1:  # the flags of this epoch: the history of the epochs before
            m = np.where(sums[1] > 0, (sums[0] / np.maximum(sums[1], 1)) if history == "mean"
                         else sums[2] / np.maximum(sums[3], 1), np.nan)
            flags, mu, sigma = numpy_flags(m, 2.0, 3.0)
            flagged_total += int((flags > 0).sum())
        for e, idx, losses, weights in record.steps:
            if e != epoch:
                continue
            i, l = idx.numpy(), losses.double().numpy()
            if flags is None:
                assert bool((weights == 1).all())
            else:
                expected = np.where(flags[i] > 0, np.maximum(np.exp(-((l - mu) ** 2) / (2 * sigma ** 2)), 1e-3), 1.0)
                np.testing.assert_allclose(weights.numpy(), expected, rtol=1e-5, atol=1e-7)
            np.add.at(sums[0], i, l)
            np.add.at(sums[1], i, 1)
            np.add.at(sums[2], i, (epoch + 1) * l)
            np.add.at(sums[3], i, epoch + 1)
    assert flagged_total > 0 and float(record.steps[-1][3].min()) < 1  # the rule did weight pairs
    np.testing.assert_array_equal(policy.flags.numpy(), flags)
    # the export: the rule on the whole history, and the last weights
    table, meta = pd.read_parquet(tmp_path / "dbpm.parquet"), json.loads((tmp_path / "dbpm.json").read_text())
    m = sums[0] / sums[1] if history == "mean" else sums[2] / sums[3]
    final, mu, sigma = numpy_flags(m, 2.0, 3.0)
    np.testing.assert_allclose(table["mean_loss"].to_numpy(), m, rtol=1e-6)
    np.testing.assert_array_equal(table["flag"].to_numpy(), final)
    assert meta["mu"] == pytest.approx(mu, rel=1e-6) and meta["sigma"] == pytest.approx(sigma, rel=1e-6)
    assert meta["noisy"] == int((final == 1).sum()) and meta["faulty"] == int((final == 2).sum())
    assert meta["epochs"] == 3 and meta["warmup_epochs"] == 1 and meta["history"] == history
    w = table["weight"].to_numpy()
    assert ((w > 0) & (w <= 1)).all() and (table["presentations"] == 3).all()


@pytest.mark.parametrize("options, match", [
    (dict(warmup_epochs=0), "`warmup_epochs` >= 1"),
    (dict(beta_np=-1.0), "`beta_np` > 0"),
    (dict(beta_fp="3"), "`beta_fp` to be a real number"),
    (dict(history="ema"), "'mean'.*'weighted'.*got 'ema'"),
    (dict(min_weight=0.0), r"`min_weight` in \(0, 1\]"),
    (dict(min_weight=2.0), r"`min_weight` in \(0, 1\]"),
    (dict(export_path="dbpm.json"), "end in .parquet or .csv"),
])
def test_options_are_validated_with_their_name(options, match):
    with pytest.raises((ValueError, TypeError), match=match):
        DBPM(**options)


def test_a_classifier_is_refused_with_a_pointer_to_training_dynamics():
    with pytest.raises(SelectionError, match="not an EmbeddingOutput.*TrainingDynamics"):
        pl.Trainer(max_steps=1, callbacks=[DBPM()], **FIT).fit(NoisyLabelClassifier(arch="mlp", hidden=8),
                                                               NoisyDigitsDataModule(batch_size=32))


def test_resuming_a_memory_of_a_different_dataset_size(tmp_path):
    pl.seed_everything(0)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    pl.Trainer(max_epochs=1, callbacks=[DBPM(), ckpt], **{**FIT, "enable_checkpointing": True}).fit(
        DigitsEmbeddingModule(hidden=8, dim=4), DigitsPairsDataModule(batch_size=256))
    with pytest.raises(SelectionError, match="holds 1437 pairs but the training set has 1149"):
        pl.Trainer(max_epochs=2, callbacks=[DBPM(num_samples=1149)], **FIT).fit(
            DigitsEmbeddingModule(hidden=8, dim=4), DigitsPairsDataModule(batch_size=256),
            ckpt_path=tmp_path / "last.ckpt")
