"""InfoBatch (issue 9): the pruning rule against a per-sample loop, unbiasedness by Monte Carlo, unseen samples,
the anneal, the sampler (purity, DDP shards, epoch counts), the callback in a Trainer (weights, schedule, validation,
mid-epoch resume) and bad input."""

from __future__ import annotations

import math
import random

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from helpers import Recorder, SignalAt
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_select import InfoBatch, PreemptionCheckpoint, SelectionError, TrainingPreempted
from lightning_select.core.schedule import stepping_batches
from lightning_select.data.noisy_labels import NoisyDigitsDataModule
from lightning_select.models.classifier import NoisyLabelClassifier
from lightning_select.rules.infobatch import infobatch_plan, kept_well_learned
from lightning_select.samplers import InfoBatchSampler, ResumableDataLoader
from lightning_select.samplers.epoch import epoch_generator

N_TRAIN = 1149  # NoisyDigitsDataModule's default training split


def random_scores(n, seed, unseen=0.2):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(n, generator=g).pow(3) * 4  # skewed, like losses: many small, a few large
    scores[torch.rand(n, generator=g) < unseen] = float("nan")
    return scores


# ----------------------------------------------------------------------------------------------- the rule
def reference_plan(scores, prune, seed):
    """Per-sample loop: mean of the seen scores, the well-learned list in index order, k = round-half-up of
    (1 − r)·n_low (at least 1), the first k of a randperm(n_low) of that list kept with weight n_low / k."""
    values = scores.tolist()
    seen = [v for v in values if not math.isnan(v)]
    mean = sum(seen) / len(seen)
    low = [i for i, v in enumerate(values) if not math.isnan(v) and v < mean]
    k = max(1, int(math.floor((1 - prune) * len(low) + 0.5))) if low else 0
    chosen = {low[j] for j in torch.randperm(len(low), generator=torch.Generator().manual_seed(seed))[:k].tolist()}
    keep, weights = [], []
    for i, v in enumerate(values):
        if i in chosen:
            keep.append(True), weights.append(len(low) / k)
        elif i in low:
            keep.append(False), weights.append(0.0)
        else:  # above the mean, at the mean, or not seen yet
            keep.append(True), weights.append(1.0)
    return keep, weights, len(low), k


@pytest.mark.parametrize("n, prune, seed", [(50, 0.5, 0), (101, 0.3, 1), (7, 0.5, 2), (1000, 0.9, 3), (64, 0.0, 4)])
def test_rule_matches_a_per_sample_loop(n, prune, seed):
    scores = random_scores(n, seed)
    plan = infobatch_plan(scores, prune, torch.Generator().manual_seed(seed))
    keep, weights, n_low, k = reference_plan(scores, prune, seed)
    assert plan.keep.tolist() == keep
    assert plan.weights.tolist() == pytest.approx(weights, rel=1e-6)
    assert (plan.well_learned, plan.kept_well_learned, plan.kept) == (n_low, k, sum(keep))


def test_rule_ties_at_the_mean_are_not_well_learned():
    scores = torch.tensor([1.0, 1.0, 1.0, 1.0])  # every score equals the mean: nothing is below it
    plan = infobatch_plan(scores, 0.5, torch.Generator().manual_seed(0))
    assert plan.well_learned == 0 and bool(plan.keep.all()) and plan.weights.tolist() == [1.0] * 4


def test_kept_count_rounds_half_up_and_keeps_at_least_one():
    assert [kept_well_learned(n, 0.5) for n in (1, 2, 3, 4, 5)] == [1, 1, 2, 2, 3]  # round((1 − r)·n), ≥ 1
    assert kept_well_learned(10, 0.7) == 3 and kept_well_learned(10, 0.75) == 3 and kept_well_learned(10, 0.0) == 10


