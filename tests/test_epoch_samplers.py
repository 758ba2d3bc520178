"""Epoch-level baselines (issue 8): RS2 (``RS2Sampler``) and hard batches (``HardBatchSampler`` + ``HardBatches``),
in one process and sharded across DDP ranks, and the true step count of hard-batch runs (``stepping_batches``)."""

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


def test_datamodule_shards_the_epoch_samplers_under_ddp():
    from types import SimpleNamespace

    from torch.utils.data import DistributedSampler

    data = NoisyDigitsDataModule(batch_size=32, sampler="rs2", rs2_fraction=0.1)
    data.setup()
    data.trainer = SimpleNamespace(world_size=2, global_rank=1)
    sampler = data.train_dataloader().sampler
    assert isinstance(sampler, RS2Sampler) and isinstance(sampler, DistributedSampler)
    assert (sampler.num_replicas, sampler.rank, len(sampler)) == (2, 1, 58)  # ⌈115 / 2⌉
    hard = NoisyDigitsDataModule(batch_size=32, sampler="hard_batches")
    hard.setup()
    hard.trainer = SimpleNamespace(world_size=2, global_rank=1)
    loader = hard.train_dataloader()
    batches = loader.batch_sampler
    assert isinstance(batches, HardBatchSampler) and (batches.num_replicas, batches.rank) == (2, 1)
    assert batches.num_batches == math.ceil(N_TRAIN / 64) and loader.sampler is batches.sampler


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


# ------------------------------------------------------------------------------------- under DDP
def _distributed_reference(items, world, rank, drop_last=False):
    """torch's own DistributedSampler over positions of ``items`` (no shuffle), mapped back to the items."""
    from torch.utils.data import DistributedSampler

    positions = DistributedSampler(range(len(items)), num_replicas=world, rank=rank, shuffle=False,
                                   drop_last=drop_last)
    return [items[i] for i in positions]


@pytest.mark.parametrize("n, fraction, world, drop_last", [
    (100, 0.25, 2, False),   # m = 25: one padded sample
    (100, 0.24, 4, False),   # m = 24: no padding, disjoint shares
    (1149, 0.3, 2, False),   # m = 345, epoch 3 straddles two permutations
    (1149, 0.3, 3, True),    # m = 345 = 3 · 115
    (10, 0.5, 4, True),      # m = 5: the tail sample is dropped
    (7, 0.3, 4, False),      # m = 3 < W: wrapped padding
])
def test_rs2_shards_each_epoch_subset_like_distributed_sampler(n, fraction, world, drop_last):
    single = RS2Sampler(n, fraction, seed=5)
    ranks = [RS2Sampler(n, fraction, seed=5, num_replicas=world, rank=r, drop_last=drop_last) for r in range(world)]
    m = single.subset_size
    per_rank = m // world if drop_last else math.ceil(m / world)
    for epoch in range(4):
        subset = single.indices(epoch)
        shares = [epochs_of(r, epoch + 1)[-1] for r in ranks]
        assert [len(s) for s in shares] == [len(r) for r in ranks] == [per_rank] * world  # equal lengths
        assert shares == [_distributed_reference(subset, world, r, drop_last) for r in range(world)]
        flat = [i for share in shares for i in share]
        if drop_last:
            assert sorted(flat) == sorted(subset[: per_rank * world])
        else:
            assert set(flat) == set(subset)  # the union over ranks is the epoch's subset
        if m % world == 0:
            assert sorted(flat) == sorted(subset)  # no padding: disjoint shares
    assert ranks[0].indices(2) == single.indices(2)  # the subset itself does not depend on the world size


def test_rs2_sharded_loader_resumes_mid_epoch_exactly():
    from lightning_select.samplers import ResumableDataLoader

    def loader():
        sampler = RS2Sampler(103, 0.5, seed=2, num_replicas=2, rank=1)
        sampler.set_epoch(3)
        return ResumableDataLoader(list(range(103)), batch_size=4, sampler=sampler)

    from helpers import resumed_batches

    full, resumed = resumed_batches(loader, stop_after=5)
    assert resumed == full and len(full) == math.ceil(26 / 4)


