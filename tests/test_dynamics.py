"""Training dynamics: the rules against numpy/loop formulas, the incremental store against a full replay,
TrainingDynamics in a real fit, its files, its memory, and every bad input (a clear error each)."""

import json
import math

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from sklearn.metrics import roc_auc_score

from lightning_select import SelectionError, TrainingDynamics, load_dynamics
from lightning_select.data import DigitsPairsDataModule
from lightning_select.data.noisy_labels import NoisyDigitsDataModule
from lightning_select.models import DigitsEmbeddingModule
from lightning_select.models.classifier import NoisyLabelClassifier
from lightning_select.rules.dynamics import (
    area_under_margin,
    aum_margin,
    cartography,
    cartography_from_sums,
    el2n,
    forgetting_events,
    predicted_correct,
    roc_auc,
    true_class_probability,
)
from lightning_select.stats.dynamics import DynamicsStore
from lightning_select.stats.dynamics_files import DiskTrace

FIT = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
           enable_model_summary=False, limit_val_batches=0)


def softmax_np(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


# ---------------------------------------------------------------------------- per-row rules
def test_per_row_rules_match_numpy_formulas():
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(50, 7, generator=g) * 3, torch.randint(0, 7, (50,), generator=g)
    z, t = logits.double().numpy(), y.numpy()
    p = softmax_np(z)
    onehot = np.eye(7)[t]
    others = np.where(onehot == 1, -np.inf, z).max(axis=1)
    np.testing.assert_allclose(true_class_probability(logits, y).numpy(), p[np.arange(50), t], rtol=1e-5)
    np.testing.assert_array_equal(predicted_correct(logits, y).numpy(), z.argmax(axis=1) == t)
    np.testing.assert_allclose(aum_margin(logits, y).numpy(), z[np.arange(50), t] - others, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(el2n(logits, y).numpy(), np.sqrt(((p - onehot) ** 2).sum(axis=1)), rtol=1e-5)


@pytest.mark.parametrize("rule", [true_class_probability, predicted_correct, aum_margin, el2n])
def test_per_row_rules_refuse_bad_shapes(rule):
    with pytest.raises(ValueError, match=r"`logits` of shape \[B, C\]"):
        rule(torch.zeros(4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"`targets` of shape \[3\]"):
        rule(torch.zeros(3, 5), torch.zeros(4, dtype=torch.long))


# ---------------------------------------------------------------------------- reductions over presentations
def random_history(n=40, e=9, seed=1):
    """[n, e] p(label), correct and margin with NaN where not presented (some rows never, some always)."""
    rng = np.random.default_rng(seed)
    p = rng.uniform(size=(n, e))
    correct = (rng.uniform(size=(n, e)) < 0.6).astype(float)
    correct[3] = 0.0  # never learned
    margin = rng.normal(size=(n, e))
    hide = rng.uniform(size=(n, e)) < 0.3
    hide[5] = True  # never presented
    hide[6] = False
    for a in (p, correct, margin):
        a[hide] = np.nan
    return p, correct, margin


def loop_forgetting(row):
    seq = [c for c in row if not math.isnan(c)]
    if not seq:
        return math.nan
    if not any(c == 1 for c in seq):
        return math.inf
    return float(sum(1 for a, b in zip(seq, seq[1:]) if a == 1 and b == 0))


def test_reductions_match_per_sample_loops():
    p, correct, margin = random_history()
    carto = cartography(torch.tensor(p), torch.tensor(correct))
    for i in range(p.shape[0]):
        seen = ~np.isnan(p[i])
        if not seen.any():
            assert all(math.isnan(float(carto[k][i])) for k in carto)
            assert math.isnan(float(area_under_margin(torch.tensor(margin))[i]))
            continue
        assert float(carto["confidence"][i]) == pytest.approx(np.mean(p[i][seen]), abs=1e-12)
        assert float(carto["variability"][i]) == pytest.approx(np.std(p[i][seen], ddof=0), abs=1e-12)
        assert float(carto["correctness"][i]) == pytest.approx(np.mean(correct[i][seen]), abs=1e-12)
    aum = area_under_margin(torch.tensor(margin)).numpy()
    np.testing.assert_allclose(aum, [np.mean(r[~np.isnan(r)]) if (~np.isnan(r)).any() else np.nan for r in margin])
    forgetting = forgetting_events(torch.tensor(correct)).numpy()
    np.testing.assert_array_equal(forgetting, [loop_forgetting(r) for r in correct])
    assert forgetting[3] == math.inf and math.isnan(forgetting[5])


def test_cartography_from_running_sums_equals_the_matrix_formula():
    p, correct, _ = random_history(seed=2)
    seen = ~np.isnan(p)
    sums = cartography_from_sums(torch.tensor(seen.sum(1)), torch.tensor(np.nansum(p, 1)),
                                 torch.tensor(np.nansum(p ** 2, 1)), torch.tensor(np.nansum(correct, 1)))
    full = cartography(torch.tensor(p), torch.tensor(correct))
    for key in full:
        torch.testing.assert_close(sums[key], full[key], equal_nan=True, rtol=0, atol=1e-12)


def test_roc_auc_matches_scikit_learn_with_ties_and_infinities():
    rng = np.random.default_rng(0)
    labels = rng.uniform(size=300) < 0.3
    scores = np.round(rng.normal(size=300) + labels, 1)  # rounding makes many ties
    scores[:20] = np.inf
    scores[20:30] = -np.inf
    ours = roc_auc(torch.tensor(scores), torch.tensor(labels))
    assert ours == pytest.approx(roc_auc_score(labels, np.nan_to_num(scores, posinf=1e9, neginf=-1e9)), abs=1e-12)
    assert roc_auc(torch.tensor([3.0, 1.0]), torch.tensor([1, 0])) == 1.0


def test_roc_auc_refuses_nan_and_a_missing_class():
    with pytest.raises(ValueError, match="NaN scores"):
        roc_auc(torch.tensor([0.1, float("nan")]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="both classes, but got 0 positives"):
        roc_auc(torch.tensor([0.1, 0.2]), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="one label per score"):
        roc_auc(torch.tensor([0.1, 0.2]), torch.tensor([0]))


# ---------------------------------------------------------------------------- the incremental store
def test_store_matches_a_full_replay_with_skips_duplicates_and_el2n_epoch():
    n, classes, epochs = 25, 4, 6
    g = torch.Generator().manual_seed(3)
    store = DynamicsStore(n, el2n_epoch=2, trace_epochs=3)
    per_sample: dict[int, list] = {i: [] for i in range(n)}  # (epoch, p, correct, margin, el2n, label)
    for epoch in range(epochs):
        order = torch.randperm(n, generator=g)[: int(n * 0.8)]  # a fifth of the samples skipped each epoch
        for chunk in order.split(6):
            idx = torch.cat([chunk, chunk[:1]])  # a repeated index in the step: counted once, its first row
            logits, y = torch.randn(idx.numel(), classes, generator=g) * 2, torch.randint(0, classes, (idx.numel(),),
                                                                                          generator=g)
            y[-1] = y[0]
            store.update(idx, logits, y, epoch)
            z, t = logits.double().numpy(), y.numpy()
            p = softmax_np(z)
            for k, i in enumerate(chunk.tolist()):
                others = np.delete(z[k], t[k]).max()
                per_sample[i].append((epoch, p[k, t[k]], float(z[k].argmax() == t[k]), z[k, t[k]] - others,
                                      np.linalg.norm(p[k] - np.eye(classes)[t[k]]), t[k]))
    stats = store.statistics()
    for i, rows in per_sample.items():
        if not rows:
            assert math.isnan(float(stats["confidence"][i])) and int(stats["presentations"][i]) == 0
            continue
        ps = np.array([r[1] for r in rows])
        assert int(stats["presentations"][i]) == len(rows) == int(stats["epochs_seen"][i])
        assert float(stats["confidence"][i]) == pytest.approx(ps.mean(), abs=1e-6)
        assert float(stats["variability"][i]) == pytest.approx(ps.std(), abs=1e-6)
        assert float(stats["correctness"][i]) == pytest.approx(np.mean([r[2] for r in rows]), abs=1e-12)
        assert float(stats["forgetting_events"][i]) == loop_forgetting([r[2] for r in rows])
        assert float(stats["aum"][i]) == pytest.approx(np.mean([r[3] for r in rows]), abs=1e-5)
        early = [r[4] for r in rows if r[0] <= 2]
        assert (math.isnan(float(stats["el2n"][i])) and not early) or float(stats["el2n"][i]) == pytest.approx(early[-1], abs=1e-5)
        assert int(stats["label"][i]) == rows[-1][5]
    trace_epochs, trace = store.table.trace("p_true")
    assert trace_epochs.tolist() == [3, 4, 5]
    for i, rows in per_sample.items():
        for k, e in enumerate(trace_epochs.tolist()):
            ref = [r[1] for r in rows if r[0] == e]
            assert (not ref and math.isnan(float(trace[i, k]))) or float(trace[i, k]) == pytest.approx(ref[0], abs=1e-6)


def test_memory_per_sample_is_measured_and_bounded():
    assert DynamicsStore(1000).bytes_per_sample() == 60  # the documented columns, measured on the tensors
    assert DynamicsStore(1000, trace_epochs=5).bytes_per_sample() == 60 + 5 * 4  # capped in-memory trace
    store = DynamicsStore(1000)  # a disk trace adds nothing in memory, whatever the number of epochs
    for epoch in range(30):
        store.update(torch.arange(1000), torch.randn(1000, 3), torch.zeros(1000, dtype=torch.long), epoch)
    assert store.bytes_per_sample() == 60


def test_disk_trace_grows_per_epoch_and_truncates_to_a_checkpoint(tmp_path):
    trace = DiskTrace(tmp_path / "t.f32", num_samples=4)
    trace.write(np.array([0, 3]), np.array([0.1, 0.2], np.float32), epoch=0)
    trace.write(np.array([1]), np.array([0.5], np.float32), epoch=2)
    full = trace.read()
    assert full.shape == (4, 3) and full[3, 0] == np.float32(0.2) and full[1, 2] == 0.5 and np.isnan(full[1, 1])
    trace.to_npy(tmp_path / "t.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "t.npy"), full)
    resumed = DiskTrace(tmp_path / "t.f32", num_samples=4, epochs=1)  # a checkpoint taken in epoch 0
    assert resumed.read().shape == (4, 1)
    with pytest.raises(FileNotFoundError, match="trace_dir must be kept with the run's checkpoints"):
        DiskTrace(tmp_path / "t.f32", num_samples=4, epochs=5)


# ---------------------------------------------------------------------------- TrainingDynamics in a fit
class LogitsRecorder(pl.Callback):
    """Independent reference: each step's indices, labels and training-pass logits, from the step's outputs."""

    def __init__(self):
        self.steps = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append((trainer.current_epoch, batch["index"].clone(), batch["label"].clone(),
                           outputs["logits"].detach().clone(), batch["clean_label"].clone()))


def fit_dynamics(max_epochs, tmp_path=None, **options):
    pl.seed_everything(0)
    dynamics, recorder = TrainingDynamics(**options), LogitsRecorder()
    dm = NoisyDigitsDataModule(batch_size=128)
    pl.Trainer(max_epochs=max_epochs, callbacks=[dynamics, recorder], **FIT).fit(
        NoisyLabelClassifier(arch="mlp", hidden=32, lr=3e-3), dm)
    return dynamics, recorder, dm


def test_fit_statistics_equal_a_numpy_replay_of_the_training_logits_and_find_the_noise(tmp_path):
    epochs = 6
    dynamics, recorder, dm = fit_dynamics(epochs, trace_dir=str(tmp_path / "trace"),
                                          export_path=str(tmp_path / "training_dynamics.parquet"))
    n = len(dm.train_set)
    p = np.full((n, epochs), np.nan)
    correct, margin = p.copy(), p.copy()
    for epoch, idx, y, logits, _ in recorder.steps:
        z, t, i = logits.double().numpy(), y.numpy(), idx.numpy()
        prob = softmax_np(z)
        p[i, epoch] = prob[np.arange(len(t)), t]
        correct[i, epoch] = z.argmax(1) == t
        margin[i, epoch] = z[np.arange(len(t)), t] - np.where(np.eye(10)[t] == 1, -np.inf, z).max(1)
    stats = dynamics.statistics()
    np.testing.assert_allclose(stats["confidence"].numpy(), p.mean(1), atol=1e-6)
    np.testing.assert_allclose(stats["variability"].numpy(), p.std(1), atol=1e-6)
    np.testing.assert_allclose(stats["aum"].numpy(), margin.mean(1), atol=1e-5)
    np.testing.assert_array_equal(stats["forgetting_events"].numpy(), [loop_forgetting(r) for r in correct])
    # the on-disk trace holds every epoch
    table, meta = load_dynamics(tmp_path, num_samples=n)
    trace = np.load(tmp_path / meta["trace_file"])
    np.testing.assert_allclose(trace, p, atol=1e-6)
    assert meta["trace_epochs"] == list(range(epochs)) and meta["num_samples"] == n and meta["epochs"] == epochs
    assert meta["dataset"] == "NoisyDigitsDataModule" and meta["seed"] == 0 and meta["bytes_per_sample"] == 60
    assert all(meta["statistics"][k]["available"] for k in ("aum", "confidence", "el2n", "noisy"))
    assert list(table.columns) == ["index", "confidence", "variability", "correctness", "forgetting_events", "aum",
                                   "el2n", "epochs_seen", "presentations", "label", "noisy"]
    np.testing.assert_array_equal(table["noisy"].to_numpy(), dm.train_noisy_mask.numpy())
    np.testing.assert_array_equal(table["aum"].to_numpy(), stats["aum"].numpy())
    # low AUM ranks the truly mislabelled samples (symmetric 30% noise on digits)
    assert roc_auc(-torch.tensor(table["aum"].to_numpy()), torch.tensor(table["noisy"].to_numpy())) > 0.9


def test_metadata_says_why_a_statistic_is_unavailable(tmp_path):
    pl.seed_everything(0)
    dynamics = TrainingDynamics(export_path=str(tmp_path / "td.csv"))
    dm = NoisyDigitsDataModule(batch_size=256)
    dm.setup("fit")
    pl.Trainer(max_epochs=1, callbacks=[dynamics], **FIT).fit(NoisyLabelClassifier(arch="mlp", hidden=8),
                                                               train_dataloaders=dm.train_dataloader())
    table, meta = load_dynamics(tmp_path / "td.csv")
    assert "noisy" not in table and not meta["statistics"]["noisy"]["available"]
    assert "train_noisy_mask" in meta["statistics"]["noisy"]["reason"] and meta["trace_file"] is None
    assert meta["el2n_epoch"] == 0  # a run shorter than el2n_epoch keeps its last epoch's EL2N


# ---------------------------------------------------------------------------- bad input
def test_statistics_asked_of_a_run_that_logged_no_logits():
    class LossOnly(NoisyLabelClassifier):
        def training_step(self, batch, batch_idx):
            return super().training_step(batch, batch_idx)["loss"]

    with pytest.raises(SelectionError, match="statistics asked of a run that logged no logits") as err:
        pl.Trainer(max_steps=1, callbacks=[TrainingDynamics()], **FIT).fit(LossOnly(arch="mlp", hidden=8),
                                                                        NoisyDigitsDataModule(batch_size=32))
    message = str(err.value)
    assert all(name in message for name in ("confidence", "forgetting_events", "aum", "el2n", "unavailable"))
    assert "'logits': logits" in message


def test_contrastive_module_points_to_dbpm():
    with pytest.raises(SelectionError, match="EmbeddingOutput.*use DBPM"):
        pl.Trainer(max_steps=1, callbacks=[TrainingDynamics()], **FIT).fit(DigitsEmbeddingModule(hidden=8, dim=4),
                                                                        DigitsPairsDataModule(batch_size=32))


def test_missing_targets_name_the_key():
    with pytest.raises(SelectionError, match=r"target_key='y'.*under 'y'"):
        pl.Trainer(max_steps=1, callbacks=[TrainingDynamics(target_key="y")], **FIT).fit(
            NoisyLabelClassifier(arch="mlp", hidden=8), NoisyDigitsDataModule(batch_size=32))


@pytest.mark.parametrize("options, match", [
    (dict(trace_epochs=3, trace_dir="x"), "choose one of them"),
    (dict(export_path="x.npz"), "end in .parquet or .csv"),
    (dict(el2n_epoch=-1), "`el2n_epoch` >= 0"),
    (dict(trace_epochs="4"), "`trace_epochs` to be an integer"),
    (dict(num_samples=0), "`num_samples` >= 1"),
])
def test_options_are_validated_with_their_name(options, match):
    with pytest.raises((ValueError, TypeError), match=match):
        TrainingDynamics(**options)


def test_resuming_a_history_of_a_different_dataset_size(tmp_path):
    pl.seed_everything(0)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    pl.Trainer(max_epochs=1, callbacks=[TrainingDynamics(), ckpt], **{**FIT, "enable_checkpointing": True}).fit(
        NoisyLabelClassifier(arch="mlp", hidden=8), NoisyDigitsDataModule(batch_size=256))
    other = NoisyDigitsDataModule(batch_size=256, holdout_fraction=0.1)  # 1293 training samples, not 1149
    with pytest.raises(SelectionError, match="tracks 1149 samples but the training set has 1293.*different dataset size"):
        pl.Trainer(max_epochs=2, callbacks=[TrainingDynamics()], **FIT).fit(
            NoisyLabelClassifier(arch="mlp", hidden=8), other, ckpt_path=tmp_path / "last.ckpt")


def test_load_dynamics_refuses_a_directory_with_no_history_and_another_dataset_size(tmp_path):
    (tmp_path / "loss_history.parquet").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="No training dynamics in this run directory.*loss_history.parquet"):
        load_dynamics(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dynamics(tmp_path / "missing")
    fit_dynamics(1, export_path=str(tmp_path / "run" / "training_dynamics.parquet"))
    table, _ = load_dynamics(tmp_path / "run", num_samples=1149)
    assert len(table) == 1149
    with pytest.raises(ValueError, match="cover 1149 samples, but the dataset has 50000.*other data"):
        load_dynamics(tmp_path / "run", num_samples=50000)
    meta = json.loads((tmp_path / "run" / "training_dynamics.json").read_text())
    (tmp_path / "run" / "training_dynamics.json").write_text(json.dumps({**meta, "num_samples": 7}))
    with pytest.raises(ValueError, match="records 7 samples: the files come from different runs"):
        load_dynamics(tmp_path / "run")


def test_a_down_sampled_copy_keeps_its_rows_trace_and_dataset_size(tmp_path):
    from lightning_select.stats import subsample_dynamics

    fit_dynamics(2, trace_epochs=2, export_path=str(tmp_path / "run" / "training_dynamics.parquet"))
    full, meta = load_dynamics(tmp_path / "run")
    path = subsample_dynamics(tmp_path / "run", tmp_path / "small" / "training_dynamics.parquet", rows=100, seed=3)
    small, small_meta = load_dynamics(path.parent, num_samples=1149)  # the dataset size is the run's, not 100
    keep = small["index"].to_numpy()
    assert len(small) == 100 and small_meta["subsample"] == {"rows": 100, "seed": 3} and (np.diff(keep) > 0).all()
    np.testing.assert_allclose(small["aum"].to_numpy(), full["aum"].to_numpy()[keep], rtol=1e-6)
    trace = np.load(path.parent / small_meta["trace_file"])
    np.testing.assert_array_equal(trace, np.load(tmp_path / "run" / meta["trace_file"])[keep])
    with pytest.raises(ValueError, match="cover 1149 samples, but the dataset has 100"):
        load_dynamics(path.parent, num_samples=100)
    with pytest.raises(ValueError, match=r"`rows` in \[1, 1149\]"):
        subsample_dynamics(tmp_path / "run", tmp_path / "x.parquet", rows=0)
