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


# ---------------------------------------------------------------------------- the Fisher regulariser (EATA Eqns. 8-9)
def test_fisher_and_penalty_rules_against_hand_formulas():
    from lightning_select.rules.fisher import (
        accumulate_fisher,
        diagonal_fisher,
        fisher_penalty,
        pseudo_label_cross_entropy,
    )

    g = torch.Generator().manual_seed(0)
    weight = torch.randn(4, 6, generator=g, requires_grad=True)
    bias = torch.randn(4, generator=g, requires_grad=True)
    batches = [torch.randn(5, 6, generator=g) for _ in range(3)]
    sums, count = accumulate_fisher([weight, bias], lambda x: pseudo_label_cross_entropy(x @ weight.T + bias), batches)
    fisher = [s / count for s in sums]
    # by hand, in float64: the gradient of mean_i CE(z_i, argmax z_i) is mean_i (p_i − onehot_i) x_iᵀ for the weight
    # (mean_i (p_i − onehot_i) for the bias)
    w64, b64 = weight.detach().double(), bias.detach().double()
    hand_w, hand_b = torch.zeros(4, 6, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    per_batch = []
    for x in batches:
        z = x.double() @ w64.T + b64
        residual = z.softmax(-1) - F.one_hot(z.argmax(-1), 4).double()
        gw, gb = residual.T @ x.double() / x.shape[0], residual.mean(0)
        per_batch.append([gw, gb])
        hand_w, hand_b = hand_w + gw**2 / 3, hand_b + gb**2 / 3
    assert count == 3
    assert torch.allclose(fisher[0].double(), hand_w, rtol=1e-5, atol=1e-9)
    assert torch.allclose(fisher[1].double(), hand_b, rtol=1e-5, atol=1e-9)
    assert all(torch.allclose(a.double(), b.double(), rtol=1e-5, atol=1e-9)
               for a, b in zip(diagonal_fisher(per_batch), fisher))
    assert accumulate_fisher([weight, bias], lambda x: pseudo_label_cross_entropy(x @ weight.T + bias), batches,
                             max_batches=2)[1] == 2
    # the penalty α Σ ω (θ − θ̃)² and its gradient 2αω(θ − θ̃), element by element
    anchors = [weight.detach() + 0.1, bias.detach() - 0.2]
    penalty = fisher_penalty([weight, bias], anchors, fisher, alpha=2000.0)
    by_hand = 2000.0 * sum(float(w) * (float(t) - float(a)) ** 2 for p, a, f in zip([weight, bias], anchors, fisher)
                           for t, a, w in zip(p.detach().flatten(), a.flatten(), f.flatten()))
    assert float(penalty.detach()) == pytest.approx(by_hand, rel=1e-5)
    grads = torch.autograd.grad(penalty, [weight, bias])
    for grad, p, a, f in zip(grads, [weight, bias], anchors, fisher):
        assert torch.allclose(grad, 2 * 2000.0 * f * (p.detach() - a), rtol=1e-5, atol=1e-9)
    with pytest.raises(ValueError, match="at least one batch"):
        diagonal_fisher([])
    with pytest.raises(ValueError, match="one anchor and one Fisher tensor per parameter"):
        fisher_penalty([weight, bias], anchors[:1], fisher, 1.0)


def _fit_digits(policy, *callbacks, max_steps=1, dropout=0.2, logger=False, **kwargs):
    from lightning_select.data.noisy_labels import NoisyDigitsDataModule
    from lightning_select.models.classifier import NoisyLabelClassifier

    pl.seed_everything(0)
    model = NoisyLabelClassifier(arch="mlp", hidden=32, dropout=dropout)
    initial = copy.deepcopy(model)
    trainer = pl.Trainer(callbacks=[policy, *callbacks], max_steps=max_steps, accelerator="cpu", logger=logger,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, **kwargs)
    trainer.fit(model, NoisyDigitsDataModule(batch_size=64))
    return trainer, model, initial


def test_fisher_at_train_start_matches_an_independent_recomputation_and_changes_nothing_else():
    from lightning_select.data.noisy_labels import NoisyDigitsDataModule

    off, on = GradCapture(), GradCapture()
    _fit_digits(EntropySelection(entropy_fraction=1.0, epsilon=1.01), off)
    policy = EntropySelection(entropy_fraction=1.0, epsilon=1.01, fisher_alpha=2000.0, fisher_batches=3,
                              fisher_input_key="image", progress=False)
    _, _, initial = _fit_digits(policy, on)
    # anchors: the parameters before training
    names = [n for n, _ in initial.named_parameters()]
    assert sorted(policy.anchors) == sorted(names) and sorted(policy.fisher) == sorted(names)
    for n, p in initial.named_parameters():
        assert torch.equal(policy.anchors[n], p.detach())
    # the first step trains exactly as without the regulariser: the penalty's gradient is 0 at the anchors, and the
    # Fisher pass restored the RNG (dropout masks), the buffers and the data order
    assert len(off.grads) == len(on.grads) == 1
    assert all(torch.equal(a, b) for a, b in zip(off.grads[0], on.grads[0]))
    assert torch.equal(off.batch_indices[0], on.batch_indices[0])
    # the Fisher: EATA's mean over 3 batches of the squared gradient of the batch-mean cross-entropy against the
    # argmax, recomputed by hand; dropout off on both sides (eval mode here, a fisher_loss in eval mode there)
    data = NoisyDigitsDataModule(batch_size=64)
    data.setup("fit")
    reference = copy.deepcopy(initial).eval()  # eval = no dropout
    sums = {n: torch.zeros_like(p) for n, p in reference.named_parameters()}
    for k, batch in enumerate(data.train_dataloader()):
        if k == 3:
            break
        logits = reference(batch["image"])
        loss = F.cross_entropy(logits, logits.argmax(-1))
        for (n, p), grad in zip(reference.named_parameters(), torch.autograd.grad(loss, list(reference.parameters()))):
            sums[n] += grad**2
    quiet = EntropySelection(fisher_alpha=1.0, fisher_batches=3, progress=False,
                             fisher_loss=lambda module, batch, i: F.cross_entropy(
                                 module.eval()(batch["image"]), module(batch["image"]).argmax(-1)))
    _fit_digits(quiet)
    for n in names:
        assert torch.allclose(quiet.fisher[n], sums[n] / 3, rtol=1e-5, atol=1e-12), n
    assert all(float(w.max()) > 0 for w in policy.fisher.values())


def test_penalty_gradient_and_logging_from_a_restored_fisher(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    base = GradCapture()
    _, _, initial = _fit_digits(EntropySelection(entropy_fraction=1.0, epsilon=1.01), base)
    g = torch.Generator().manual_seed(1)
    named = dict(initial.named_parameters())
    fisher = {n: torch.rand(p.shape, generator=g) * 1e-3 for n, p in named.items()}
    anchors = {n: p.detach() + 0.05 * torch.randn(p.shape, generator=g) for n, p in named.items()}
    policy = EntropySelection(entropy_fraction=1.0, epsilon=1.01, fisher_alpha=50.0, progress=False)
    policy.load_state_dict({"moving_average": None, "fisher": fisher, "anchors": anchors})
    grads = GradCapture()
    trainer, _, _ = _fit_digits(policy, grads, logger=CSVLogger(tmp_path), log_every_n_steps=1)
    assert all(torch.equal(policy.fisher[n], fisher[n]) for n in fisher)  # restored: not re-estimated
    expected = 50.0 * sum(float((fisher[n] * (p.detach() - anchors[n]) ** 2).sum()) for n, p in named.items())
    assert float(trainer.callback_metrics["eata/penalty"]) == pytest.approx(expected, rel=1e-5)
    assert float(trainer.callback_metrics["select/penalty"]) == pytest.approx(expected, rel=1e-5)
    for (n, p), got, data in zip(named.items(), grads.grads[0], base.grads[0]):
        assert torch.allclose(got, data + 2 * 50.0 * fisher[n] * (p.detach() - anchors[n]), atol=1e-6), n
    state = policy.state_dict()
    again = EntropySelection(fisher_alpha=50.0)
    again.load_state_dict(state)
    assert all(torch.equal(again.fisher[n], state["fisher"][n]) and torch.equal(again.anchors[n], state["anchors"][n])
               for n in fisher)


def test_fisher_pass_restores_batchnorm_buffers():
    from lightning_select.data.shifted_digits import ShiftedDigitsDataModule
    from lightning_select.models.adaptation import EntropyAdaptation
    from lightning_select.models.classifier import small_cnn

    class Buffers(pl.Callback):
        def on_fit_start(self, trainer, pl_module):
            self.before = {n: b.clone() for n, b in pl_module.named_buffers()}

        def on_train_start(self, trainer, pl_module):  # runs after EntropySelection's (callback order)
            self.after = {n: b.clone() for n, b in pl_module.named_buffers()}

    pl.seed_everything(0)
    policy = EntropySelection(fisher_alpha=1.0, fisher_loader="fisher_dataloader", fisher_batches=2, progress=False)
    buffers = Buffers()
    pl.Trainer(callbacks=[policy, buffers], max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0).fit(
        EntropyAdaptation(small_cnn(in_channels=1, width=8), adapt="all"), ShiftedDigitsDataModule())
    assert any("running_mean" in n for n in buffers.before) and policy.fisher is not None
    assert all(torch.equal(buffers.before[n], buffers.after[n]) for n in buffers.before)


def test_fisher_bad_options_and_inputs():
    with pytest.raises(ValueError, match="`fisher_alpha` >= 0.*2000"):
        EntropySelection(fisher_alpha=-1.0)
    with pytest.raises(TypeError, match="`fisher_loader`"):
        EntropySelection(fisher_loader=5)
    with pytest.raises(ValueError, match="`fisher_batches` >= 1"):
        EntropySelection(fisher_batches=0)
    with pytest.raises(TypeError, match="`fisher_loss`"):
        EntropySelection(fisher_loss="cross_entropy")
    common = {"entropy_fraction": 1.0, "epsilon": 1.01, "fisher_alpha": 1.0, "fisher_input_key": "image",
              "progress": False}
    with pytest.raises(SelectionError, match="fisher_loader='no_such_loader' names no method of the trainer's"):
        _fit_digits(EntropySelection(fisher_loader="no_such_loader", **common))
    with pytest.raises(SelectionError, match=r"fisher_loader=\[\].*fisher_alpha=0.*yielded no batch"):
        _fit_digits(EntropySelection(fisher_loader=[], **common))

    with pytest.raises(SelectionError, match="detached 'logits'.*fisher_input_key.*fisher_loss="):
        _fit_digits(EntropySelection(**{**common, "fisher_input_key": None}))  # the classifier detaches its logits
    with pytest.raises(TypeError, match="`fisher_input_key`"):
        EntropySelection(fisher_input_key=3)
    stale = EntropySelection(**common)
    stale.load_state_dict({"fisher": {"other.weight": torch.ones(3)}, "anchors": {"other.weight": torch.ones(3)}})
    with pytest.raises(SelectionError, match=r"restored Fisher does not match.*\['other.weight'\]"):
        _fit_digits(stale)


# ---------------------------------------------------------------------------- test-time adaptation (EATA, noisy digits)
@pytest.fixture(scope="module")
def shifted_digits():
    """A small BatchNorm CNN trained on clean digits, and the noisy target split (noise_std=0.5) it adapts to."""
    from lightning_select.data.shifted_digits import ShiftedDigitsDataModule
    from lightning_select.models.classifier import NoisyLabelClassifier

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny CNN: one thread is fastest, and far faster than two on a busy machine
    pl.seed_everything(0)
    data = ShiftedDigitsDataModule(noise_std=0.5, shift=0, seed=0)
    data.setup("fit")
    source = NoisyLabelClassifier(arch="cnn", in_channels=1, width=8, lr=3e-3, plain_loss=True)
    pl.Trainer(max_epochs=10, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False).fit(source, train_dataloaders=data.source_dataloader())
    yield source.net.eval(), data
    torch.set_num_threads(threads)


def _accuracy_and_entropy(net, loader):
    correct = seen = 0
    entropy = 0.0
    with torch.no_grad():
        for batch in loader:
            logits = net(batch["image"])
            correct += int((logits.argmax(-1) == batch["label"]).sum())
            entropy += float(prediction_entropy(logits).sum())
            seen += batch["label"].numel()
    return correct / seen, entropy / seen


def _adapt(net, data, epochs, **policy_options):
    from helpers import Recorder

    from lightning_select.models.adaptation import EntropyAdaptation

    pl.seed_everything(0)
    module = EntropyAdaptation(copy.deepcopy(net), adapt="norm", lr=0.05)
    before = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    policy, recorder = EntropySelection(entropy_fraction=0.4, epsilon=0.5, fisher_loader="fisher_dataloader",
                                        progress=False, **policy_options), Recorder()
    pl.Trainer(callbacks=[policy, recorder], max_epochs=epochs, accelerator="cpu", logger=False, limit_val_batches=0,
               enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False).fit(module, data)
    drift = {n: (p.detach() - before[n]) for n, p in module.named_parameters() if p.requires_grad}
    kept = torch.cat([r["weights"] > 0 for r in recorder.records]).float().mean().item()
    return module, policy, drift, kept


def test_eata_test_time_adaptation_beats_the_unadapted_model_on_noisy_digits(shifted_digits):
    """EATA's online protocol: one pass over the unlabelled noisy target, predictions made before each update.

    Measured (seed 0, one thread): unadapted 0.485 (mean entropy 1.05); online 0.541; after adaptation 0.555
    (entropy 0.93); kept fraction 0.40. The BatchNorm re-normalisation with test-batch statistics alone gives 0.545,
    so most of the gain is EATA's model configuration; the entropy steps add about one point after the pass."""
    net, data = shifted_digits
    unadapted, entropy_before = _accuracy_and_entropy(net, data.val_dataloader())
    module, policy, _, kept = _adapt(net, data, epochs=1, fisher_alpha=2000.0)  # the paper's α
    adapted, entropy_after = _accuracy_and_entropy(module.net.eval(), data.val_dataloader())
    assert 0.40 < unadapted < 0.60  # the shift costs about half of the clean accuracy (99 %)
    assert module.online_accuracy > unadapted + 0.03
    assert adapted > unadapted + 0.03
    assert entropy_after < entropy_before - 0.05  # entropy minimisation did minimise the entropy
    assert 0.2 < kept < 0.8  # the reliable + non-redundant filter keeps a part of each batch
    assert policy.fisher is not None and sorted(policy.fisher) == sorted(
        n for n, p in module.named_parameters() if p.requires_grad)  # BatchNorm scale and shift only


def test_fisher_penalty_reduces_the_drift_from_the_anchors(shifted_digits):
    """Three epochs on the target (lr 0.05): α = 2000 (the paper's) against α = 0. Measured (seed 0): squared drift
    Σ(θ − θ̃)² 2.47 against 3.54; the Fisher-weighted drift Σω(θ − θ̃)², which the penalty targets, drops as well."""
    net, data = shifted_digits
    _, plain, plain_drift, _ = _adapt(net, data, epochs=3, fisher_alpha=0.0)
    _, fisher_policy, fisher_drift, _ = _adapt(net, data, epochs=3, fisher_alpha=2000.0)
    squared = {name: sum(float(d.square().sum()) for d in drift.values())
               for name, drift in (("plain", plain_drift), ("fisher", fisher_drift))}
    fisher = fisher_policy.fisher
    weighted = {name: sum(float((fisher[n] * d.square()).sum()) for n, d in drift.items())
                for name, drift in (("plain", plain_drift), ("fisher", fisher_drift))}
    assert plain.fisher is None  # α = 0: no Fisher is estimated
    assert squared["fisher"] < 0.8 * squared["plain"], squared
    assert weighted["fisher"] < 0.8 * weighted["plain"], weighted
