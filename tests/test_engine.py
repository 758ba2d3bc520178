"""End-to-end Trainer tests of the engine pipeline (single process)."""

import copy

import lightning.pytorch as pl
import pytest
import torch
from helpers import (
    GradCapture,
    IndexWeights,
    KeepTopLoss,
    KeepWhere,
    PerSampleRegressor,
    RandomHalf,
    Recorder,
    expected_weighted_grad,
    regression_loader,
)
from torch.utils.data import DataLoader, TensorDataset

from lightning_select import LossHistory, SelectionEngine, SelectionError
from lightning_select.data import DigitsPairsDataModule
from lightning_select.models import DigitsEmbeddingModule


def fit(model, callbacks, trainer_kwargs, loader=None, **overrides):
    kwargs = {**trainer_kwargs, "max_steps": 1, **overrides}
    trainer = pl.Trainer(callbacks=callbacks, **kwargs)
    trainer.fit(model, loader or regression_loader())
    return trainer


@pytest.mark.parametrize("strategy", ["auto", "single_device_select"])
def test_selection_weights_and_reduction_match_independent_gradient(trainer_kwargs, strategy):
    model = PerSampleRegressor()
    reference = copy.deepcopy(model)
    grads = GradCapture()
    rec = Recorder()
    fit(model, [KeepWhere(3, (0, 1)), IndexWeights(), rec, grads], trainer_kwargs, strategy=strategy)
    batch = next(iter(regression_loader()))
    keep = batch["index"] % 3 != 2
    w = 1.0 + (batch["index"][keep] % 3).float()
    expected = expected_weighted_grad(reference, batch["x"][keep], batch["y"][keep], w)
    for got, exp in zip(grads.grads[0], expected):
        assert torch.allclose(got, exp, atol=1e-6)
    assert rec.records[0]["indices"].tolist() == batch["index"][keep].tolist()
    assert model.seen_batches[0].tolist() == batch["index"][keep].tolist()


def test_scoring_pass_then_top_k_selection(trainer_kwargs):
    model = PerSampleRegressor()
    reference = copy.deepcopy(model)
    grads, policy = GradCapture(), KeepTopLoss(k=3)
    fit(model, [policy, grads], trainer_kwargs)
    batch = next(iter(regression_loader()))
    with torch.no_grad():
        scores = reference.per_sample_loss(batch)
    assert torch.allclose(policy.seen_scores[0], scores)
    top = scores.topk(3).indices.sort().values
    expected = expected_weighted_grad(reference, batch["x"][top], batch["y"][top], torch.ones(3))
    assert all(torch.allclose(g, e, atol=1e-6) for g, e in zip(grads.grads[0], expected))
    # the scoring pass ran without grad: only the training pass was recorded by the module
    assert [b.tolist() for b in model.seen_batches] == [batch["index"][top].tolist()]


@pytest.mark.parametrize("mode,expect_training", [("eval", False), ("train", True)])
def test_scoring_mode_is_explicit(trainer_kwargs, mode, expect_training):
    modes = []

    class ModeProbe(PerSampleRegressor):
        def training_step(self, batch, batch_idx):
            if not torch.is_grad_enabled():
                modes.append(self.training)
            return super().training_step(batch, batch_idx)

    fit(ModeProbe(), [KeepTopLoss(k=4, scoring_mode=mode)], trainer_kwargs)
    assert modes == [expect_training]


def test_dict_output_keeps_other_keys_and_gradient_accumulation(trainer_kwargs):
    model = PerSampleRegressor(mode="dict")
    reference = copy.deepcopy(model)
    grads = GradCapture()
    fit(model, [LossHistory(), grads], trainer_kwargs, accumulate_grad_batches=2)
    it = iter(regression_loader())
    b1, b2 = next(it), next(it)
    # Lightning divides each micro-batch loss by 2: grad = (g(b1) + g(b2)) / 2
    g1 = expected_weighted_grad(reference, b1["x"], b1["y"], torch.ones(8))
    g2 = expected_weighted_grad(reference, b2["x"], b2["y"], torch.ones(8))
    for got, a, b in zip(grads.grads[0], g1, g2):
        assert torch.allclose(got, (a + b) / 2, atol=1e-6)


def test_scalar_loss_passes_through_without_per_sample_policy(trainer_kwargs):
    model = PerSampleRegressor(mode="scalar")
    trainer = fit(model, [SelectionEngine()], trainer_kwargs, max_steps=3)
    assert trainer.global_step == 3