def test_lightning_leaves_the_self_sharding_samplers_in_place():
    """Lightning re-builds a training loader under DDP unless ``loader.sampler`` is a DistributedSampler."""
    from types import SimpleNamespace

    from lightning.pytorch.trainer.connectors.data_connector import _DataConnector
    from torch.utils.data import DataLoader

    from lightning_select.samplers import ResumableDataLoader

    connector = SimpleNamespace(trainer=SimpleNamespace(_accelerator_connector=SimpleNamespace(
        use_distributed_sampler=True, is_distributed=True)))
    requires = lambda loader: _DataConnector._requires_distributed_sampler(connector, loader)
    data = list(range(40))
    assert not requires(ResumableDataLoader(data, batch_size=4, sampler=RS2Sampler(40, 0.5, num_replicas=2)))
    assert not requires(DataLoader(data, batch_size=4, sampler=RS2Sampler(40, 0.5, num_replicas=2)))
    hard = HardBatchSampler(40, 4, num_replicas=2, rank=1)
    loader = ResumableDataLoader(data, batch_sampler=hard)
    assert not requires(loader) and loader.sampler is hard.sampler
    assert requires(DataLoader(data, batch_sampler=HardBatchSampler(40, 4, num_replicas=2)))  # why the loader matters
    assert requires(ResumableDataLoader(data, batch_size=4))  # an ordinary loader is still sharded by Lightning
    with pytest.raises(ValueError, match="use_distributed_sampler=False"):  # what Lightning's injection would meet
        HardBatchSampler(hard.sampler, batch_size=4)


@pytest.mark.parametrize("kwargs, match", [
    ({"num_replicas": 0}, "num_replicas"),
    ({"num_replicas": 2, "rank": 2}, "rank"),
    ({"num_replicas": 2, "rank": -1}, "rank"),
    ({"num_replicas": 8, "drop_last": True}, "drop_last"),  # m = 5 < 8 ranks
])
def test_rs2_refuses_bad_replica_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RS2Sampler(10, 0.5, **kwargs)


def test_hard_batches_ranks_take_their_slice_of_the_same_global_batches():
    world, batch = 2, 3  # global batches of 6: 23 samples make 4 (6, 6, 6, 5)
    ranks = [HardBatchSampler(23, batch, fraction=0.5, seed=1, num_replicas=world, rank=r) for r in range(world)]
    assert ranks[0].batches == ranks[1].batches and [len(b) for b in ranks[0].batches] == [6, 6, 6, 5]
    assert ranks[0].num_batches == 4 and ranks[0].num_hard == 2
    for epoch in (0, 1, 2):
        if epoch == 1:
            for s in ranks:  # what HardBatches records on every rank from the gathered rows
                for b, loss in enumerate([0.2, 0.9, 0.4, 0.7]):
                    s.update(b, loss)
        for s in ranks:
            s.set_epoch(epoch)
        ids = ranks[0].batch_ids(epoch)
        assert ranks[1].batch_ids(epoch) == ids and ([1, 3] if epoch else [0, 1, 2, 3]) == sorted(ids)
        steps = [list(s) for s in ranks]
        assert [len(x) for x in steps] == [len(s) for s in ranks] == [len(ids)] * world  # same number of batches
        for step, b in enumerate(ids):
            members = ranks[0].batches[b]
            slices = [steps[r][step] for r in range(world)]
            assert slices == [_distributed_reference(members, world, r) for r in range(world)]
            assert [len(x) for x in slices] == [batch] * world  # the 5-sample batch is padded to 3 + 3
            assert set(slices[0]) | set(slices[1]) == set(members)
            if len(members) == batch * world:
                assert not set(slices[0]) & set(slices[1])  # full global batches: disjoint slices
    assert ranks[0].total_batches(5) == 4 + 4 * 2


def test_hard_batches_state_checks_the_world_size_and_resumes_a_rank_mid_epoch():
    from lightning_select.samplers import ResumableDataLoader

    two = HardBatchSampler(30, 3, fraction=0.5, seed=4, num_replicas=2, rank=1)
    for b in range(two.num_batches):
        two.update(b, (b * 7) % 5)
    state = two.state_dict()
    with pytest.raises(ValueError, match="number of processes"):
        HardBatchSampler(30, 3, fraction=0.5, seed=4).load_state_dict(state)
    older = HardBatchSampler(30, 3, fraction=0.5, seed=4).state_dict()
    older.pop("num_replicas")  # a state saved before the DDP support: one process
    HardBatchSampler(30, 3, fraction=0.5, seed=4).load_state_dict(older)

    def loader():
        s = HardBatchSampler(30, 3, fraction=0.5, seed=4, num_replicas=2, rank=1)
        s.load_state_dict(state)
        s.set_epoch(0)
        return ResumableDataLoader(list(range(30)), batch_sampler=s)

    full = [b.tolist() for b in loader()]
    first = loader()
    it = iter(first)
    seen = [next(it).tolist() for _ in range(2)]
    resumed = loader()
    resumed.load_state_dict(first.state_dict())
    assert seen + [b.tolist() for b in resumed] == full and len(full) == 5