@pytest.mark.parametrize("n, prune", [(9, 0.5), (40, 0.7), (200, 0.5)])
def test_weighted_epoch_is_unbiased_monte_carlo(n, prune):
    """Over many plans (seeds), the mean of Σ_kept w·ℓ / N equals the full mean of ℓ; each well-learned sample
    is kept with probability k / n_low. n = 9 has 3 well-learned samples (k = 2 of 3 at r = 0.5): there the
    reference's floor(k) = 1 with weight 1/(1 − r) = 2 would give them 2/3 of their share."""
    scores = random_scores(n, seed=n, unseen=0.1)
    values = torch.rand(n, generator=torch.Generator().manual_seed(7)) * 3 + scores.nan_to_num(0.0)  # any ℓ
    full_mean = float(values.mean())
    trials = 6000
    estimates, kept_counts = torch.empty(trials, dtype=torch.float64), torch.zeros(n)
    for t in range(trials):
        plan = infobatch_plan(scores, prune, torch.Generator().manual_seed(t))
        estimates[t] = (plan.weights.double() * values.double()).sum() / n
        kept_counts += plan.keep.float()
    se = float(estimates.std()) / math.sqrt(trials)
    assert abs(float(estimates.mean()) - full_mean) < 4 * se + 1e-9, (float(estimates.mean()), full_mean, se)
    low_frequency = kept_counts[plan.weights > 1] / trials
    k_over_n = plan.kept_well_learned / plan.well_learned
    assert float((low_frequency - k_over_n).abs().max()) < 0.03
    # and the weights of a plan sum to N: the pruned epoch's weighted sum has the full epoch's scale
    assert float(plan.weights.sum()) == pytest.approx(n, rel=1e-6)


def test_count_normalised_steps_keep_the_epochs_sum():
    """The engine's count normalisation (``normalise_by_count``): a step loss is Σ_batch w·ℓ / B. Summed over the
    pruned epoch's steps it is Σ_kept w·ℓ / B, whose mean over plans is the full epoch's Σ ℓ / B."""
    n, b = 300, 32
    scores = random_scores(n, seed=11, unseen=0.0)
    values = scores + 0.5
    full_epoch = float(values.sum()) / b
    sums, first_steps = [], []
    for t in range(3000):
        s = InfoBatchSampler(n, prune=0.5, seed=t)
        s.set_scores(scores, epoch=1)
        s.set_epoch(1)
        order = torch.tensor(list(s))
        w = s.weights(order)
        steps = [float((w[i:i + b] * values[order[i:i + b]]).sum()) / b for i in range(0, len(order), b)]
        sums.append(sum(steps))
        first_steps.append(steps[0])
    sums, first_steps = torch.tensor(sums, dtype=torch.float64), torch.tensor(first_steps, dtype=torch.float64)
    assert abs(float(sums.mean()) - full_epoch) < 4 * float(sums.std()) / math.sqrt(len(sums)) + 1e-9
    m = len(order)  # the same for every plan (the fixed-size rule): fewer steps, each N / m times the full mean
    assert m < n and abs(float(first_steps.mean()) - n / m * float(values.mean())) < \
        4 * float(first_steps.std()) / math.sqrt(len(first_steps))


def test_unseen_samples_are_always_kept_and_left_out_of_the_mean():
    scores = torch.tensor([0.1, 0.2, float("nan"), 5.0, float("nan"), 0.3])
    for seed in range(20):
        plan = infobatch_plan(scores, 0.9, torch.Generator().manual_seed(seed))
        assert bool(plan.keep[2]) and bool(plan.keep[4]) and plan.weights[[2, 4]].tolist() == [1.0, 1.0]
        assert plan.threshold == pytest.approx((0.1 + 0.2 + 5.0 + 0.3) / 4)
        assert plan.well_learned == 3 and plan.kept_well_learned == 1
    nothing_seen = InfoBatchSampler(5, prune=0.5, seed=0)
    nothing_seen.set_scores(torch.full((5,), float("nan")), epoch=3)
    nothing_seen.set_epoch(3)
    assert sorted(nothing_seen) == list(range(5)) and nothing_seen.weights(torch.arange(5)).tolist() == [1.0] * 5


# ----------------------------------------------------------------------------------------------- the sampler
def test_anneal_epochs_train_everything_with_weight_one():
    s = InfoBatchSampler(200, prune=0.5, delta=0.7, num_epochs=6, seed=0)  # δ·E = 4.2: epochs 0-4 prune, 5 anneals
    assert s.pruning_epochs == 5 and [s.is_pruning(e) for e in range(6)] == [True] * 5 + [False]
    scores = random_scores(200, seed=1, unseen=0.0)
    for epoch in (4, 5):
        s.set_scores(scores, epoch)
        s.set_epoch(epoch)
        weights = s.weights(torch.arange(200))
        if epoch == 4:
            assert len(s) < 200 and float(weights.max()) == pytest.approx(2.0, rel=0.02)
        else:  # whatever the previous epoch's weights: reset (the reference keeps them when δ·E is not whole)
            assert sorted(s) == list(range(200)) and weights.tolist() == [1.0] * 200 and s.samples_in_epoch(5) == 200
    assert InfoBatchSampler(10, delta=0.875, num_epochs=200).pruning_epochs == 175  # the last 25 of 200 anneal
    assert InfoBatchSampler(10, delta=1.0, num_epochs=4).pruning_epochs == 4
    assert InfoBatchSampler(10, num_epochs=None).is_pruning(10**6)  # no max_epochs: no anneal


