"""AdaptiveBatchSize (AdAdaGrad): the gradient-noise rule against direct formulas, and the callback in a real Trainer."""

import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import GradientAccumulationScheduler
from torch import nn

from helpers import ScalarRegression as Regression, noisy_regression_loader as regression_data

from lightning_select.policies import AdaptiveBatchSize
from lightning_select.rules.gradient_noise import gradient_noise_statistics, required_micro_batches


# ----------------------------------------------------------------------------------------------- rule
def _sums(h, g):
    a, c, g2 = h.pow(2).sum(1), h @ g, g.pow(2).sum()
    return a.sum(), c.sum(), g2, (c - g2).pow(2).sum(), (a - c.pow(2) / g2).sum()


def test_statistics_equal_the_reference_variances_when_every_micro_batch_is_seen():
    torch.manual_seed(0)
    h = torch.randn(6, 5) + torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0])
    g = h.mean(0)
    sa, sc, g2, sip, sorth = _sums(h, g)
    n = torch.tensor(6.0)
    stats = gradient_noise_statistics(sa, sc, n, g2, n, sip, sorth)
    # AdAdaGrad's definitions: the summed per-coordinate variance, the variance of ⟨h, ḡ⟩, the summed
    # variance of the part of h orthogonal to ḡ, each with correction 1, divided by N and the ‖ḡ‖ powers
    variance = torch.var(h, dim=0, correction=1).sum()
    ortho = h - torch.outer(h @ g, g) / g2
    assert torch.allclose(stats["variance"], variance)
    assert torch.allclose(stats["norm"], variance / (6 * g2))
    assert torch.allclose(stats["inner_product"], torch.var(h @ g, correction=1) / (6 * g2 ** 2))
    assert torch.allclose(stats["orthogonality"], torch.var(ortho, dim=0, correction=1).sum() / (6 * g2))


def test_variance_from_a_subset_of_the_micro_batches_is_unbiased():
    """Under DDP only M < N of the micro-batch gradients are seen; ḡ is the mean of all N. Monte Carlo."""
    gen = torch.Generator().manual_seed(1)
    scale = torch.tensor([1.0, 2.0, 0.5])  # per-coordinate std: the true trace of the covariance is 5.25
    trials, n, m = 20000, 4, 2
    h = torch.randn(trials, n, 3, generator=gen) * scale + 1.0
    g = h.mean(1)
    seen = h[:, :m]
    stats = gradient_noise_statistics(seen.pow(2).sum((1, 2)), (seen * g[:, None]).sum((1, 2)),
                                      torch.full((trials,), float(m)), g.pow(2).sum(1), torch.full((trials,), float(n)))
    assert abs(float(stats["variance"].mean()) - 5.25) < 0.1  # the plain (M − 1) estimator would be biased here


def test_statistics_are_nan_without_evidence():
    one = torch.tensor(1.0)
    assert math.isnan(float(gradient_noise_statistics(one, one, torch.tensor(0.0), one, torch.tensor(4.0))["norm"]))
    assert math.isnan(float(gradient_noise_statistics(one, one, torch.tensor(2.0), torch.tensor(0.0), one * 4)["norm"]))
    inf = torch.tensor(float("inf"))
    assert math.isnan(float(gradient_noise_statistics(inf, one, torch.tensor(2.0), one, one * 4)["norm"]))


def test_required_micro_batches_makes_the_statistic_meet_the_threshold():
    stat, n = torch.tensor(0.3), torch.tensor(4.0)
    needed = required_micro_batches(stat, 0.5, n)
    assert float(stat * n / needed) <= 0.25 < float(stat * n / (needed - 1))


# ----------------------------------------------------------------------------------------------- callback
def fit(policy, model, loader, epochs=1, **kw):
    trainer = pl.Trainer(accelerator="cpu", max_epochs=epochs, callbacks=[policy], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, **kw)
    trainer.fit(model, loader)
    return trainer