@pytest.mark.parametrize("kwargs, match", [
    ({"num_replicas": 0}, "num_replicas"),
    ({"num_replicas": 2, "rank": 3}, "rank"),
    ({"num_replicas": 4, "drop_last": True}, "no full batch"),  # 10 samples < one global batch of 3 · 4
])
def test_hard_batches_refuse_bad_replica_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HardBatchSampler(10, 3, **kwargs)


def _ctx(index, loss):
    from types import SimpleNamespace

    return SimpleNamespace(phase="train", gathered={"index": torch.tensor(index), "loss": torch.tensor(loss)},
                           log=lambda *args: None, trainer=None)


def test_hard_batches_records_one_global_batch_from_the_gathered_rows_of_every_rank():
    ranks = [HardBatchSampler(10, 3, fraction=0.5, seed=0, num_replicas=2, rank=r) for r in range(2)]
    members = ranks[0].batches[1]  # the last global batch: 4 samples, sliced 2 + 2
    assert len(members) == 4
    big = HardBatchSampler(10, 3, fraction=0.5, seed=0, num_replicas=2)
    first = big.batches[0]  # 6 samples
    slices = [ranks[r].rank_slice(0) for r in range(2)]
    assert slices[0] + slices[1] != first and sorted(slices[0] + slices[1]) == sorted(first)
    losses = [float(i) for i in range(6)]
    policies = [HardBatches() for _ in range(2)]
    for policy, sampler in zip(policies, ranks):
        policy._sampler = sampler
        policy.observe(_ctx(slices[0] + slices[1], losses))  # the same gathered rows on every rank
    assert [float(s.losses[0]) for s in ranks] == [2.5, 2.5] and bool(torch.isinf(ranks[0].losses[1]))
    # a padded global batch (5 samples on 2 ranks): the repeated sample counts once
    odd = HardBatchSampler(11, 3, fraction=0.5, seed=0, num_replicas=2)
    last = odd.batches[1]
    assert len(last) == 5
    padded = odd.rank_slice(1) + HardBatchSampler(11, 3, fraction=0.5, seed=0, num_replicas=2, rank=1).rank_slice(1)
    assert len(padded) == 6 and padded.count(last[0]) == 2
    policy = HardBatches()
    policy._sampler = odd
    loss_of = {i: float(10 * k) for k, i in enumerate(last)}
    policy.observe(_ctx(padded, [loss_of[i] for i in padded]))
    assert float(odd.losses[1]) == pytest.approx(sum(loss_of.values()) / 5)
    with pytest.raises(SelectionError, match="expected exactly one"):  # rows of two global batches
        policy.observe(_ctx([odd.batches[0][0], last[0]], [1.0, 1.0]))


