"""EntropySelection (EATA): the rules against hand formulas, the gradient through a real Trainer on noisy
digits against an independent recomputation of EATA's mask and weights, the moving average, and bad options."""

import copy
import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from helpers import GradCapture
from policy_registry import noisy_digits_task

from lightning_select import EntropySelection, SelectionError
from lightning_select.rules.entropy import (
    eata_weights,
    prediction_entropy,
    redundancy_mask,
    reliable_mask,
    update_moving_average,
)


def test_entropy_of_uniform_and_one_hot_and_hand_formula():
    for c in (2, 10, 1000):
        assert float(prediction_entropy(torch.zeros(3, c))[0]) == pytest.approx(math.log(c), rel=1e-6)
    assert float(prediction_entropy(torch.tensor([[100.0, 0.0, 0.0]]))) == pytest.approx(0.0, abs=1e-6)
    logits = torch.randn(5, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    p = logits.softmax(-1)
    assert torch.allclose(prediction_entropy(logits).double(), -(p * p.log()).sum(-1), atol=1e-6)
    assert prediction_entropy(logits.half()).dtype == torch.float32


def test_reliable_redundancy_weights_and_moving_average_by_hand():
    assert reliable_mask(torch.tensor([0.2, 0.4, 0.6]), 0.4).tolist() == [True, False, False]  # strict
    average = torch.tensor([0.6, 0.8, 0.0])  # |average| = 1
    probs = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.6, 0.8, 0.0]])
    # cosines by hand: 0, 0.6, 0.8, 1
    assert redundancy_mask(probs, average, 0.7).tolist() == [True, True, False, False]
    assert redundancy_mask(probs, average, 0.05).tolist() == [True, False, False, False]
    assert redundancy_mask(probs, None, 0.05).all()
    e = torch.tensor([0.1, 0.5])
    assert torch.allclose(eata_weights(e, 0.3), 1 / torch.exp(e - 0.3))
    first = update_moving_average(None, probs[:2])
    assert torch.allclose(first, torch.tensor([0.5, 0.0, 0.5]))
    second = update_moving_average(first, probs[2:], momentum=0.9)
    assert torch.allclose(second, 0.9 * first + 0.1 * torch.tensor([0.3, 0.9, 0.0]))
    assert update_moving_average(second, probs[:0]) is second


class BatchCapture(pl.Callback):
    def __init__(self):
        self.batches = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append({k: v.clone() for k, v in batch.items()})


def test_trainer_gradient_equals_eata_weighted_mean_on_noisy_digits():
    pl.seed_everything(0)
    model, data = noisy_digits_task(batch_size=64)
    reference = copy.deepcopy(model)
    # a hand-made moving average, and thresholds at the batch's medians, so that both filters bite
    average = torch.zeros(10)
    average[0] = 0.7
    average[1:] = 0.3 / 9
    grads, batches = GradCapture(), BatchCapture()
    data.setup("fit")
    probe = next(iter(data.train_dataloader()))
    with torch.no_grad():
        logits = reference(probe["image"]).float()
    ent = prediction_entropy(logits)
    cos = F.cosine_similarity(average.unsqueeze(0), logits.softmax(-1), dim=1)
    fraction = float(ent.median()) / math.log(10)
    epsilon = float(cos.median())
    policy = EntropySelection(entropy_fraction=fraction, epsilon=epsilon)
    policy.load_state_dict({"moving_average": average})
    pl.seed_everything(0)
    model2, data2 = noisy_digits_task(batch_size=64)
    model2.load_state_dict(reference.state_dict())
    pl.Trainer(callbacks=[policy, batches, grads], max_steps=1, accelerator="cpu", logger=False,
               enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False).fit(model2, data2)
    batch = batches.batches[0]
    logits = reference(batch["image"]).float()
    losses = F.cross_entropy(logits, batch["label"], reduction="none")
    e0 = fraction * math.log(10)
    with torch.no_grad():
        p = logits.softmax(-1)
        e = -(p * p.log()).sum(-1)
        c = (p @ average) / (p.norm(dim=1) * average.norm())
        keep = (e < e0) & (c.abs() < epsilon)
        w = torch.where(keep, torch.exp(e0 - e), torch.zeros_like(e))
    assert 0 < int(keep.sum()) < keep.numel()  # both kept and filtered rows
    loss = (w * losses).sum() / w.sum()
    expected = torch.autograd.grad(loss, list(reference.parameters()))
    for got, exp in zip(grads.grads[0], expected):
        assert torch.allclose(got, exp, atol=1e-6)
    assert torch.allclose(policy.moving_average, 0.9 * average + 0.1 * p[keep].mean(0), atol=1e-6)
    assert torch.equal(policy.state_dict()["moving_average"], policy.moving_average.cpu())


def test_bad_options_and_missing_logits(trainer_kwargs):
    from helpers import PerSampleRegressor, regression_loader

    for kwargs, match in [({"entropy_fraction": 0.0}, "entropy_fraction"), ({"epsilon": -1.0}, "epsilon"),
                          ({"momentum": 1.0}, "momentum")]:
        with pytest.raises(ValueError, match=match):
            EntropySelection(**kwargs)
    with pytest.raises(TypeError, match="`epsilon` to be a real number"):
        EntropySelection(epsilon="small")
    with pytest.raises(TypeError, match="`weight` to be true or false"):
        EntropySelection(weight="yes")
    with pytest.raises(ValueError, match="`num_classes` >= 2"):
        EntropySelection(num_classes=1)
    with pytest.raises(SelectionError, match="'logits'"):
        pl.Trainer(callbacks=[EntropySelection()], max_steps=1, **trainer_kwargs).fit(
            PerSampleRegressor(), regression_loader())
