"""Epoch-level baselines (issue 8): RS2 (``RS2Sampler``) and hard batches (``HardBatchSampler`` + ``HardBatches``)."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_select import SelectionError
from lightning_select.data.noisy_labels import NoisyDigitsDataModule
from lightning_select.models.classifier import NoisyLabelClassifier
from lightning_select.policies import HardBatches
from lightning_select.samplers import HardBatchSampler, RS2Sampler

N_TRAIN = 1149  # NoisyDigitsDataModule's default training split


def epochs_of(sampler, epochs):
    out = []
    for e in range(epochs):
        sampler.set_epoch(e)
        out.append(list(sampler))
    return out


# ----------------------------------------------------------------------------------------------- RS2
@pytest.mark.parametrize("n, fraction", [(100, 0.25), (103, 0.25), (1149, 0.1), (7, 0.3)])
def test_rs2_subsets_are_disjoint_within_a_cycle_and_cover_everything(n, fraction):
    sampler = RS2Sampler(n, fraction, seed=3)
    m = math.ceil(round(fraction * n, 9))
    cycle = math.ceil(1 / fraction)
    subsets = epochs_of(sampler, cycle)
    assert [len(s) for s in subsets] == [m] * cycle and len(sampler) == m
    inside = n // m  # epochs whose positions all lie in the first permutation
    first = [i for s in subsets[:inside] for i in s]
    assert len(first) == len(set(first)) == inside * m  # disjoint
    assert sorted({i for s in subsets for i in s}) == list(range(n))  # ⌈1/fraction⌉ epochs cover all N


def test_rs2_visits_every_sample_equally_often():
    n, fraction = 10, 0.3  # m = 3: 10 epochs are 30 positions = exactly 3 permutations
    counts = np.bincount(np.concatenate(epochs_of(RS2Sampler(n, fraction, seed=0), 10)), minlength=n)
    assert counts.tolist() == [3] * n


def test_rs2_is_a_pure_function_of_seed_and_epoch():
    a, b = RS2Sampler(50, 0.2, seed=1), RS2Sampler(50, 0.2, seed=1)
    b.set_epoch(7)
    late = list(b)
    a.set_epoch(7)  # no iteration of epochs 0..6 needed
    assert list(a) == late == list(a) == a.indices(7)
    a.set_epoch(6)
    assert list(a) != late
    other = RS2Sampler(50, 0.2, seed=2)
    other.set_epoch(7)
    assert list(other) != late
    full = RS2Sampler(50, 1.0, seed=1)  # fraction 1: a fresh permutation per epoch
    assert [sorted(s) for s in epochs_of(full, 2)] == [list(range(50))] * 2


@pytest.mark.parametrize("fraction", [0, -0.1, 1.5, True, "0.5"])
def test_rs2_refuses_bad_fraction(fraction):
    with pytest.raises(ValueError, match="fraction"):
        RS2Sampler(10, fraction)


def _trainer(tmp_path, **kwargs):
    base = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False,
            "enable_progress_bar": False, "enable_model_summary": False, "limit_val_batches": 0,
            "default_root_dir": tmp_path}
    return pl.Trainer(**{**base, **kwargs})


class BatchLog(pl.Callback):
    """The sample indices of every trained batch, per epoch."""

    def __init__(self) -> None:
        self.epochs: dict[int, list[tuple[int, ...]]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.epochs.setdefault(trainer.current_epoch, []).append(tuple(batch["index"].tolist()))


def test_rs2_trainer_runs_the_reduced_step_count(tmp_path):
    fraction, batch = 0.1, 32
    steps = math.ceil(math.ceil(fraction * N_TRAIN) / batch)  # ceil(115 / 32) = 4
    log = BatchLog()
    data = NoisyDigitsDataModule(batch_size=batch, sampler="rs2", rs2_fraction=fraction)
    trainer = _trainer(tmp_path, max_epochs=2, callbacks=[log])
    trainer.fit(NoisyLabelClassifier(arch="mlp", hidden=16, plain_loss=True), data)
    assert trainer.estimated_stepping_batches == 2 * steps
    assert trainer.global_step == 2 * steps
    sampler = trainer.train_dataloader.sampler
    assert isinstance(sampler, RS2Sampler)
    for epoch in (0, 1):
        assert len(log.epochs[epoch]) == steps
        assert [i for b in log.epochs[epoch] for i in b] == sampler.indices(epoch)


@pytest.mark.parametrize("sampler", ["rs2", "hard_batches"])
def test_datamodule_refuses_the_epoch_samplers_under_ddp(sampler):
    from types import SimpleNamespace

    data = NoisyDigitsDataModule(sampler=sampler)
    data.setup()
    data.trainer = SimpleNamespace(world_size=2)
    with pytest.raises(ValueError, match="single process only"):
        data.train_dataloader()


def test_datamodule_refuses_unknown_sampler():
    with pytest.raises(ValueError, match="sampler"):
        NoisyDigitsDataModule(sampler="random")
    with pytest.raises(ValueError, match="hard_fraction"):
        NoisyDigitsDataModule(sampler="hard_batches", hard_fraction=0.0)


# ------------------------------------------------------------------------------------- hard batches
def top_batches(losses, k):
    """Independent top-k: highest loss first, ties by lower batch id."""
    values = losses.tolist()
    return sorted(range(len(values)), key=lambda b: (-values[b], b))[:k]


def test_hard_batch_membership_is_fixed_and_epoch_zero_yields_all():
    s = HardBatchSampler(23, batch_size=4, fraction=0.5, seed=1)
    assert s.num_batches == 6 and s.num_hard == 3 and [len(b) for b in s.batches] == [4] * 5 + [3]
    assert sorted(i for b in s.batches for i in b) == list(range(23))
    assert all(int(s.batch_of_index[i]) == b for b, members in enumerate(s.batches) for i in members)
    epoch0 = list(s)
    assert len(s) == 6 and sorted(map(tuple, epoch0)) == sorted(map(tuple, s.batches))
    members = {tuple(b) for b in s.batches}
    torch.manual_seed(0)
    for b in range(s.num_batches):
        s.update(b, float(torch.rand(())))
    for e in (1, 2, 5):
        s.set_epoch(e)
        assert all(tuple(b) in members for b in s) and len(list(s)) == len(s) == 3
    assert s.batches == HardBatchSampler(23, batch_size=4, fraction=0.5, seed=1).batches
    assert len(HardBatchSampler(23, batch_size=4, drop_last=True).batches) == 5


def test_later_epochs_yield_exactly_the_top_batches_by_recorded_loss():
    s = HardBatchSampler(40, batch_size=4, fraction=0.45, seed=0)  # b = 10, k = ⌊4.5⌋ = 4
    losses = [0.3, 0.9, 0.1, 0.9, 0.5, 0.2, 0.9, 0.4, 0.0, 0.7]  # a three-way tie at the top
    for b, loss in enumerate(losses):
        s.update(b, loss)
    expected = top_batches(torch.tensor(losses), 4)
    assert expected == [1, 3, 6, 9]
    for e in (1, 2):
        s.set_epoch(e)
        got = [int(s.batch_of_index[b[0]]) for b in s]
        assert sorted(got) == expected and sorted(s.batch_ids(e)) == expected
    s.update(0, 5.0)  # a new loss changes the next epoch's choice
    s.set_epoch(3)
    assert sorted(s.batch_ids(3)) == sorted(top_batches(s.losses, 4)) == [0, 1, 3, 6]
    s.set_epoch(4)
    s.skip_batches(2)
    assert [int(s.batch_of_index[b[0]]) for b in s] == s.batch_ids(4)[2:]


def test_hard_batch_state_round_trip():
    s = HardBatchSampler(30, batch_size=3, fraction=0.5, seed=4)
    for b in range(s.num_batches):
        s.update(b, (b * 7919) % 13 / 13)
    state = s.state_dict()
    fresh = HardBatchSampler(30, batch_size=3, fraction=0.5, seed=4)
    fresh.set_epoch(2)
    _ = len(fresh), list(fresh)  # cached before the load: the load must drop the cache
    fresh.load_state_dict(state)
    assert torch.equal(fresh.losses, s.losses)
    for e in (1, 2, 3):
        s.set_epoch(e)
        fresh.set_epoch(e)
        assert list(fresh) == list(s)
    with pytest.raises(ValueError, match="same data"):
        HardBatchSampler(30, batch_size=5, fraction=0.5, seed=4).load_state_dict(state)


def test_hard_batches_policy_needs_a_hard_batch_sampler(tmp_path):
    trainer = _trainer(tmp_path, max_epochs=1, callbacks=[HardBatches()])
    with pytest.raises(SelectionError, match="HardBatchSampler"):
        trainer.fit(NoisyLabelClassifier(arch="mlp", hidden=16), NoisyDigitsDataModule(batch_size=64))


class LossSnapshots(pl.Callback):
    def __init__(self, policy):
        self.policy, self.losses = policy, {}

    def on_train_epoch_end(self, trainer, pl_module):
        self.losses[trainer.current_epoch] = self.policy.sampler.losses.clone()


def _hard_fit(tmp_path, max_epochs, ckpt_path=None, checkpoint=None):
    pl.seed_everything(0)
    policy, log = HardBatches(), BatchLog()
    snaps = LossSnapshots(policy)
    callbacks = [policy, log, snaps] + ([checkpoint] if checkpoint else [])
    trainer = _trainer(tmp_path, max_epochs=max_epochs, callbacks=callbacks, enable_checkpointing=bool(checkpoint))
    data = NoisyDigitsDataModule(batch_size=64, sampler="hard_batches", hard_fraction=0.5)
    trainer.fit(NoisyLabelClassifier(arch="mlp", hidden=16), data, ckpt_path=ckpt_path)
    return trainer, policy, log, snaps


def test_hard_batches_fit_trains_the_hardest_batches_and_resumes_exactly(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{epoch}", save_top_k=-1, every_n_epochs=1)
    trainer, policy, log, snaps = _hard_fit(tmp_path, 3, checkpoint=ckpt)
    sampler = policy.sampler
    b, k = math.ceil(N_TRAIN / 64), math.floor(0.5 * math.ceil(N_TRAIN / 64))  # 18, 9
    assert (sampler.num_batches, sampler.num_hard) == (b, k)
    members = {tuple(m) for m in sampler.batches}
    assert sorted(log.epochs[0]) == sorted(members)  # epoch 0: every batch once
    assert bool(torch.isfinite(snaps.losses[0]).all())  # every batch's loss recorded
    for epoch in (1, 2):
        trained = log.epochs[epoch]
        assert len(trained) == k and set(trained) <= members
        ids = sorted(int(sampler.batch_of_index[t[0]]) for t in trained)
        assert ids == sorted(top_batches(snaps.losses[epoch - 1], k))  # the top-k after the previous epoch
        changed = ~torch.eq(snaps.losses[epoch], snaps.losses[epoch - 1])
        assert sorted(torch.nonzero(changed).flatten().tolist()) == ids  # only trained batches got new losses
    assert trainer.global_step == b + 2 * k

    # resume from the end of epoch 0: same losses restored, same batches in the same order
    _, resumed, log2, snaps2 = _hard_fit(tmp_path / "resume", 3, ckpt_path=str(tmp_path / "ckpt" / "epoch=0.ckpt"))
    assert resumed.sampler is not sampler
    assert log2.epochs[1] == log.epochs[1] and log2.epochs[2] == log.epochs[2]
    assert torch.equal(snaps2.losses[2], snaps.losses[2])


def test_hydra_selector_switches_the_datamodule_to_hard_batches():
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate

    GlobalHydra.instance().clear()
    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("train", overrides=["+selector=[hard_batches,loss_history]"])
    GlobalHydra.instance().clear()
    assert sorted(cfg.selector) == ["hard_batches", "loss_history"]
    data = instantiate(cfg.data)
    assert isinstance(data, NoisyDigitsDataModule) and (data.sampler, data.hard_fraction) == ("hard_batches", 0.5)
    assert isinstance(instantiate(cfg.selector.hard_batches), HardBatches)


def test_lightning_set_epoch_reaches_the_no_duplicates_batch_sampler():
    """Lightning calls set_epoch only on loader.sampler and loader.batch_sampler.sampler."""
    from lightning.fabric.utilities.data import _set_sampler_epoch
    from torch.utils.data import DataLoader

    from lightning_select.samplers import NoDuplicatesBatchSampler

    sampler = NoDuplicatesBatchSampler([(i,) for i in range(20)], batch_size=4, seed=0)
    loader = DataLoader(list(range(20)), batch_sampler=sampler)
    first = [b.tolist() for b in loader]
    _set_sampler_epoch(loader, 1)
    assert sampler.epoch == 1 and [b.tolist() for b in loader] != first  # a new order in the new epoch