def test_first_step_statistics_match_hand_computed_micro_batch_gradients():
    torch.manual_seed(0)
    model = Regression()
    start = [p.detach().clone() for p in model.parameters()]
    loader = regression_data()
    policy = AdaptiveBatchSize(test="augmented_inner_product", initial_accumulation=4, check_every=1000)
    fit(policy, model, loader, max_steps=1)

    probe = Regression()  # the same parameters, gradients of each micro-batch's mean loss by hand
    with torch.no_grad():
        for p, q in zip(probe.parameters(), start):
            p.copy_(q)
    grads = []
    for i, (x, y) in enumerate(loader):
        if i == 4:
            break
        probe.zero_grad()
        nn.functional.mse_loss(probe.net(x).squeeze(-1), y).backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in probe.parameters()]))
    h = torch.stack(grads)
    g = h.mean(0)
    sa, sc, g2, sip, sorth = _sums(h, g)
    row = policy.window[0]
    expected = torch.stack([sa, sc, torch.tensor(4.0), sip, sorth, g2, torch.tensor(4.0)])
    assert torch.allclose(row, expected, rtol=1e-4, atol=1e-6), (row, expected)


def test_noisy_gradients_grow_the_accumulation_in_whole_steps_up_to_the_cap():
    torch.manual_seed(0)
    model = Regression()
    policy = AdaptiveBatchSize(eta=0.05, initial_accumulation=2, max_accumulation=8, check_every=2)
    trainer = fit(policy, model, regression_data(n=256, noise=3.0), epochs=3)
    assert policy.accumulation == 8 and trainer.accumulate_grad_batches == 8
    grown = [d["accumulation"] for d in policy.decisions]
    assert grown == sorted(grown) and grown[0] > 2
    # every optimizer step ran a whole number of micro-batches of the accumulation in force
    batches_per_epoch = 32
    assert sum(model.steps_seen) <= 3 * batches_per_epoch
    assert set(model.steps_seen) <= {2, 4, 8}


def test_clean_gradients_keep_the_initial_accumulation():
    torch.manual_seed(0)
    policy = AdaptiveBatchSize(eta=5.0, initial_accumulation=2, check_every=2)
    fit(policy, Regression(), regression_data(noise=0.0), epochs=1)
    assert policy.accumulation == 2 and policy.pending is None
    assert policy.decisions and all(d["accumulation"] == 2 for d in policy.decisions)
    assert all(d["norm"] < 25 for d in policy.decisions)


@pytest.mark.parametrize("schedule", ["samples", "steps"])
def test_learning_rate_schedule_ends_with_training_only_in_samples_mode(schedule):
    torch.manual_seed(0)
    model = Regression(schedule=True)
    policy = AdaptiveBatchSize(eta=0.05, initial_accumulation=2, max_accumulation=8, check_every=1, schedule=schedule)
    trainer = fit(policy, model, regression_data(n=256, noise=3.0), epochs=2)
    lr = trainer.optimizers[0].param_groups[0]["lr"]
    planned = 2 * math.ceil(32 / 2)  # what Lightning sized the schedule with: the initial accumulation
    assert trainer.global_step < planned  # the batch grew, so there were fewer optimizer steps
    if schedule == "samples":
        assert policy.schedule_position == planned and lr == pytest.approx(0.0, abs=1e-12)
    else:
        assert lr > 1e-3  # Lightning's one step per optimizer step: the cosine is cut short


# ----------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs, message", [
    ({"initial_accumulation": 1}, "initial_accumulation"),
    ({"eta": 0.0}, "eta"),
    ({"theta": -1.0}, "theta"),
    ({"growth": 1}, "growth"),
    ({"initial_accumulation": 2, "max_accumulation": 6}, "max_accumulation"),
    ({"check_every": 0}, "check_every"),
    ({"test": "variance"}, "test"),
    ({"schedule": "epochs"}, "schedule"),
])
def test_bad_options_are_refused_with_their_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AdaptiveBatchSize(**kwargs)


def test_a_trainer_with_its_own_accumulation_is_refused():
    with pytest.raises(ValueError, match="initial_accumulation=3"):
        fit(AdaptiveBatchSize(), Regression(), regression_data(), accumulate_grad_batches=3)


def test_a_gradient_accumulation_scheduler_is_refused():
    with pytest.raises(RuntimeError, match="GradientAccumulationScheduler"):
        trainer = pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                             callbacks=[AdaptiveBatchSize(), GradientAccumulationScheduler({0: 2})],
                             enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(Regression(), regression_data())


def test_manual_optimization_is_refused():
    class Manual(Regression):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

    with pytest.raises(RuntimeError, match="automatic optimization"):
        fit(AdaptiveBatchSize(), Manual(), regression_data())


def test_resume_with_other_options_is_refused():
    saved = AdaptiveBatchSize(initial_accumulation=2).state_dict()
    with pytest.raises(ValueError, match="same options"):
        AdaptiveBatchSize(initial_accumulation=4, max_accumulation=32).load_state_dict(saved)
