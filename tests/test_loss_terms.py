"""The engine's additive loss terms (``SelectionPolicy.loss_terms``): added exactly once per micro-batch, to the
reduced loss, with gradient accumulation, after a NaN re-run; logged; checked; refused with gradient caching."""

import copy

import lightning.pytorch as pl
import pytest
import torch
from helpers import (
    GradCapture,
    IndexWeights,
    KeepWhere,
    PerSampleRegressor,
    QuadraticPenalty,
    expected_weighted_grad,
    regression_loader,
)

from lightning_select import SelectionEngine, SelectionError, SelectionPolicy


def fit(model, callbacks, trainer_kwargs, **overrides):
    kwargs = {**trainer_kwargs, "max_steps": 1, **overrides}
    trainer = pl.Trainer(callbacks=callbacks, **kwargs)
    trainer.fit(model, regression_loader())
    return trainer


def penalty_grad(model, scale):
    return [2 * scale * p.detach() for p in model.net.parameters()]


def test_loss_term_gradient_is_added_once_to_the_weighted_mean(trainer_kwargs):
    model = PerSampleRegressor()
    reference = copy.deepcopy(model)
    grads, penalty = GradCapture(), QuadraticPenalty(0.3)
    fit(model, [KeepWhere(3, (0, 1)), IndexWeights(), penalty, grads], trainer_kwargs)
    batch = next(iter(regression_loader()))
    keep = batch["index"] % 3 != 2
    weights = 1.0 + (batch["index"][keep] % 3).float()
    data = expected_weighted_grad(reference, batch["x"][keep], batch["y"][keep], weights)
    for got, d, p in zip(grads.grads[0], data, penalty_grad(reference, 0.3)):
        assert torch.allclose(got, d + p, atol=1e-6)
    assert penalty.calls == 1


def test_loss_term_with_gradient_accumulation_counts_once_per_optimizer_step(trainer_kwargs):
    model = PerSampleRegressor()
    reference = copy.deepcopy(model)
    grads, penalty = GradCapture(), QuadraticPenalty(0.3)
    fit(model, [penalty, grads], trainer_kwargs, accumulate_grad_batches=2)
    loader = iter(regression_loader())
    micro = [expected_weighted_grad(reference, b["x"], b["y"], torch.ones(8)) for b in (next(loader), next(loader))]
    for got, a, b, p in zip(grads.grads[0], *micro, penalty_grad(reference, 0.3)):
        # Lightning scales each micro-batch's loss by 1/2: the two halves of the penalty make one
        assert torch.allclose(got, (a + b) / 2 + p, atol=1e-6)
    assert penalty.calls == 2  # once per micro-batch


def test_loss_term_is_added_once_when_nan_samples_are_skipped(trainer_kwargs):
    class NaNAtIndex3(PerSampleRegressor):
        def training_step(self, batch, batch_idx):
            losses = super().training_step(batch, batch_idx)
            return torch.where(batch["index"] == 3, torch.full_like(losses, float("nan")), losses)

    model = NaNAtIndex3()
    reference = copy.deepcopy(model)
    grads, penalty = GradCapture(), QuadraticPenalty(0.3)
    with pytest.warns(RuntimeWarning, match="skipping 1 sample"):
        fit(model, [SelectionEngine(nan_policy="skip"), penalty, grads], trainer_kwargs)
    batch = next(iter(regression_loader()))
    keep = batch["index"] != 3
    data = expected_weighted_grad(reference, batch["x"][keep], batch["y"][keep], torch.ones(7))
    for got, d, p in zip(grads.grads[0], data, penalty_grad(reference, 0.3)):
        assert torch.allclose(got, d + p, atol=1e-6)
    assert penalty.calls == 1  # the re-run without the NaN row does not add it again


def test_loss_term_is_logged(tmp_path, trainer_kwargs):
    from lightning.pytorch.loggers import CSVLogger

    model = PerSampleRegressor()
    expected = 0.3 * sum(float(p.detach().square().sum()) for p in model.parameters())
    trainer = fit(model, [QuadraticPenalty(0.3)], {**trainer_kwargs, "logger": CSVLogger(tmp_path)},
                  log_every_n_steps=1)
    assert float(trainer.callback_metrics["select/penalty"]) == pytest.approx(expected, rel=1e-6)


class BadTerm(SelectionPolicy):
    def __init__(self, value):
        self.value = value

    def loss_terms(self, ctx):
        return self.value


@pytest.mark.parametrize("value, match", [(torch.tensor(float("inf")), "non-finite value"),
                                          (torch.ones(2), "float scalar tensor or None"), (1.5, "float scalar")])
def test_bad_loss_terms_are_refused(trainer_kwargs, value, match):
    with pytest.raises(SelectionError, match=f"BadTerm.loss_terms.*{match}"):
        fit(PerSampleRegressor(), [BadTerm(value)], trainer_kwargs)


def test_loss_term_is_refused_in_the_gradient_cached_mode(trainer_kwargs):
    from lightning_select.data import DigitsPairsDataModule
    from lightning_select.models import DigitsEmbeddingModule

    trainer = pl.Trainer(callbacks=[SelectionEngine(embedding_chunk_size=16), QuadraticPenalty(0.1)], max_steps=1,
                         limit_val_batches=0, **trainer_kwargs)
    with pytest.raises(SelectionError, match=r"QuadraticPenalty.loss_terms\(\).*gradient-cached mode.*embedding_chunk"):
        trainer.fit(DigitsEmbeddingModule(), DigitsPairsDataModule(batch_size=32))