def test_plan_is_a_pure_function_of_seed_epoch_and_scores():
    scores = random_scores(300, seed=5)
    a, b = InfoBatchSampler(300, seed=3), InfoBatchSampler(300, seed=3)
    a.set_scores(scores, 2)
    torch.manual_seed(123), np.random.seed(4), random.seed(5)  # no global RNG is read
    b.set_scores(scores.clone(), 2)
    assert a.indices(2) == b.indices(2) and torch.equal(a.plan(2).weights, b.plan(2).weights)
    g = epoch_generator(3, 2)  # the choice, then the order, both from epoch_generator(seed, epoch)
    plan = infobatch_plan(scores, 0.5, g)
    kept = plan.keep.nonzero().flatten()
    assert a.indices(2) == kept[torch.randperm(kept.numel(), generator=g)].tolist()
    assert a.indices(3) != a.indices(2) and InfoBatchSampler(300, seed=4).indices(2) != a.indices(2)
    fresh = InfoBatchSampler(300, seed=3)  # a resumed run: the state's scores give the same plan
    fresh.load_state_dict(a.state_dict())
    assert fresh.scores_epoch == 2 and fresh.indices(2) == a.indices(2) and fresh.kept_sizes == a.kept_sizes


def test_epoch_counts_are_exact_once_planned_and_estimated_before():
    s = InfoBatchSampler(400, prune=0.5, delta=0.75, num_epochs=4, seed=0)
    assert [s.samples_in_epoch(e) for e in range(4)] == [400] * 4  # no scores: every epoch full
    s.set_scores(torch.full((400,), float("nan")), 0)
    assert len(s.indices(0)) == 400 and s.is_exact(0)  # epoch 0, as the callback hands it over: nothing seen
    scores = random_scores(400, seed=9, unseen=0.0)
    s.set_scores(scores, 1)
    s.plan(1)
    m1 = len(s.indices(1))
    assert m1 < 400 and s.is_exact(1) and not s.is_exact(2) and s.is_exact(3)
    assert [s.samples_in_epoch(e) for e in range(4)] == [400, m1, m1, 400]  # epoch 2: the estimate from epoch-1 scores
    s.set_scores(scores * torch.linspace(0.5, 1.5, 400), 2)
    m2 = len(s.indices(2))
    assert [s.samples_in_epoch(e) for e in range(4)] == [400, m1, m2, 400] and s.is_exact(2)


def test_ddp_shards_are_equal_and_cover_the_plan():
    scores = random_scores(301, seed=2, unseen=0.0)
    ranks = [InfoBatchSampler(301, seed=0, num_replicas=3, rank=r) for r in range(3)]
    for s in ranks:
        s.set_scores(scores, 1)
        s.set_epoch(1)
    plan = ranks[0].indices(1)
    shares = [list(s) for s in ranks]
    assert len({len(x) for x in shares}) == 1 and len(shares[0]) == math.ceil(len(plan) / 3) == len(ranks[0])
    assert set().union(*map(set, shares)) == set(plan)
    assert [x[i] for i in range(len(shares[0])) for x in shares][:len(plan)] == plan  # positions r::W
    assert ranks[1].samples_in_epoch(1) == len(ranks[1]) == math.ceil(ranks[1].kept_sizes[1] / 3)


def test_datamodule_builds_the_sampler_for_the_trainer():
    from types import SimpleNamespace

    data = NoisyDigitsDataModule(batch_size=32, sampler="infobatch", infobatch_prune=0.3, infobatch_delta=0.5)
    data.setup()
    data.trainer = SimpleNamespace(world_size=2, global_rank=1, max_epochs=10)
    loader = data.train_dataloader()
    sampler = loader.sampler
    assert isinstance(loader, ResumableDataLoader) and isinstance(sampler, InfoBatchSampler)
    assert (sampler.prune, sampler.delta, sampler.num_epochs, sampler.num_replicas, sampler.rank) == (0.3, 0.5, 10, 2, 1)
    assert len(sampler) == math.ceil(N_TRAIN / 2)


# ----------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("prune", [-0.1, 1.0, 1.5, True, "0.5"])
def test_bad_prune_names_the_option_and_the_fix(prune):
    with pytest.raises(ValueError, match=r"`prune`.*\[0, 1\).*0\.5"):
        InfoBatchSampler(10, prune=prune)
    with pytest.raises(ValueError, match=r"`infobatch_prune`.*\[0, 1\)"):
        NoisyDigitsDataModule(sampler="infobatch", infobatch_prune=prune)