def test_scalar_loss_with_per_sample_policy_names_policy_and_fix(trainer_kwargs):
    with pytest.raises(SelectionError, match=r"scalar loss, but LossHistory need\(s\) per-sample.*reduction='none'"):
        fit(PerSampleRegressor(mode="scalar"), [LossHistory()], trainer_kwargs)


def test_wrong_shape_loss_is_rejected(trainer_kwargs):
    class TwoD(PerSampleRegressor):
        def training_step(self, batch, batch_idx):
            return super().training_step(batch, batch_idx).unsqueeze(1).repeat(1, 2)

    with pytest.raises(SelectionError, match=r"shape \[8\], but got \(8, 2\)"):
        fit(TwoD(), [LossHistory()], trainer_kwargs)


def test_missing_index_is_a_clear_error(trainer_kwargs):
    ds = TensorDataset(torch.randn(16, 8), torch.randn(16))

    class TupleModel(PerSampleRegressor):
        def training_step(self, batch, batch_idx):
            return (self.net(batch[0]).squeeze(-1) - batch[1]) ** 2

    # the float labels are no longer taken as indices: no element of the tuple batch is marked (issue 7)
    with pytest.raises(KeyError, match=r"no marked sample indices.*IndexedDataset"):
        fit(TupleModel(), [LossHistory()], trainer_kwargs, loader=DataLoader(ds, batch_size=4))
    with pytest.raises(KeyError, match="IndexedDataset"):
        fit(PerSampleRegressor(), [LossHistory()], trainer_kwargs,
            loader=DataLoader([{"x": torch.randn(8), "y": torch.tensor(0.0)}] * 8, batch_size=4))


def test_tuple_batches_with_index(trainer_kwargs):
    from lightning_select import IndexedDataset

    ds = IndexedDataset(TensorDataset(torch.randn(16, 8), torch.randn(16)))

    class TupleModel(PerSampleRegressor):
        def training_step(self, batch, batch_idx):
            x, y, _ = batch
            return (self.net(x).squeeze(-1) - y) ** 2

    history = LossHistory()
    fit(TupleModel(), [KeepWhere(2, (0,)), history], trainer_kwargs, loader=DataLoader(ds, batch_size=4), max_steps=4)
    assert history.store.count.tolist() == [1, 0] * 8


def test_index_out_of_range_keeps_state(trainer_kwargs):
    history = LossHistory(num_samples=10)
    with pytest.raises(IndexError, match=r"outside \[0, 10\)"):
        fit(PerSampleRegressor(), [history], trainer_kwargs, loader=regression_loader(n=64, batch_size=16), max_steps=2)
    assert int(history.store.count.sum()) == 0


def test_nan_loss_raise_and_skip(trainer_kwargs):
    class NaNAtIndex3(PerSampleRegressor):
        def training_step(self, batch, batch_idx):
            losses = super().training_step(batch, batch_idx)
            return torch.where(batch["index"] == 3, torch.full_like(losses, float("nan")), losses)

    history = LossHistory()
    with pytest.raises(SelectionError, match=r"Non-finite loss.*\[3\].*nan_policy='skip'"):
        fit(NaNAtIndex3(), [history], trainer_kwargs)
    assert int(history.store.count.sum()) == 0  # nothing recorded

    model = NaNAtIndex3()
    reference = copy.deepcopy(model)
    history, grads = LossHistory(), GradCapture()
    with pytest.warns(RuntimeWarning, match=r"skipping 1 sample.*\[3\]"):
        fit(model, [SelectionEngine(nan_policy="skip"), history, grads], trainer_kwargs)
    batch = next(iter(regression_loader()))
    keep = batch["index"] != 3
    expected = expected_weighted_grad(reference, batch["x"][keep], batch["y"][keep], torch.ones(7))
    assert all(torch.allclose(g, e, atol=1e-6) for g, e in zip(grads.grads[0], expected))
    assert history.store.count[:8].tolist() == [1, 1, 1, 0, 1, 1, 1, 1]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_empty_selection_is_zero_loss_not_nan(trainer_kwargs):
    rec, grads = Recorder(), GradCapture()
    fit(PerSampleRegressor(), [KeepWhere(1000, (999,)), rec, grads], trainer_kwargs)
    assert rec.records[0]["has_samples"] is False
    assert rec.records[0]["weights"].sum().item() == 0
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads.grads[0])