# ------------------------------------------------------------------------------------- step count
class OneCycleClassifier(NoisyLabelClassifier):
    """OneCycle over ``stepping_batches`` (or Lightning's estimate); records the LR of every optimizer step."""

    def __init__(self, use_lightning_estimate=False):
        super().__init__(arch="mlp", hidden=16)
        self.use_lightning_estimate, self.lrs = use_lightning_estimate, []

    def configure_optimizers(self):
        from lightning_select.core.schedule import stepping_batches

        optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
        total = self.trainer.estimated_stepping_batches if self.use_lightning_estimate else stepping_batches(self.trainer)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=int(total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_before_optimizer_step(self, optimizer):
        self.lrs.append(optimizer.param_groups[0]["lr"])


def _hard_trainer_fit(tmp_path, model, epochs=3, **kwargs):
    pl.seed_everything(0)
    trainer = _trainer(tmp_path, max_epochs=epochs, callbacks=[HardBatches()], **kwargs)
    trainer.fit(model, NoisyDigitsDataModule(batch_size=64, sampler="hard_batches", hard_fraction=0.5))
    return trainer


def test_stepping_batches_sizes_the_cosine_schedule_to_end_at_the_last_step(tmp_path):
    from lightning_select.core.schedule import stepping_batches

    b, k, epochs = 18, 9, 3
    trainer = _hard_trainer_fit(tmp_path, NoisyLabelClassifier(arch="mlp", hidden=16, cosine_schedule=True), epochs)
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert trainer.global_step == stepping_batches(trainer) == b + (epochs - 1) * k == scheduler.T_max == 36
    assert trainer.estimated_stepping_batches - trainer.global_step == (epochs - 1) * (b - k) == 18  # Lightning: 54
    assert scheduler.last_epoch == scheduler.T_max and trainer.optimizers[0].param_groups[0]["lr"] == 0.0


def test_onecycle_from_stepping_batches_ends_exactly_and_lightnings_estimate_does_not(tmp_path):
    exact = OneCycleClassifier()
    trainer = _hard_trainer_fit(tmp_path, exact)
    final = 0.1 / 25.0 / 1e4  # OneCycleLR's last value: max_lr / div_factor / final_div_factor
    assert len(exact.lrs) == trainer.global_step == 36 and exact.lrs[-1] == pytest.approx(final, rel=1e-9)
    assert max(exact.lrs) == pytest.approx(0.1, rel=1e-3)
    plain = OneCycleClassifier(use_lightning_estimate=True)
    with pytest.warns(UserWarning, match="sized for 54 steps.*takes 36 optimizer steps"):
        _hard_trainer_fit(tmp_path / "plain", plain)
    assert len(plain.lrs) == 36 and plain.lrs[-1] > 100 * final  # stopped 18 steps before the end of its schedule


@pytest.mark.parametrize("kwargs", [{"accumulate_grad_batches": 4}, {"limit_train_batches": 12},
                                    {"limit_train_batches": 0.75, "accumulate_grad_batches": 2}, {"max_steps": 40}])
def test_stepping_batches_counts_what_lightning_trains(tmp_path, kwargs):
    from lightning_select.core.schedule import stepping_batches

    trainer = _hard_trainer_fit(tmp_path, NoisyLabelClassifier(arch="mlp", hidden=16), **kwargs)
    assert trainer.global_step == stepping_batches(trainer) < trainer.estimated_stepping_batches


def test_hard_batches_validates_after_every_epoch(tmp_path):
    class ValidationEpochs(pl.Callback):
        def __init__(self):
            self.epochs = []

        def on_validation_epoch_end(self, trainer, pl_module):
            if not trainer.sanity_checking:
                self.epochs.append(trainer.current_epoch)

    seen = ValidationEpochs()
    pl.seed_everything(0)
    trainer = _trainer(tmp_path, max_epochs=3, callbacks=[HardBatches(), seen], limit_val_batches=1,
                       num_sanity_val_steps=0)
    trainer.fit(NoisyLabelClassifier(arch="mlp", hidden=16), NoisyDigitsDataModule(batch_size=64,
                                                                                      sampler="hard_batches"))
    assert seen.epochs == [0, 1, 2] and trainer.val_check_batch == 9  # Lightning alone: [0] (every 18 batches)


@pytest.mark.parametrize("n, fraction", [(7, 0.3), (23, 0.7), (100, 0.3), (1149, 0.25), (1149, 0.1), (50, 1.0)])
def test_rs2_epochs_never_repeat_a_sample_and_every_permutation_covers_the_set(n, fraction):
    """An epoch straddling two permutations would repeat samples (the reference's loop); the sampler moves the
    previous tail to the end of the next permutation, so the stream is still one permutation per N positions."""
    sampler = RS2Sampler(n, fraction, seed=5)
    stream = []
    for epoch in range(int(4 / fraction) + 2):
        subset = sampler.indices(epoch)
        assert len(set(subset)) == len(subset) == sampler.subset_size, epoch
        stream += subset
    for k in range(len(stream) // n):
        assert sorted(stream[k * n:(k + 1) * n]) == list(range(n)), k
    late = RS2Sampler(n, fraction, seed=5)  # a fresh sampler (a resume) asked for a late epoch directly
    assert late.indices(epoch) == subset and late.indices(0) == RS2Sampler(n, fraction, seed=5).indices(0)
