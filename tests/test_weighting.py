"""Hard-example weighting: FocalWeighting, OHEM, LossSoftmaxWeighting and their rules.

The rules against independent formulas (the focal loss written out, its autograd gradient, a brute-force
top-k, an iterated clip for the weight cap, the tilted loss), and the gradient of a real Trainer step
against hand-written losses on the same batch: the focal loss, the mean of the top-k losses, the tilted
loss. Bad options and bad training_step outputs raise errors that name the option and the fix.
"""

import copy
import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from helpers import GradCapture, PerSampleRegressor, Recorder, regression_loader
from lightning.pytorch.loggers import CSVLogger
from policy_registry import FOCAL_ALPHA, digits_task, noisy_digits_task

from lightning_select import OHEM, FocalWeighting, LossSoftmaxWeighting, SelectionError
from lightning_select.models.classifier import NoisyLabelClassifier
from lightning_select.rules.reduction import effective_sample_size
from lightning_select.rules.weighting import (
    bound_weights,
    focal_gradient_weights,
    focal_loss,
    focal_weights,
    loss_softmax_weights,
    ohem_mask,
)

GAMMAS = (0.0, 0.5, 1.0, 2.0, 5.0)


def _logits(n=32, c=5, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(n, c, generator=g, dtype=torch.float64), torch.randint(0, c, (n,), generator=g)


def _focal_by_hand(z, y, gamma, alpha=None):
    """The focal loss written out: −α_t (1 − p_t)^γ log p_t, with p_t from softmax (differentiable)."""
    p_t = torch.softmax(z, dim=1)[torch.arange(len(y)), y]
    a = 1.0 if alpha is None else (alpha if isinstance(alpha, float) else torch.as_tensor(alpha, dtype=z.dtype)[y])
    return -a * (1 - p_t) ** gamma * torch.log(p_t)


# ---------------------------------------------------------------------------- rules
@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("alpha", [None, 0.25, [0.1, 0.2, 0.3, 0.4, 1.0]], ids=["none", "scalar", "per_class"])
def test_focal_weights_times_cross_entropy_is_the_focal_loss(gamma, alpha):
    z, y = _logits()
    ce = F.cross_entropy(z, y, reduction="none")
    expected = _focal_by_hand(z, y, gamma, alpha)
    assert torch.allclose(focal_weights(z, y, gamma, alpha) * ce, expected, rtol=1e-10, atol=1e-12)
    assert torch.allclose(focal_loss(z, y, gamma, alpha), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("gamma", GAMMAS)
def test_focal_gradient_weights_give_the_focal_loss_gradient_and_value_weights_do_not(gamma):
    z, y = _logits(seed=1)
    z.requires_grad_(True)
    alpha = [0.5, 1.0, 0.25, 0.75, 0.1]
    (exact,) = torch.autograd.grad(_focal_by_hand(z, y, gamma, alpha).sum(), z)
    ce = F.cross_entropy(z, y, reduction="none")
    (weighted,) = torch.autograd.grad((focal_gradient_weights(z, y, gamma, alpha) * ce).sum(), z, retain_graph=True)
    assert torch.allclose(weighted, exact, rtol=1e-9, atol=1e-12)
    (value,) = torch.autograd.grad((focal_weights(z, y, gamma, alpha) * ce).sum(), z)
    if gamma == 0:
        assert torch.allclose(value, exact)
    else:  # the detached value weights drop the term from differentiating (1 − p_t)^γ
        assert (value - exact).abs().max() > 1e-3 * exact.abs().max()
    assert bool((focal_gradient_weights(z, y, gamma) >= focal_weights(z, y, gamma) - 1e-15).all())


def test_focal_weights_are_finite_and_accurate_for_confident_and_float32_logits():
    z = torch.tensor([[60.0, 0.0, 0.0], [0.0, 0.0, 0.0], [-60.0, 0.0, 0.0]])
    y = torch.tensor([0, 0, 0])
    for gamma in (0.3, 2.0):
        for rule in (focal_weights, focal_gradient_weights):
            w = rule(z, y, gamma)
            assert w.dtype == torch.float32 and bool(torch.isfinite(w).all()), (rule, gamma, w)
    assert float(focal_weights(z, y, 2.0)[0]) == pytest.approx(math.exp(-60.0) ** 2 * 4, rel=1e-4)  # (1−p)² ≈ (2e^−60)²
    assert float(focal_gradient_weights(z, y, 2.0)[0]) < 1e-40  # ≈ (1 − p)^γ (1 + γ): tiny, not NaN
    assert float(focal_weights(z, y, 2.0)[2]) == pytest.approx(1.0)  # p_t ≈ 0: weight 1


def test_binary_softmax_focal_equals_the_sigmoid_focal_loss():
    """The paper's binary sigmoid form (torchvision.ops.sigmoid_focal_loss's formula, written out) is the
    two-class softmax focal loss with logits [0, x] and alpha=[1 − α, α]."""
    g = torch.Generator().manual_seed(2)
    x, t = 4 * torch.randn(40, generator=g, dtype=torch.float64), torch.randint(0, 2, (40,), generator=g)
    a, gamma = 0.25, 2.0
    p = torch.sigmoid(x)
    ce = F.binary_cross_entropy_with_logits(x, t.double(), reduction="none")
    p_t = p * t + (1 - p) * (1 - t)
    sigmoid_focal = (a * t + (1 - a) * (1 - t)) * ce * (1 - p_t) ** gamma
    z = torch.stack([torch.zeros_like(x), x], dim=1)
    assert torch.allclose(focal_loss(z, t, gamma, [1 - a, a]), sigmoid_focal, rtol=1e-9, atol=1e-12)
    try:
        from torchvision.ops import sigmoid_focal_loss
    except ImportError:
        return
    assert torch.allclose(sigmoid_focal_loss(x, t.double(), a, gamma, "none"), sigmoid_focal, atol=1e-12)


def _top_by_hand(values, k):
    return sorted(sorted(range(len(values)), key=lambda i: (-values[i], i))[:k])


def test_ohem_mask_keeps_the_ceiling_of_the_top_losses_with_deterministic_ties():
    g = torch.Generator().manual_seed(3)
    for n, keep in [(320, 0.1), (125, 0.25), (7, 0.5), (10, 1.0), (3, 0.01), (64, 0.3)]:
        losses = torch.randint(0, 6, (n,), generator=g).float()  # many ties
        mask = ohem_mask(losses, keep)
        k = max(1, math.ceil(round(keep * n, 9)))
        assert int(mask.sum()) == k, (n, keep)
        assert mask.nonzero().flatten().tolist() == _top_by_hand(losses.tolist(), k)
    assert ohem_mask(torch.tensor([float("nan"), 1.0, 0.0]), 0.5).tolist() == [False, True, True]  # NaN last
    assert int(ohem_mask(torch.tensor([0.1, 0.1, 0.1]), 0.1).sum()) == 1


def test_global_ohem_mask_is_the_top_of_every_ranks_losses():
    g = torch.Generator().manual_seed(4)
    for counts in ([8, 8], [8, 5], [3, 0], [6, 6, 2]):
        width = max(counts)
        gathered = torch.full((len(counts), width), float("-inf"))
        rows = [torch.randint(0, 4, (c,), generator=g).float() for c in counts]
        for r, row in enumerate(rows):
            gathered[r, : len(row)] = row
        flat = [v for row in rows for v in row.tolist()]
        offsets = [sum(counts[:r]) for r in range(len(counts))]
        chosen = _top_by_hand(flat, max(1, math.ceil(round(0.3 * len(flat), 9))))
        for r, row in enumerate(rows):
            mask = ohem_mask(row, 0.3, gathered, rank=r, counts=torch.tensor(counts))
            expected = [i - offsets[r] for i in chosen if offsets[r] <= i < offsets[r] + counts[r]]
            assert mask.nonzero().flatten().tolist() == expected, (counts, r)


def test_loss_softmax_weights_are_n_times_the_softmax_and_give_the_tilted_loss_gradient():
    g = torch.Generator().manual_seed(5)
    losses = 3 * torch.rand(50, generator=g, dtype=torch.float64)
    for t in (0.1, 1.0, 7.0):
        w = loss_softmax_weights(losses, t)
        e = torch.exp(losses / t)
        assert torch.allclose(w, 50 * e / e.sum(), rtol=1e-12)
        assert float(w.mean()) == pytest.approx(1.0, abs=1e-12)
    assert torch.allclose(loss_softmax_weights(losses, 1e6), torch.ones(50, dtype=torch.float64), atol=1e-5)
    assert int(loss_softmax_weights(losses, 1e-4).argmax()) == int(losses.argmax())
    theta = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.randn(50, 4, generator=g, dtype=torch.float64)
    per_row = (x @ theta - 1) ** 2
    t = 0.7
    (tilted,) = torch.autograd.grad(t * torch.log(torch.exp(per_row / t).mean()), theta, retain_graph=True)
    w = loss_softmax_weights(per_row, t)
    (weighted,) = torch.autograd.grad((w * per_row).sum() / w.sum(), theta)
    assert torch.allclose(weighted, tilted, rtol=1e-10)


def _clip_iterated(w, r, rounds=10_000):
    """Independent: repeat "clip at r × mean, rescale to the original total" until nothing moves."""
    w, total = w.double().clone(), float(w.sum())
    for _ in range(rounds):
        cap = r * float(w.mean())
        if float(w.max()) <= cap * (1 + 1e-13):
            break
        w = w.clamp_max(cap)
        w = w * total / float(w.sum())
    return w


@pytest.mark.parametrize("ratio", [1.0, 1.2, 2.0, 5.0])
def test_bound_weights_caps_the_ratio_exactly_and_keeps_the_total(ratio):
    g = torch.Generator().manual_seed(6)
    for trial in range(30):
        n = int(torch.randint(1, 40, (1,), generator=g))
        w = torch.exp(2 * torch.randn(n, generator=g, dtype=torch.float64))
        if trial % 3 == 0:
            w[: n // 3] = 0.0  # some zero weights
        out = bound_weights(w, ratio)
        assert float(out.sum()) == pytest.approx(float(w.sum()), rel=1e-12)
        positive = int((w > 0).sum())
        if positive * ratio > n or float(w.max()) <= ratio * float(w.mean()):  # feasible (or already within)
            assert float(out.max() / out.mean()) <= ratio * (1 + 1e-9)
            assert torch.allclose(out, _clip_iterated(w, ratio), rtol=1e-7, atol=1e-12)
        order = torch.argsort(w, stable=True)
        assert bool((out[order][1:] >= out[order][:-1] - 1e-12).all())  # clipping never reorders
        if float(w.max()) > ratio * float(w.mean()) and positive * ratio > n:
            assert float(out.max() / out.mean()) == pytest.approx(ratio, rel=1e-9)  # the cap is tight


def test_bound_weights_is_a_no_op_within_the_bound_and_handles_edge_cases():
    w = torch.tensor([1.0, 2.0, 3.0])
    assert torch.equal(bound_weights(w, 1.5), w)  # max/mean = 1.5 exactly
    assert torch.equal(bound_weights(w, 10.0), w)
    assert torch.allclose(bound_weights(w, 1.0), torch.full((3,), 2.0))  # ratio 1: all equal, total kept
    assert torch.equal(bound_weights(torch.tensor([1.0, 0.0, 0.0, 0.0]), 2.0), torch.tensor([1.0, 0.0, 0.0, 0.0]))
    out = bound_weights(torch.tensor([4.0, 1.0, 0.0, 0.0]), 3.0)  # feasible with zeros: clip at 3, then × 5/4
    assert torch.allclose(out, torch.tensor([3.75, 1.25, 0.0, 0.0]))
    nan = torch.tensor([float("nan"), 1.0])
    assert torch.equal(bound_weights(nan, 2.0).isnan(), nan.isnan())  # non-finite: unchanged
    assert bound_weights(torch.zeros(0), 2.0).numel() == 0
    assert torch.equal(bound_weights(torch.zeros(3), 2.0), torch.zeros(3))
    with pytest.raises(ValueError, match="max_ratio"):
        bound_weights(w, 0.9)
    with pytest.raises(ValueError, match="non-negative"):
        bound_weights(torch.tensor([-1.0, 5.0, 1.0]), 1.5)


# ---------------------------------------------------------------------------- through a real Trainer step
class BatchCapture(pl.Callback):
    def __init__(self):
        self.batches = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append({k: v.clone() for k, v in batch.items()})


def _one_step(policies, task=noisy_digits_task, batch_size=64, **kwargs):
    """One Trainer step from a copy of the initial model; returns (reference model, first batch, grads, recorder)."""
    pl.seed_everything(0)
    model, data = task(batch_size=batch_size)
    reference = copy.deepcopy(model)
    grads, batches, rec = GradCapture(), BatchCapture(), Recorder()
    kw = dict(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False)
    kw.update(kwargs)
    trainer = pl.Trainer(callbacks=[*policies, batches, grads, rec], **kw)
    trainer.fit(model, data)
    return reference, batches.batches[0], grads.grads[0], rec.records[0], trainer


def _assert_grads(got, expected, atol=1e-6):
    for g, e in zip(got, expected):
        assert torch.allclose(g, e, atol=atol), (g - e).abs().max()


@pytest.mark.parametrize("alpha", [None, FOCAL_ALPHA], ids=["no_alpha", "per_class_alpha"])
def test_trainer_gradient_equals_a_hand_written_focal_loss(alpha):
    """The key end-to-end check: FocalWeighting's Trainer gradient is the gradient of the batch's mean focal loss."""
    reference, batch, grads, rec, _ = _one_step([FocalWeighting(gamma=2.0, alpha=alpha)])
    logits = reference(batch["image"]).float()
    p_t = logits.softmax(-1)[torch.arange(64), batch["label"]]
    a = 1.0 if alpha is None else torch.tensor(alpha)[batch["label"]]
    focal = (-a * (1 - p_t) ** 2 * torch.log(p_t)).mean()
    expected = torch.autograd.grad(focal, list(reference.parameters()))
    _assert_grads(grads, expected)
    assert rec["weights"].numel() == 64 and not torch.allclose(rec["weights"], rec["weights"][0].expand(64))


def test_focal_value_weights_give_the_detached_focal_gradient_not_the_focal_loss_gradient():
    reference, batch, grads, _, _ = _one_step([FocalWeighting(gamma=2.0, match="value")])
    logits = reference(batch["image"]).float()
    ce = F.cross_entropy(logits, batch["label"], reduction="none")
    p_t = torch.exp(-ce)
    detached = ((1 - p_t.detach()) ** 2 * ce).mean()
    _assert_grads(grads, torch.autograd.grad(detached, list(reference.parameters()), retain_graph=True))
    focal = ((1 - p_t) ** 2 * ce).mean()
    exact = torch.autograd.grad(focal, list(reference.parameters()))
    rel = max(float((g - e).norm() / e.norm()) for g, e in zip(grads, exact))
    assert rel > 0.2, rel  # about 30% at initialisation (p_t ≈ 0.1)


@pytest.mark.parametrize("mode", ["select", "weight"])
def test_trainer_gradient_equals_the_mean_of_the_top_quarter_of_losses(mode):
    reference, batch, grads, rec, _ = _one_step([OHEM(keep=0.25, mode=mode)])
    logits = reference(batch["image"]).float()
    ce = F.cross_entropy(logits, batch["label"], reduction="none")
    top = _top_by_hand(ce.tolist(), 16)
    _assert_grads(grads, torch.autograd.grad(ce[top].mean(), list(reference.parameters())))
    kept = rec["indices"] if mode == "select" else rec["indices"][rec["weights"] > 0]
    assert kept.tolist() == batch["index"][top].tolist()


def test_ohem_select_with_focal_weights_gives_the_mean_focal_loss_of_the_hard_rows():
    reference, batch, grads, _, _ = _one_step([OHEM(keep=0.5), FocalWeighting(gamma=1.0)])
    logits = reference(batch["image"]).float()
    ce = F.cross_entropy(logits, batch["label"], reduction="none")
    top = _top_by_hand(ce.tolist(), 32)
    focal = ((1 - torch.exp(-ce)) * ce)[top].mean()  # count normalisation: divided by the 32 kept rows
    _assert_grads(grads, torch.autograd.grad(focal, list(reference.parameters())))


def test_trainer_gradient_equals_the_tilted_loss_and_the_logged_statistics(tmp_path):
    t = 0.5
    reference, batch, grads, rec, trainer = _one_step(
        [LossSoftmaxWeighting(temperature=t, max_weight_ratio=None)], logger=CSVLogger(tmp_path), log_every_n_steps=1)
    logits = reference(batch["image"]).float()
    ce = F.cross_entropy(logits, batch["label"], reduction="none")
    tilted = t * torch.log(torch.exp(ce / t).mean())
    _assert_grads(grads, torch.autograd.grad(tilted, list(reference.parameters())))
    w = rec["weights"]
    metrics = trainer.callback_metrics
    assert float(metrics["loss_softmax/ess_fraction"]) == pytest.approx(float(effective_sample_size(w) / 64), rel=1e-5)
    assert float(metrics["loss_softmax/max_mean_ratio"]) == pytest.approx(float(w.max() / w.mean()), rel=1e-5)
    assert float(metrics["loss_softmax/weight_mean"]) == pytest.approx(1.0, rel=1e-5)
    assert float(metrics["loss_softmax/loss_mean"]) == pytest.approx(float(ce.detach().mean()), rel=1e-5)


def test_weight_caps_hold_on_every_step_of_a_fit():
    for policy, ratio in ((FocalWeighting(gamma=2.0, alpha=FOCAL_ALPHA, max_weight_ratio=2.0), 2.0),
                          (LossSoftmaxWeighting(temperature=0.2, max_weight_ratio=3.0), 3.0)):
        pl.seed_everything(0)
        rec = Recorder()
        model, data = noisy_digits_task(batch_size=128)
        pl.Trainer(callbacks=[policy, rec], max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False).fit(model, data)
        ratios = [float(r["weights"].max() / r["weights"].mean()) for r in rec.records]
        assert max(ratios) <= ratio * (1 + 1e-5), ratios
        assert any(abs(r - ratio) < 1e-4 for r in ratios), ratios  # the cap bit at least once
        assert policy.stats.summary()["steps"] == len(rec.records)


def test_ohem_select_on_a_contrastive_loss_warns_and_weight_mode_does_not(recwarn):
    pl.seed_everything(0)
    kw = dict(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False)
    with pytest.warns(UserWarning, match="mode='weight'"):
        pl.Trainer(callbacks=[OHEM(keep=0.5)], **kw).fit(*digits_task(batch_size=32))
    recwarn.clear()
    pl.Trainer(callbacks=[OHEM(keep=0.5, mode="weight")], **kw).fit(*digits_task(batch_size=32))
    assert not [w for w in recwarn if "OHEM" in str(w.message)]


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("make, match", [
    (lambda: FocalWeighting(gamma=-0.5), "`gamma` >= 0"),
    (lambda: FocalWeighting(gamma="two"), "`gamma` to be a real number"),
    (lambda: FocalWeighting(alpha=0.0), "`alpha` > 0"),
    (lambda: FocalWeighting(alpha=[0.5, -0.1]), "per-class `alpha`"),
    (lambda: FocalWeighting(max_weight_ratio=0.5), "`max_weight_ratio` >= 1"),
    (lambda: FocalWeighting(match="loss"), "`match`"),
    (lambda: FocalWeighting(normalise="mean"), "`normalise`"),
    (lambda: LossSoftmaxWeighting(temperature=0.0), "`temperature` > 0"),
    (lambda: LossSoftmaxWeighting(temperature=-1.0), "`temperature` > 0"),
    (lambda: LossSoftmaxWeighting(max_weight_ratio=0.99), "`max_weight_ratio` >= 1"),
    (lambda: OHEM(keep=0.0), r"`keep` in \(0, 1\]"),
    (lambda: OHEM(keep=1.5), r"`keep` in \(0, 1\]"),
    (lambda: OHEM(keep=-0.25), r"`keep` in \(0, 1\]"),
    (lambda: OHEM(scope="world"), "`scope`"),
    (lambda: OHEM(mode="zero"), "`mode`"),
    (lambda: OHEM(scoring_mode="test"), "`scoring_mode`"),
])
def test_bad_options_name_the_option(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


@pytest.mark.parametrize("make", [FocalWeighting, OHEM, lambda: OHEM(mode="weight"), LossSoftmaxWeighting],
                         ids=["focal", "ohem_select", "ohem_weight", "loss_softmax"])
def test_a_scalar_training_step_is_refused_naming_the_policy(make, trainer_kwargs):
    policy = make()
    with pytest.raises(SelectionError, match=f"scalar loss, but {type(policy).__name__} need"):
        pl.Trainer(callbacks=[policy], max_steps=1, **trainer_kwargs).fit(PerSampleRegressor(mode="scalar"),
                                                                           regression_loader())


def test_focal_without_logits_or_targets_says_what_is_missing(trainer_kwargs):
    with pytest.raises(SelectionError, match=r"ctx.output_field\('logits'\).*returned no 'logits'"):
        pl.Trainer(callbacks=[FocalWeighting()], max_steps=1, **trainer_kwargs).fit(PerSampleRegressor(),
                                                                                    regression_loader())
    model, data = noisy_digits_task(batch_size=32)
    with pytest.raises(SelectionError, match=r"target_key='target'.*'clean_label', 'image', 'index', 'label'"):
        pl.Trainer(callbacks=[FocalWeighting(target_key="target")], max_steps=1, **trainer_kwargs).fit(model, data)
    model, data = noisy_digits_task(batch_size=32)
    with pytest.raises(SelectionError, match="3 per-class `alpha` values but logits with 10 classes"):
        pl.Trainer(callbacks=[FocalWeighting(alpha=[1.0, 1.0, 1.0])], max_steps=1, **trainer_kwargs).fit(model, data)


class SmoothedClassifier(NoisyLabelClassifier):
    def training_step(self, batch, batch_idx):
        logits = self(batch["image"]).float()
        return {"loss": F.cross_entropy(logits, batch["label"], reduction="none", label_smoothing=0.2), "logits": logits}


def test_focal_refuses_a_loss_that_is_not_the_cross_entropy_unless_told(trainer_kwargs):
    _, data = noisy_digits_task(batch_size=32)
    with pytest.raises(SelectionError, match="not the softmax cross-entropy.*check_loss=False"):
        pl.Trainer(callbacks=[FocalWeighting()], max_steps=1, **trainer_kwargs).fit(SmoothedClassifier(hidden=32), data)
    _, data = noisy_digits_task(batch_size=32)
    policy = FocalWeighting(check_loss=False)
    pl.Trainer(callbacks=[policy], max_steps=2, **trainer_kwargs).fit(SmoothedClassifier(hidden=32), data)
    assert policy.stats.steps == 2
