"""ImportanceSampling: the rule against independent formulas, unbiasedness by Monte Carlo, the gradient
through a real Trainer against a hand-computed weighted mean, the switch-on rule and bad input."""

import copy
import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from helpers import GradCapture, PerSampleRegressor, Recorder, regression_loader

from lightning_select import ImportanceSampling, SelectionError
from lightning_select.core.context import StepContext
from lightning_select.rules.importance import (
    gradient_norm_bound,
    importance_resample,
    sampling_probabilities,
    variance_reduction,
)


def test_gradient_norm_bound_is_the_norm_of_the_logit_gradient():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 5, generator=g, requires_grad=True)
    y = torch.randint(0, 5, (16,), generator=g)
    per_sample = F.cross_entropy(logits, y, reduction="none")
    grads = torch.stack([torch.autograd.grad(per_sample[i], logits, retain_graph=True)[0][i] for i in range(16)])
    assert torch.allclose(gradient_norm_bound(logits, y), grads.norm(dim=1), atol=1e-6)


def test_importance_weights_give_an_unbiased_mean_and_replacement_draws():
    g = torch.Generator().manual_seed(1)
    losses = torch.rand(12, generator=g) * 3
    scores = losses + 0.1
    estimates, repeats = [], 0
    for seed in range(4000):
        positions, weights = importance_resample(scores, 4, torch.Generator().manual_seed(seed))
        estimates.append(float((weights * losses[positions]).mean()))
        repeats += int(positions.unique().numel() < 4)
    mean = sum(estimates) / len(estimates)
    stderr = (sum((e - mean) ** 2 for e in estimates) / len(estimates)) ** 0.5 / len(estimates) ** 0.5
    assert abs(mean - float(losses.mean())) < 4 * stderr  # unbiased for the loaded batch's mean
    assert repeats > 0  # with replacement


def test_variance_reduction_and_probabilities():
    assert float(variance_reduction(torch.full((8,), 1 / 8))) == pytest.approx(1.0)
    one_hot = torch.zeros(8)
    one_hot[3] = 1.0
    assert float(variance_reduction(one_hot)) == pytest.approx(math.sqrt(8), rel=1e-5)
    assert torch.equal(sampling_probabilities(torch.zeros(4)), torch.full((4,), 0.25))
    with pytest.raises(ValueError, match="non-negative"):
        sampling_probabilities(torch.tensor([1.0, -1.0]))


def test_trainer_gradient_equals_the_count_normalised_importance_weighted_mean(trainer_kwargs):
    model = PerSampleRegressor()
    reference = copy.deepcopy(model)
    grads, rec = GradCapture(), Recorder()
    policy = ImportanceSampling(keep=0.5, score="loss", always_on=True, seed=3)
    pl.Trainer(callbacks=[policy, rec, grads], max_steps=1, **trainer_kwargs).fit(model, regression_loader(n=64, batch_size=16))
    batch = next(iter(regression_loader(n=64, batch_size=16)))
    with torch.no_grad():
        scores = reference.per_sample_loss(batch)
    trainer_like = type("T", (), {"current_epoch": 0, "global_rank": 0})()
    ctx = StepContext(trainer_like, None, batch, 0, batch["index"], 16, torch.arange(16))
    positions, weights = importance_resample(scores, 8, ctx.generator(3))
    assert rec.records[0]["indices"].tolist() == batch["index"][positions].tolist()
    loss = (weights * reference.per_sample_loss({k: v[positions] for k, v in batch.items()})).sum() / 8
    expected = torch.autograd.grad(loss, list(reference.parameters()))
    for got, exp in zip(grads.grads[0], expected):
        assert torch.allclose(got, exp, atol=1e-6)


def test_switch_on_rule_waits_for_enough_variance_reduction(trainer_kwargs):
    class Flat(PerSampleRegressor):  # identical losses: tau = 1, never worth the cost
        def training_step(self, batch, batch_idx):
            return super().training_step(batch, batch_idx) * 0 + 1.0

    flat = ImportanceSampling(keep=0.25, score="loss")
    pl.Trainer(callbacks=[flat], max_steps=3, **trainer_kwargs).fit(Flat(), regression_loader(n=64, batch_size=16))
    assert flat.tau == pytest.approx(1.0)
    peaked = ImportanceSampling(keep=0.25, score="loss", tau_threshold=1.01)
    pl.Trainer(callbacks=[peaked], max_steps=3, **trainer_kwargs).fit(PerSampleRegressor(), regression_loader(n=64, batch_size=16))
    assert peaked.tau > 1.01 and peaked.state_dict() == {"tau": peaked.tau}


def test_bad_options_and_missing_logits(trainer_kwargs):
    for kwargs, match in [({"keep": 0.0}, r"`keep` in \(0, 1\]"), ({"keep": 1.5}, r"`keep` in \(0, 1\]"),
                          ({"score": "norm"}, "'gradient_norm' or 'loss'"), ({"tau_ema": 1.0}, "tau_ema")]:
        with pytest.raises(ValueError, match=match):
            ImportanceSampling(**kwargs)
    with pytest.raises(TypeError, match="`keep` to be a real number"):
        ImportanceSampling(keep="half")
    with pytest.raises(SelectionError, match="'logits'"):
        pl.Trainer(callbacks=[ImportanceSampling()], max_steps=1, **trainer_kwargs).fit(
            PerSampleRegressor(), regression_loader())


def test_two_policies_that_load_a_larger_batch_are_refused(trainer_kwargs, tmp_path):
    from lightning_select import ReducibleLossSelection

    policies = [ImportanceSampling(score="loss"), ReducibleLossSelection(str(tmp_path / "il.pt"))]
    trainer = pl.Trainer(callbacks=policies, max_steps=1, **trainer_kwargs)
    with pytest.raises(SelectionError, match="ImportanceSampling and ReducibleLossSelection each train a fraction"):
        trainer.fit(PerSampleRegressor(), regression_loader())
    assert policies[0].tau is None  # refused at setup: nothing ran