@pytest.mark.parametrize("delta", [0, -0.5, 1.01, None])
def test_bad_delta_names_the_option_and_the_fix(delta):
    with pytest.raises(ValueError, match=r"`delta`.*\(0, 1\].*0\.875"):
        InfoBatchSampler(10, delta=delta)
    with pytest.raises(ValueError, match=r"`infobatch_delta`.*\(0, 1\]"):
        NoisyDigitsDataModule(sampler="infobatch", infobatch_delta=delta)


def test_bad_sampler_arguments():
    with pytest.raises(ValueError, match="num_epochs.*trainer.max_epochs"):
        InfoBatchSampler(10, num_epochs=0)
    with pytest.raises(ValueError, match="expected 10 scores"):
        InfoBatchSampler(10).set_scores(torch.zeros(9), 0)
    with pytest.raises(ValueError, match="other|same data, prune"):
        InfoBatchSampler(10, prune=0.3).load_state_dict(InfoBatchSampler(10, prune=0.5).state_dict())
    with pytest.raises(TypeError, match="resize_schedule"):
        InfoBatch(resize_schedule="yes")


def _trainer(tmp_path, callbacks, **kwargs):
    base = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False,
            "enable_progress_bar": False, "enable_model_summary": False, "limit_val_batches": 0,
            "default_root_dir": tmp_path}
    return pl.Trainer(callbacks=callbacks, **{**base, **kwargs})


def test_callback_refuses_a_loader_without_the_sampler(tmp_path):
    with pytest.raises(SelectionError, match="InfoBatchSampler.*NoisyDigitsDataModule\\(sampler='infobatch'\\)"):
        _trainer(tmp_path, [InfoBatch()], max_epochs=1).fit(NoisyLabelClassifier(arch="mlp", hidden=16),
                                                           NoisyDigitsDataModule(batch_size=256))


def test_callback_refuses_a_sampler_built_for_other_epochs(tmp_path):
    class OtherEpochs(NoisyDigitsDataModule):
        def train_dataloader(self):
            return ResumableDataLoader(self.train_set, batch_size=256, sampler=InfoBatchSampler(N_TRAIN, num_epochs=9))

    with pytest.raises(SelectionError, match="num_epochs=9.*max_epochs=2.*num_epochs=trainer.max_epochs"):
        _trainer(tmp_path, [InfoBatch()], max_epochs=2).fit(NoisyLabelClassifier(arch="mlp", hidden=16), OtherEpochs())


# ----------------------------------------------------------------------------------------------- in a Trainer
def _fit(tmp_path, epochs=4, batch_size=128, delta=0.75, model=None, callbacks=(), **kwargs):
    pl.seed_everything(0)
    policy, recorder = InfoBatch(), Recorder()
    model = model or NoisyLabelClassifier(arch="mlp", hidden=32, cosine_schedule=True)
    trainer = _trainer(tmp_path, [policy, recorder, *callbacks], max_epochs=epochs, **kwargs)
    trainer.fit(model, NoisyDigitsDataModule(batch_size=batch_size, sampler="infobatch", infobatch_delta=delta))
    return trainer, policy, recorder.records


def _epochs_of(records, sizes, batch_size):
    out, start = [], 0
    for m in sizes:
        steps = math.ceil(m / batch_size)
        out.append(records[start:start + steps])
        start += steps
    assert start == len(records)
    return out


def test_trainer_prunes_weights_and_anneals(tmp_path):
    """δ = 0.7, 6 epochs (δ·E = 4.2, not whole): epoch 0 full (no scores), 1-4 pruned with weights n_low / k on the
    kept well-learned samples, epoch 5 full with weight 1; the scores are the training losses."""
    trainer, policy, records = _fit(tmp_path, epochs=6, batch_size=256, delta=0.7)
    sampler = policy.sampler
    sizes = [sampler.kept_sizes[e] for e in range(6)]
    assert sizes[0] == sizes[5] == N_TRAIN and all(m < N_TRAIN for m in sizes[1:5])
    epochs = _epochs_of(records, sizes, 256)
    for epoch, steps in enumerate(epochs):
        indices = torch.cat([r["indices"] for r in steps])
        weights = torch.cat([r["weights"] for r in steps])
        assert len(indices) == sizes[epoch] == len(set(indices.tolist()))  # each kept sample once
        if epoch in (0, 5):
            assert sorted(indices.tolist()) == list(range(N_TRAIN)) and bool((weights == 1).all())
        else:
            up = weights[weights > 1]
            assert 0 < up.numel() < len(weights) and float(up.min()) == float(up.max())  # one weight: n_low / k
            assert float(up[0]) == pytest.approx(2.0, rel=0.01) and bool((weights >= 1).all())
    last = records[-1]
    assert torch.equal(policy.scores[last["indices"]], last["losses"])  # the most recent training loss
    assert trainer.global_step == sum(math.ceil(m / 256) for m in sizes) < 6 * math.ceil(N_TRAIN / 256)


