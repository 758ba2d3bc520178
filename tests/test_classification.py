"""The classification harness with label noise: noisy digits, CIFAR-10N, the classifier and SelectionAudit.

Tests marked ``data`` read ``classification/cifar10`` from the shared data folder (``../shared/data``
or ``$LIGHTNING_SELECT_DATA``). Outside CI they skip when it is missing; with ``CI`` set they fail.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from helpers import KeepTopLoss, RandomHalf
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from lightning_select import ResumableDataLoader, SelectionAudit, SelectionEngine, SelectionError, SelectionPolicy
from lightning_select.data import noisy_labels
from lightning_select.data.files import DATA_ENV_VAR, resolve_data_dir
from lightning_select.data.noisy_labels import (
    CIFAR10_IMAGES,
    Cifar10NDataModule,
    NoisyDigitsDataModule,
    inject_symmetric_noise,
)
from lightning_select.models.classifier import NoisyLabelClassifier

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def digits():
    dm = NoisyDigitsDataModule(batch_size=64, noise_rate=0.3, seed=0)
    dm.setup("fit")
    return dm


# ------------------------------------------------------------------------------------- label noise
def test_symmetric_noise_rate_is_exact_and_wrong_labels_are_uniform():
    clean = torch.arange(10).repeat(3000)
    noisy = inject_symmetric_noise(clean, 0.3, 10, torch.Generator().manual_seed(0))
    flipped = noisy != clean
    assert int(flipped.sum()) == 9000  # exactly round(rate * N)
    shift = Counter(((noisy[flipped] - clean[flipped]) % 10).tolist())
    assert sorted(shift) == list(range(1, 10))  # never the true class, every other class reachable
    assert max(shift.values()) / min(shift.values()) < 1.15  # uniform over the 9 wrong classes (1000 each)
    assert torch.equal(noisy, inject_symmetric_noise(clean, 0.3, 10, torch.Generator().manual_seed(0)))
    assert torch.equal(inject_symmetric_noise(clean, 0.0, 10, torch.Generator()), clean)
    with pytest.raises(ValueError, match="noise_rate"):
        inject_symmetric_noise(clean, 1.0, 10, torch.Generator())


def test_noisy_digits_noise_rate_and_determinism_per_seed(digits):
    pool_noisy = torch.cat([digits.train_noisy_mask, digits.holdout_set.dataset.labels
                            != digits.holdout_set.dataset.clean_labels])
    assert int(pool_noisy.sum()) == round(0.3 * 1437)  # the pool holds exactly the requested rate
    assert abs(float(digits.train_noisy_mask.float().mean()) - 0.3) < 0.03
    assert torch.equal(digits.train_noisy_mask, digits.train_labels != digits.train_clean_labels)
    assert digits.train_noisy_mask.dtype == torch.bool and digits.num_classes == 10

    again = NoisyDigitsDataModule(noise_rate=0.3, seed=0)
    again.setup()
    assert torch.equal(again.train_labels, digits.train_labels)
    other_noise = NoisyDigitsDataModule(noise_rate=0.3, seed=0, noise_seed=1)
    other_noise.setup()
    assert torch.equal(other_noise.train_clean_labels, digits.train_clean_labels)  # same split
    assert not torch.equal(other_noise.train_labels, digits.train_labels)  # other noise
    clean = NoisyDigitsDataModule(noise_rate=0.0)
    clean.setup()
    assert not bool(clean.train_noisy_mask.any())
    with pytest.raises(ValueError, match="noise_rate"):
        NoisyDigitsDataModule(noise_rate=0.95)
    with pytest.raises(ValueError, match="holdout_fraction"):
        NoisyDigitsDataModule(holdout_fraction=1.0)


def test_noisy_digits_splits_are_disjoint_and_stratified(digits):
    src = digits.source_index
    sizes = {k: v.numel() for k, v in src.items()}
    assert sizes == {"train": 1149, "holdout": 288, "test": 360}
    together = torch.cat(list(src.values()))
    assert together.unique().numel() == 1797  # disjoint and covering
    from sklearn.datasets import load_digits

    target = torch.as_tensor(load_digits().target)
    overall = torch.bincount(target, minlength=10).double() / target.numel()
    for name, split in (("train", digits.train_set), ("holdout", digits.holdout_set), ("test", digits.test_set)):
        table = split.dataset
        assert torch.equal(table.clean_labels, target[src[name]])  # the clean labels are the dataset's
        share = torch.bincount(table.clean_labels, minlength=10).double() / len(table)
        assert float((share - overall).abs().max()) < 0.01, name  # stratified by class
    assert torch.equal(digits.test_set.dataset.labels, digits.test_set.dataset.clean_labels)  # clean test


def test_batches_carry_keys_and_aligned_indices(digits):
    ds = digits.train_set
    for i in (0, 17, len(ds) - 1):
        item = ds[i]
        assert item["index"] == i and int(item["label"]) == int(digits.train_labels[i])
        assert int(item["clean_label"]) == int(digits.train_clean_labels[i])

    loader = digits.train_dataloader()
    assert isinstance(loader, ResumableDataLoader)
    batch = next(iter(loader))
    assert sorted(batch) == ["clean_label", "image", "index", "label"]
    assert batch["image"].shape == (64, 64) and batch["image"].dtype == torch.float32
    assert batch["label"].dtype == torch.long and batch["clean_label"].dtype == torch.long
    idx = batch["index"]
    assert not torch.equal(idx, torch.arange(64))  # shuffled
    assert torch.equal(batch["label"], digits.train_labels[idx])
    assert torch.equal(batch["clean_label"], digits.train_clean_labels[idx])
    assert torch.equal(batch["image"], ds.dataset.images[idx])

    scored = torch.cat([b["index"] for b in digits.scoring_dataloader(batch_size=500)])
    assert torch.equal(scored, torch.arange(len(ds)))  # index order, every sample once
    holdout = next(iter(digits.holdout_dataloader()))
    assert holdout["index"].numel() == 288 and sorted(holdout) == sorted(batch)
    val = next(iter(digits.val_dataloader()))
    assert torch.equal(val["label"], val["clean_label"])


def test_train_loader_resumes_mid_epoch_exactly(digits):
    loader = digits.train_dataloader()
    loader.sampler.set_epoch(3)
    full = [b["index"] for b in loader]
    it = iter(loader)
    next(it), next(it)
    state = loader.state_dict()
    fresh = NoisyDigitsDataModule(batch_size=64, noise_rate=0.3, seed=0)
    fresh.setup()
    resumed = fresh.train_dataloader()
    resumed.sampler.set_epoch(3)
    resumed.load_state_dict(state)
    rest = [b["index"] for b in resumed]
    assert len(rest) == len(full) - 2 and all(torch.equal(a, b) for a, b in zip(full[2:], rest))


# ------------------------------------------------------------------------------------- classifier
class LogitsProbe(SelectionPolicy):
    """Reads the logits the way policies do (``ctx.output_field``)."""

    order = 960

    def __init__(self):
        self.shapes = []

    def observe(self, ctx):
        logits = ctx.output_field("logits")
        self.shapes.append(None if logits is None else (tuple(logits.shape), logits.requires_grad))


def test_classifier_reaches_clean_accuracy_under_30_percent_noise(tmp_path):
    pl.seed_everything(0)
    probe = LogitsProbe()
    model = NoisyLabelClassifier(arch="mlp", hidden=128, lr=3e-3, weight_decay=0.01, cosine_schedule=True)
    trainer = pl.Trainer(callbacks=[SelectionEngine(), probe], accelerator="cpu", devices=1, max_epochs=6,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(model, NoisyDigitsDataModule(noise_rate=0.3, seed=0))
    assert float(trainer.callback_metrics["heldout/accuracy"]) > 0.8
    assert 0 < float(trainer.callback_metrics["heldout/loss"]) < 2.3
    assert probe.shapes[0] == ((64, 10), False) and len(probe.shapes) == 6 * 18
    config = trainer.lr_scheduler_configs[0]
    assert config.interval == "step" and config.scheduler.T_max == 6 * 18  # cosine over every optimizer step
    assert trainer.optimizers[0].param_groups[0]["lr"] < 1e-6  # decayed to ~0 at the last step


def test_classifier_plain_loss_runs_on_a_stock_trainer_and_cnn_shapes():
    pl.seed_everything(0)
    model = NoisyLabelClassifier(arch="mlp", hidden=16, plain_loss=True)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_train_batches=3,
                         limit_val_batches=1)
    trainer.fit(model, NoisyDigitsDataModule())
    assert "heldout/accuracy" in trainer.callback_metrics
    cnn = NoisyLabelClassifier(arch="cnn", width=32)
    assert 80_000 < sum(p.numel() for p in cnn.parameters()) < 120_000
    out = cnn.training_step({"image": torch.randn(4, 3, 32, 32), "label": torch.arange(4)}, 0)
    assert out["loss"].shape == (4,) and out["logits"].shape == (4, 10) and not out["logits"].requires_grad
    assert cnn(torch.randn(2, 3, 16, 16)).shape == (2, 10)
    with pytest.raises(ValueError, match="arch"):
        NoisyLabelClassifier(arch="resnet")


# ------------------------------------------------------------------------------------- SelectionAudit
def _audit_fit(tmp_path, policies, max_epochs, name="run", ckpt_path=None, logger=False):
    pl.seed_everything(0)
    audit = SelectionAudit(datamodule_attr="train_noisy_mask")
    checkpoint = ModelCheckpoint(dirpath=tmp_path / name, save_last=True, save_top_k=0)
    trainer = pl.Trainer(callbacks=[SelectionEngine(), *policies, audit, checkpoint], accelerator="cpu", devices=1,
                         max_epochs=max_epochs, logger=logger, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, log_every_n_steps=2)
    trainer.fit(NoisyLabelClassifier(hidden=32), NoisyDigitsDataModule(batch_size=128), ckpt_path=ckpt_path)
    return trainer, audit


def test_audit_ratio_is_one_under_uniform_selection_and_resume_is_exact(tmp_path):
    _, audit = _audit_fit(tmp_path, [RandomHalf(seed=3)], 4, "full", logger=CSVLogger(tmp_path))
    totals = audit.totals
    assert int(totals["rows"]) == 4 * sum(max(1, n // 2) for n in [128] * 8 + [1149 - 8 * 128])
    assert abs(audit.base_rate - 0.3) < 0.03
    assert abs(audit.ratio - 1.0) < 0.1 and abs(audit.weighted_ratio - audit.ratio) < 1e-9
    assert abs(audit.share - int(totals["mislabelled"]) / int(totals["rows"])) < 1e-12
    import pandas as pd

    logged = pd.read_csv(next(tmp_path.glob("lightning_logs/*/metrics.csv")))
    for column in ("audit/mislabelled_share", "audit/mislabelled_ratio", "audit/epoch_mislabelled_ratio"):
        assert logged[column].notna().sum() > 0, column
    assert abs(logged["audit/epoch_mislabelled_ratio"].dropna().mean() - 1.0) < 0.1

    _audit_fit(tmp_path, [RandomHalf(seed=3)], 2, "part")
    _, resumed = _audit_fit(tmp_path, [RandomHalf(seed=3)], 4, "resumed", ckpt_path=tmp_path / "part" / "last.ckpt")
    for key, value in audit.totals.items():
        assert torch.equal(value, resumed.totals[key]), key

    fresh = SelectionAudit(noisy_mask=audit.noisy_mask.cpu())
    fresh.load_state_dict(audit.state_dict())
    assert fresh.state_dict().keys() == audit.state_dict().keys()
    assert all(torch.equal(fresh.totals[k], v) for k, v in audit.totals.items()) and fresh.ratio == audit.ratio


def test_audit_sees_a_policy_that_seeks_high_loss(tmp_path):
    # keeping the highest-loss quarter of a trained model's batches favours the mislabelled samples
    _, audit = _audit_fit(tmp_path, [KeepTopLoss(k=32)], 3)
    assert audit.ratio > 1.15, audit.ratio  # 1.28 here; uniform gives 1


def test_audit_options_and_resume_checks(tmp_path):
    with pytest.raises(ValueError, match="exactly one"):
        SelectionAudit()
    with pytest.raises(ValueError, match="exactly one"):
        SelectionAudit(noisy_mask=torch.zeros(3, dtype=torch.bool), datamodule_attr="train_noisy_mask")
    with pytest.raises(TypeError, match="bool tensor"):
        SelectionAudit(noisy_mask=torch.zeros(3))
    with pytest.raises(TypeError, match="datamodule_attr"):
        SelectionAudit(datamodule_attr=3)
    audit = SelectionAudit(noisy_mask=torch.tensor([True, False, False, False]))
    assert audit.base_rate == 0.25 and np.isnan(audit.ratio)
    # a mask that does not fit the training set: refused at the first step, naming the mask
    small = SelectionAudit(noisy_mask=torch.zeros(10, dtype=torch.bool))
    with pytest.raises(IndexError, match="out of range"):
        pl.Trainer(callbacks=[SelectionEngine(), small], max_steps=1, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0).fit(
            NoisyLabelClassifier(hidden=8), NoisyDigitsDataModule())
    # resuming against other data is refused
    restored = SelectionAudit(noisy_mask=torch.zeros(1149, dtype=torch.bool))
    restored.load_state_dict({**SelectionAudit(noisy_mask=torch.ones(5, dtype=torch.bool)).state_dict()})
    with pytest.raises(SelectionError, match="resume with the same data"):
        pl.Trainer(callbacks=[SelectionEngine(), restored], max_steps=1, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0).fit(
            NoisyLabelClassifier(hidden=8), NoisyDigitsDataModule())


def test_audit_datamodule_without_mask_is_refused():
    from lightning_select.data import DigitsPairsDataModule
    from lightning_select.models import DigitsEmbeddingModule

    audit = SelectionAudit(datamodule_attr="train_noisy_mask")
    with pytest.raises(SelectionError, match="has no such attribute"):
        pl.Trainer(callbacks=[audit], max_steps=1, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0).fit(
            DigitsEmbeddingModule(hidden=8, dim=4), DigitsPairsDataModule())


# ------------------------------------------------------------------------------------- Hydra
def _compose(overrides):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def test_hydra_digits_noisy_with_audit_prints_accuracy(tmp_path, capsys):
    from lightning_select.cli import run

    cfg = _compose(["experiment=digits_noisy", "+selector=[selection_audit,loss_history]", "trainer.max_epochs=2",
                    f"paths.output_dir={tmp_path}", "callbacks=none"])
    metrics = run(cfg)
    assert 0.5 < metrics["heldout/accuracy"] <= 1.0
    final = [line for line in capsys.readouterr().out.splitlines() if "final held-out metrics" in line]
    assert len(final) == 1 and "heldout/accuracy=" in final[0]
    import pandas as pd

    logged = pd.read_csv(next(tmp_path.glob("csv/*/metrics.csv")))
    assert logged["audit/mislabelled_ratio"].notna().sum() > 0


def test_hydra_cifar10n_experiments_compose():
    from omegaconf import OmegaConf

    cpu = _compose(["experiment=cifar10n_cpu", "paths.data_dir=/somewhere/data"])
    assert cpu.data.data_dir == "/somewhere/data"  # from ${paths.data_dir}
    assert (cpu.data.label_set, cpu.data.train_subset, cpu.data.image_size) == ("worse", 10000, 16)
    assert cpu.model.arch == "cnn"
    gpu = _compose(["experiment=cifar10n_gpu"])
    assert (gpu.data.train_subset, gpu.data.image_size, gpu.trainer.max_epochs) == (None, 32, 15)
    assert gpu.trainer.accelerator == "gpu" and gpu.trainer.precision == "16-mixed"
    cfg = _compose(["data=cifar10n", "model=classifier_cnn", "+selector=selection_audit"])
    resolved = OmegaConf.to_container(cfg.data, resolve=True)
    assert resolved["data_dir"] == str(cfg.paths.data_dir) and resolved["label_set"] == "worse"
    assert cfg.selector.selection_audit.datamodule_attr == "train_noisy_mask"


# ------------------------------------------------------------------------------------- CIFAR-10N
def test_cifar10n_missing_file_names_the_folder_and_env_var(tmp_path):
    dm = Cifar10NDataModule(data_dir=tmp_path, progress=False)
    with pytest.raises(FileNotFoundError) as err:
        dm.setup()
    assert str(tmp_path) in str(err.value) and DATA_ENV_VAR in str(err.value) and CIFAR10_IMAGES in str(err.value)
    with pytest.raises(ValueError, match="label_set"):
        Cifar10NDataModule(label_set="noisy")
    with pytest.raises(ValueError, match="image_size"):
        Cifar10NDataModule(image_size=2)


def _cifar_dir() -> Path:
    """The shared data folder: ``$LIGHTNING_SELECT_DATA``, else ``../shared/data`` next to the repository."""
    root = resolve_data_dir(None) if os.environ.get(DATA_ENV_VAR) else ROOT.parent / "shared" / "data"
    if not (root / CIFAR10_IMAGES).is_file():
        msg = (f"This test needs {root / 'classification/cifar10'}. Put the shared data folder at ../shared/data "
               f"next to the repository or set {DATA_ENV_VAR}.")
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return root


@pytest.fixture(scope="module")
def cifar_small():
    root = _cifar_dir()
    dm = Cifar10NDataModule(data_dir=root, label_set="worse", train_subset=512, test_subset=256, image_size=16,
                            batch_size=32, progress=False)
    dm.setup()
    return dm


@pytest.mark.data
def test_cifar10n_subset_shapes_noise_and_alignment(cifar_small):
    dm = cifar_small
    assert (len(dm.train_set), len(dm.holdout_set), len(dm.test_set)) == (409, 103, 256)
    batch = next(iter(dm.train_dataloader()))
    assert sorted(batch) == ["clean_label", "image", "index", "label"]
    assert batch["image"].shape == (32, 3, 16, 16) and batch["image"].dtype == torch.float32
    assert torch.equal(batch["label"], dm.train_labels[batch["index"]])
    assert abs(float(batch["image"].mean())) < 0.5 and 0.5 < float(batch["image"].std()) < 1.5  # normalised
    pool_noise = torch.cat([dm.train_noisy_mask, dm.holdout_set.dataset.labels != dm.holdout_set.dataset.clean_labels])
    assert abs(float(pool_noise.float().mean()) - 0.402) < 0.08  # CIFAR-10N "worse"
    with np.load(_cifar_dir() / CIFAR10_IMAGES) as f:
        train_labels, test_labels = torch.as_tensor(f["train_labels"]), torch.as_tensor(f["test_labels"])
    assert torch.equal(dm.train_clean_labels, train_labels[dm.source_index["train"]])
    assert torch.equal(dm.holdout_set.dataset.clean_labels, train_labels[dm.source_index["holdout"]])
    assert torch.equal(dm.test_set.dataset.labels, test_labels[dm.source_index["test"]])
    assert set(dm.source_index["train"].tolist()).isdisjoint(dm.source_index["holdout"].tolist())
    assert torch.bincount(dm.test_set.dataset.labels, minlength=10).min() >= 25  # stratified subset
    assert dm.classes[0] == "airplane" and dm.num_classes == 10


@pytest.mark.data
def test_cifar10n_label_sets_and_pixels_match_pillow(cifar_small):
    from PIL import Image

    root = _cifar_dir()
    clean = Cifar10NDataModule(data_dir=root, label_set="clean", train_subset=512, test_subset=256, image_size=32,
                               progress=False)
    clean.setup()
    assert not bool(clean.train_noisy_mask.any())
    assert torch.equal(clean.source_index["train"], cifar_small.source_index["train"])  # same seeded subset
    with np.load(root / CIFAR10_IMAGES) as f:
        i = int(clean.source_index["train"][5])
        jpeg = f["train_jpeg"][f["train_offsets"][i]: f["train_offsets"][i + 1]].tobytes()
    import io

    pixels = torch.as_tensor(np.array(Image.open(io.BytesIO(jpeg)).convert("RGB"))).permute(2, 0, 1).float() / 255
    mean = torch.tensor(noisy_labels.CIFAR10_MEAN).view(3, 1, 1)
    std = torch.tensor(noisy_labels.CIFAR10_STD).view(3, 1, 1)
    assert torch.allclose(clean.train_set[5]["image"], (pixels - mean) / std, atol=1e-5)


@pytest.mark.data
def test_cifar10n_disk_cache_is_used_and_checked(tmp_path, monkeypatch):
    root = _cifar_dir()
    decoded = []

    def fake_decode(jpeg, offsets, indices, desc="", progress=True):  # a full decode would take ~7 s
        decoded.append(len(indices))
        return np.full((len(indices), 32, 32, 3), 7, dtype=np.uint8)

    monkeypatch.setattr(noisy_labels, "decode_jpegs", fake_decode)
    make = lambda: Cifar10NDataModule(data_dir=root, train_subset=100, test_subset=50, image_size=16,
                                      cache_dir=tmp_path, progress=False)
    make().setup()
    assert decoded == [50_000, 10_000] and len(list(tmp_path.glob("*.npy"))) == 2  # full splits written once
    make().setup()
    assert decoded == [50_000, 10_000]  # read back, nothing decoded
    cache = next(tmp_path.glob("cifar10_test_*.npy"))
    cache.write_bytes(cache.read_bytes()[:-100])  # truncated: detected, decoded again and replaced
    with pytest.warns(UserWarning, match="does not match"):
        make().setup()
    assert decoded == [50_000, 10_000, 10_000]


@pytest.mark.data
def test_cifar10n_trains_the_cnn_with_the_audit(cifar_small):
    pl.seed_everything(0)
    audit = SelectionAudit(datamodule_attr="train_noisy_mask")
    trainer = pl.Trainer(callbacks=[SelectionEngine(), audit], accelerator="cpu", devices=1, max_epochs=1,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(NoisyLabelClassifier(arch="cnn", width=8), cifar_small)
    assert int(audit.totals["rows"]) == len(cifar_small.train_set) and abs(audit.ratio - 1.0) < 1e-9
    assert 0.0 <= float(trainer.callback_metrics["heldout/accuracy"]) <= 1.0