def test_policy_order_is_deterministic(trainer_kwargs):
    calls = []

    class Tag(Recorder):
        def __init__(self, name, order):
            super().__init__()
            self.name, self.order = name, order

        def observe(self, ctx):
            calls.append(self.name)

    fit(PerSampleRegressor(), [Tag("late", 10), Tag("early", 1), Tag("tie_a", 5), Tag("tie_b", 5)], trainer_kwargs)
    assert calls == ["early", "tie_a", "tie_b", "late"]


def test_composed_selections_apply_in_order(trainer_kwargs):
    rec = Recorder()
    fit(PerSampleRegressor(), [KeepWhere(2, (0,), order=1), KeepWhere(3, (0,), order=2), rec], trainer_kwargs)
    assert rec.records[0]["indices"].tolist() == [0, 6]


def test_manual_optimization_fails_clearly(trainer_kwargs):
    class Manual(PerSampleRegressor):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

    with pytest.raises(SelectionError, match="automatic optimization"):
        fit(Manual(), [LossHistory()], trainer_kwargs)


def test_bf16_mixed_precision_keeps_per_sample_losses_fp32(trainer_kwargs):
    rec = Recorder()
    dm = DigitsPairsDataModule(batch_size=32)
    trainer = pl.Trainer(callbacks=[rec], max_steps=2, precision="bf16-mixed", limit_val_batches=0, **trainer_kwargs)
    trainer.fit(DigitsEmbeddingModule(), dm)
    assert rec.records and all(r["dtype"] == torch.float32 for r in rec.records)


def test_wrapper_is_removed_after_fit_and_not_doubled(trainer_kwargs):
    model = PerSampleRegressor()
    original = model.training_step
    fit(model, [LossHistory(), SelectionEngine(), Recorder()], trainer_kwargs)
    assert "training_step" not in model.__dict__
    assert model.training_step == original
    with pytest.raises(ValueError, match="at most one SelectionEngine"):
        fit(PerSampleRegressor(), [SelectionEngine(), SelectionEngine(), LossHistory()], trainer_kwargs)


def test_random_selection_is_reproducible(trainer_kwargs):
    runs = []
    for _ in range(2):
        policy = RandomHalf(seed=5)
        fit(PerSampleRegressor(), [policy], trainer_kwargs, max_steps=4)
        runs.append([s.tolist() for s in policy.selected])
    assert runs[0] == runs[1] and len(runs[0]) == 4
    assert len({tuple(s) for s in runs[0]}) > 1


def test_engine_logs_its_statistics(tmp_path, trainer_kwargs):
    from lightning.pytorch.loggers import CSVLogger

    kwargs = {**trainer_kwargs, "logger": CSVLogger(tmp_path), "log_every_n_steps": 1}
    trainer = fit(PerSampleRegressor(), [KeepWhere(2, (0,)), IndexWeights()], kwargs, max_steps=2)
    for key in ("select/kept_fraction", "select/weight_mean", "select/weight_ess_fraction", "select/loss_mean"):
        assert key in trainer.logged_metrics, key
    assert trainer.logged_metrics["select/kept_fraction"] == 0.5


def test_digits_retrieval_metrics_match_brute_force_with_negative_cosines():
    from lightning_select.models import retrieval_metrics

    torch.manual_seed(0)
    emb, labels = torch.randn(40, 3), torch.randint(0, 4, (40,))  # many negative cosines
    ours = retrieval_metrics(emb, labels)
    e = torch.nn.functional.normalize(emb, dim=-1)
    p1, aps = [], []
    for i in range(40):
        others = [j for j in range(40) if j != i]
        order = sorted(others, key=lambda j: -float(e[i] @ e[j]))
        rel = [bool(labels[j] == labels[i]) for j in order]
        if not any(rel):
            continue
        p1.append(float(rel[0]))
        hits, precisions = 0, []
        for rank, r in enumerate(rel, 1):
            if r:
                hits += 1
                precisions.append(hits / rank)
        aps.append(sum(precisions) / len(precisions))
    assert abs(float(ours["precision@1"]) - sum(p1) / len(p1)) < 1e-6
    assert abs(float(ours["map"]) - sum(aps) / len(aps)) < 1e-6