def test_cosine_schedule_ends_at_zero_on_the_last_step(tmp_path):
    trainer, policy, records = _fit(tmp_path, epochs=5, batch_size=64, delta=0.8)
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    full = 5 * math.ceil(N_TRAIN / 64)
    assert trainer.estimated_stepping_batches == full  # Lightning sizes every epoch like epoch 0
    assert trainer.global_step == len(records) == stepping_batches(trainer) == scheduler.T_max < full
    assert scheduler.last_epoch == scheduler.T_max and trainer.optimizers[0].param_groups[0]["lr"] == 0.0
    assert policy.state_dict()["planned_steps"] == trainer.global_step


def test_onecycle_cannot_be_resized_and_warns(tmp_path):
    class OneCycle(NoisyLabelClassifier):
        def configure_optimizers(self):
            optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
            scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, 0.1, total_steps=int(stepping_batches(self.trainer)))
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    with pytest.warns(UserWarning, match="OneCycleLR.*Only CosineAnnealingLR can be re-sized"):
        _fit(tmp_path, epochs=3, batch_size=256, delta=1.0, model=OneCycle(arch="mlp", hidden=16))


def test_every_epoch_validates(tmp_path):
    validated = []
    seen = pl.callbacks.LambdaCallback(on_validation_end=lambda trainer, _: validated.append(trainer.current_epoch))
    _fit(tmp_path, epochs=3, batch_size=64, delta=1.0, callbacks=[seen], limit_val_batches=1, num_sanity_val_steps=0)
    assert validated == [0, 1, 2]  # Lightning alone: [0] (epochs 1 and 2 never reach epoch 0's 18 batches)


def test_mid_epoch_resume_is_exact(tmp_path):
    """A SIGTERM in the middle of the first pruned epoch (batch 128: 9 steps in epoch 0, then ~7 per pruned epoch),
    then a resume: the remaining steps train the same samples with the same weights and losses, the cosine schedule
    (re-sized on the way) ends at 0 on the same last step, and the state and parameters are identical."""

    def run(name, ckpt_path=None, signal_at=None):
        pl.seed_everything(0)
        policy, recorder = InfoBatch(), Recorder()
        callbacks = [policy, recorder, PreemptionCheckpoint(),
                     ModelCheckpoint(dirpath=tmp_path / name, save_last=True, save_top_k=0)]
        if signal_at is not None:
            callbacks.append(SignalAt(signal_at))
        model = NoisyLabelClassifier(arch="mlp", hidden=32, cosine_schedule=True)
        trainer = _trainer(tmp_path, callbacks, max_epochs=4, enable_checkpointing=True)
        trainer.fit(model, NoisyDigitsDataModule(batch_size=128, sampler="infobatch", infobatch_delta=0.75),
                    ckpt_path=ckpt_path)
        return trainer, model, policy, recorder.records

    full_trainer, full_model, full, full_steps = run("full")
    with pytest.raises(TrainingPreempted):
        run("killed", signal_at=11)
    last = tmp_path / "killed" / "last.ckpt"
    saved = torch.load(last, weights_only=False)
    assert saved["global_step"] == 12 and saved["epoch"] == 1  # inside epoch 1, a pruned one
    trainer, model, resumed, steps = run("resumed", ckpt_path=last)
    assert len(steps) == len(full_steps) - 12 > 0
    for a, b in zip(full_steps[12:], steps):
        for key in ("indices", "weights", "losses"):
            assert torch.equal(a[key], b[key]), key
    assert any(float(r["weights"].max()) > 1 for r in steps[:3])  # the resumed part of epoch 1 is weighted
    for p, q in zip(full_model.parameters(), model.parameters()):
        assert torch.equal(p, q)
    a, b = full.state_dict(), resumed.state_dict()
    assert a["planned_steps"] == b["planned_steps"] == trainer.global_step == full_trainer.global_step
    assert torch.equal(a["table"]["columns"]["score"], b["table"]["columns"]["score"])
    for key in ("scores", "kept_sizes"):
        assert torch.equal(a["sampler"][key].nan_to_num(-7), b["sampler"][key].nan_to_num(-7)), key
    assert trainer.optimizers[0].param_groups[0]["lr"] == 0.0 == full_trainer.optimizers[0].param_groups[0]["lr"]
