"""Sample indices are never guessed (issue 7): how batches carry them, and which index batches are refused.

Also runnable as ``python tests/test_indices.py OUT_DIR``: the 2-process CPU DDP scenario of
:func:`test_refused_indices_on_one_rank_raise_on_every_rank` (Lightning re-executes it for rank 1).
"""

import copy
import os
import pickle
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from helpers import PerSampleRegressor, RankBatches, RegressionTable
from torch.utils.data import DataLoader, Dataset, TensorDataset, WeightedRandomSampler, default_collate

from lightning_select import IndexedDataset, LossHistory, SelectionEngine, SelectionError, get_indices, select_batch
from lightning_select.core.batch import SampleIndex, SampleIndexError, index_value_problem

HERE = Path(__file__).resolve().parent
N = 64
MISSING = r"no marked sample indices.*IndexedDataset.*index_key"


class Unpacking(PerSampleRegressor):
    """The tests' regressor on any batch layout: ``unpack(batch) -> (x, y)``; counts its training_step calls."""

    def __init__(self, unpack, lr=0.0):
        super().__init__(lr=lr)
        self.unpack, self.calls = unpack, 0

    def training_step(self, batch, batch_idx):
        self.calls += 1
        x, y = self.unpack(batch)
        return (self.net(x).squeeze(-1) - y.float()) ** 2


class Marked(Dataset):
    """A user's own dataset that marks its index itself."""

    def __init__(self, data):
        self.data = data

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return self.data.x[i], self.data.y[i], SampleIndex(i)


class Dicts(Dataset):
    """Dict items whose ``index`` is given explicitly (to build bad index columns)."""

    def __init__(self, index, n=N):
        data = RegressionTable(n)
        self.x, self.y, self.index = data.x, data.y, index

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i], "index": self.index[i]}


class Batches(pl.Callback):
    """Records every training batch's dict index."""

    def __init__(self):
        self.indices = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.indices.append(batch["index"].clone())


def fit(model, callbacks, trainer_kwargs, loader, **overrides):
    trainer = pl.Trainer(callbacks=callbacks, **{**trainer_kwargs, "max_epochs": 1, **overrides})
    trainer.fit(model, loader)
    return trainer


def loader(dataset, **kwargs):
    return DataLoader(dataset, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0), **kwargs)


def assert_nothing_recorded(history):
    assert history.store is not None and int(history.store.count.sum()) == 0


def test_labels_of_a_plain_tensor_dataset_are_not_read_as_indices(trainer_kwargs):
    """The issue: TensorDataset(x, y) without IndexedDataset used to give 3 'samples' counted 8 times each."""
    data = RegressionTable(N)
    labels = torch.arange(N) % 3  # integer class labels: the last element of every tuple batch
    model, history = Unpacking(lambda b: (b[0], b[1])), LossHistory()
    with pytest.raises(SampleIndexError, match=MISSING):
        fit(model, [history], trainer_kwargs, loader(TensorDataset(data.x, labels)))
    assert_nothing_recorded(history)
    assert model.calls == 0


WAYS = {  # name -> (dataset from the regression data, engine kwargs, DataLoader kwargs, unpack(batch) -> (x, y))
    "dict": (IndexedDataset, {}, {}, lambda b: (b["x"], b["y"])),
    "dict_custom_key": (lambda d: IndexedDataset(d, index_key="idx"), {"index_key": "idx"}, {},
                        lambda b: (b["x"], b["y"])),
    "tuple_items": (lambda d: IndexedDataset(TensorDataset(d.x, d.y)), {}, {}, lambda b: (b[0], b[1])),
    "tuple_items_2_workers": (lambda d: IndexedDataset(TensorDataset(d.x, d.y)), {}, {"num_workers": 2},
                              lambda b: (b[0], b[1])),
    "list_items": (lambda d: IndexedDataset([[d.x[i], d.y[i]] for i in range(N)]), {}, {}, lambda b: (b[0], b[1])),
    "plain_tensor_items": (lambda d: IndexedDataset(list(torch.cat([d.x, d.y[:, None]], dim=1))), {}, {},
                           lambda b: (b[0][:, :8], b[0][:, 8])),
    "user_marked": (Marked, {}, {}, lambda b: (b[0], b[1])),
    "explicit_position": (lambda d: TensorDataset(d.x, torch.arange(N), d.y), {"index_key": 1}, {},
                          lambda b: (b[0], b[2])),
    "explicit_negative_position": (lambda d: TensorDataset(d.x, d.y, torch.arange(N)), {"index_key": -1}, {},
                                   lambda b: (b[0], b[1])),
}


@pytest.mark.parametrize("way", sorted(WAYS))
def test_every_way_of_carrying_indices_records_each_sample_under_its_own_index(trainer_kwargs, way):
    make, engine_kwargs, loader_kwargs, unpack = WAYS[way]
    data = RegressionTable(N)
    model, history = Unpacking(unpack), LossHistory()
    with torch.no_grad():  # lr=0: the model never changes, so each sample's loss is known in advance
        expected = (copy.deepcopy(model.net)(data.x).squeeze(-1) - data.y) ** 2
    fit(model, [SelectionEngine(**engine_kwargs), history], trainer_kwargs, loader(make(data), **loader_kwargs))
    assert history.store.count.tolist() == [1] * N
    assert torch.allclose(history.store.last_loss, expected, atol=1e-6)


@pytest.mark.parametrize("index", [torch.arange(N).float(), torch.arange(N) % 2 == 0], ids=["float", "bool"])
def test_float_and_bool_indices_are_refused_before_the_step(trainer_kwargs, index):
    model, history = Unpacking(lambda b: (b["x"], b["y"])), LossHistory()
    with pytest.raises(SampleIndexError, match=rf"{index.dtype} tensor of shape \(8,\).*1-d integer tensor.*label or "
                                               r"a feature.*IndexedDataset"):
        fit(model, [history], trainer_kwargs, loader(Dicts(index)))
    assert_nothing_recorded(history)
    assert model.calls == 0
    # an explicit position is trusted for where the index is, not for what it holds
    data = RegressionTable(N)
    with pytest.raises(SampleIndexError, match="torch.float32 tensor"):
        fit(Unpacking(lambda b: (b[0], b[1])), [SelectionEngine(index_key=1), LossHistory()], trainer_kwargs,
            loader(TensorDataset(data.x, data.y)))


def test_negative_indices_are_refused_before_the_step(trainer_kwargs):
    model, history = Unpacking(lambda b: (b["x"], b["y"])), LossHistory()
    with pytest.raises(SampleIndexError, match=r"negative sample indices.*Offending values: \[-1\]"):
        fit(model, [history], trainer_kwargs, DataLoader(Dicts(torch.arange(N) - 1), batch_size=8))  # -1 in batch 0
    assert_nothing_recorded(history)
    assert model.calls == 0


def test_out_of_range_indices_are_refused_before_anything_is_recorded(trainer_kwargs):
    """N is known to LossHistory's table, which checks [0, N) before it buffers the step."""
    history = LossHistory()  # N inferred from the dataset: 16
    batches = [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(IndexError, match=r"Sample indices \[16\] are outside \[0, 16\)"):
        fit(Unpacking(lambda b: (b["x"], b["y"])), [history], trainer_kwargs,
            DataLoader(Dicts(torch.tensor([0, 1, 2, 3, 4, 5, 6, 16] + list(range(8, 16))), n=16),
                       batch_sampler=batches))
    assert history.store.count.tolist() == [1, 1, 1, 1] + [0] * 12  # the first step only; the bad one left no trace
    history = LossHistory(num_samples=10)
    with pytest.raises(IndexError, match=r"outside \[0, 10\)"):
        fit(Unpacking(lambda b: (b["x"], b["y"])), [history], trainer_kwargs,
            DataLoader(IndexedDataset(RegressionTable(N)), batch_size=16))
    assert_nothing_recorded(history)


def test_repeated_indices_are_refused_unless_the_sampler_repeats(trainer_kwargs):
    model, history = Unpacking(lambda b: (b["x"], b["y"])), LossHistory()
    dataset = IndexedDataset(RegressionTable(16))
    with pytest.raises(SampleIndexError, match=r"more than once in one batch.*allow_repeated_indices=True.*"
                                               r"Offending values: \[1\]"):
        fit(model, [history], trainer_kwargs, DataLoader(dataset, batch_sampler=[[0, 1, 1, 2]]))
    assert_nothing_recorded(history)
    assert model.calls == 0

    sampler = WeightedRandomSampler(torch.ones(16), num_samples=64, replacement=True,
                                    generator=torch.Generator().manual_seed(0))
    with pytest.raises(SampleIndexError, match="allow_repeated_indices=True"):
        fit(Unpacking(lambda b: (b["x"], b["y"])), [LossHistory()], trainer_kwargs,
            DataLoader(dataset, batch_size=16, sampler=sampler))
    history, seen = LossHistory(), Batches()
    fit(Unpacking(lambda b: (b["x"], b["y"])), [SelectionEngine(allow_repeated_indices=True), history, seen],
        trainer_kwargs, DataLoader(dataset, batch_size=16, sampler=sampler))
    assert len(seen.indices) == 4 and any(i.unique().numel() < i.numel() for i in seen.indices)
    # a repeated sample counts once per step (with its mean loss), as for DistributedSampler's padding
    drawn = torch.cat([i.unique() for i in seen.indices])
    assert history.store.count.tolist() == torch.bincount(drawn, minlength=16).tolist()
    assert index_value_problem(torch.tensor([1, 0, 1]), allow_repeated=True) is None


def test_sample_index_survives_collate_pickling_transfer_and_selection():
    from lightning.fabric.utilities.apply_func import move_data_to_device

    items = [(torch.randn(2), torch.tensor(i % 3), SampleIndex(i)) for i in range(5)]
    batch = default_collate(items)
    assert isinstance(batch[2], SampleIndex) and batch[2].tolist() == [0, 1, 2, 3, 4]
    assert type(batch[1]) is torch.Tensor  # the labels stay plain, so they can never pass for indices
    for moved in (pickle.loads(pickle.dumps(batch)), copy.deepcopy(batch), move_data_to_device(batch, "cpu"),
                  move_data_to_device(batch, torch.device("meta")), select_batch(batch, torch.tensor([4, 0]))):
        assert isinstance(moved[2], SampleIndex) and type(moved[1]) is torch.Tensor
    assert get_indices(select_batch(batch, torch.tensor([4, 0]))).tolist() == [4, 0]
    assert type(get_indices(batch)) is torch.Tensor  # the engine works on plain tensors
    # the mark does not leak into the model's computation
    x = torch.randn(5, 3)
    for plain in (x[batch[2]], batch[2].float(), batch[2] == 1, torch.nn.functional.embedding(batch[2], x)):
        assert type(plain) is torch.Tensor
    with pytest.raises(TypeError, match="integer sample indices"):
        SampleIndex(1.5)


def test_where_indices_are_looked_for():
    x, y = torch.zeros(3, 2), torch.tensor([0, 1, 2])
    with pytest.raises(SampleIndexError, match=MISSING) as err:
        get_indices((x, y))
    assert isinstance(err.value, KeyError) and isinstance(err.value, SelectionError)
    with pytest.raises(SampleIndexError, match="ambiguous"):
        get_indices((x, SampleIndex([0, 1, 2]), SampleIndex([3, 4, 5])))
    with pytest.raises(SampleIndexError, match=r"index_key=1 names element 1.*SampleIndex.*is element \[2\]"):
        get_indices((x, y, SampleIndex([0, 1, 2])), 1)
    with pytest.raises(SampleIndexError, match="position outside"):
        get_indices((x, y), 5)
    with pytest.raises(ValueError, match="once"):
        IndexedDataset(IndexedDataset([(1.0, 2.0)]))[0]
    with pytest.raises(TypeError, match="index_key"):
        SelectionEngine(index_key=True)
    assert get_indices((x, y, SampleIndex([0, 1, 2])), -1).tolist() == [0, 1, 2]
    assert get_indices({"x": x, "index": torch.tensor([5, 6, 7], dtype=torch.int32)}).dtype == torch.int64


# ---------------------------------------------------------------------------------------------- DDP
def _ddp_fit(rank_batches, index, history, max_steps=1):
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    model = Unpacking(lambda b: (b["x"], b["y"]))
    trainer = pl.Trainer(callbacks=[history], accelerator="cpu", devices=2, strategy="ddp", logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         max_steps=max_steps, use_distributed_sampler=False)
    try:
        trainer.fit(model, DataLoader(Dicts(index, n=16), batch_sampler=RankBatches(rank_batches[rank])))
    except SampleIndexError as err:
        return {"error": str(err), "calls": model.calls, "count": history.store.count.clone()}
    return {"error": None, "calls": model.calls, "count": history.store.count.clone()}


def ddp_main(out):
    """Three fits on 2 ranks: valid unequal batches (the verdict slot leaves the gather sizes intact), a
    repeat on rank 1 only, a negative index on rank 0 only."""
    good = torch.arange(16)
    results = {
        "valid": _ddp_fit([[[0, 1, 2, 3]], [[8, 9, 10, 11, 12, 13]]], good, LossHistory()),
        "repeat_on_rank1": _ddp_fit([[[0, 1, 2, 3]], [[8, 9, 9, 10]]], good, LossHistory()),
        "negative_on_rank0": _ddp_fit([[[0, 1, 2, 3]], [[8, 9, 10, 11]]], torch.cat([torch.tensor([-1]), good[1:]]),
                                      LossHistory()),
    }
    torch.save(results, Path(out) / f"rank{os.environ.get('LOCAL_RANK', '0')}.pt")
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


@pytest.mark.ddp
def test_refused_indices_on_one_rank_raise_on_every_rank(tmp_path):
    """One rank's bad batch must not make it raise alone (the other would wait in the all-reduce forever)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE)])}
    proc = subprocess.run([sys.executable, str(HERE / "test_indices.py"), str(tmp_path)], env=env, check=False,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    valid = [ranks[r]["valid"] for r in range(2)]
    assert valid[0]["error"] is None and valid[1]["error"] is None
    expected = torch.zeros(16, dtype=torch.int32)
    expected[[0, 1, 2, 3, 8, 9, 10, 11, 12, 13]] = 1
    assert torch.equal(valid[0]["count"], expected) and torch.equal(valid[1]["count"], expected)
    for scenario, bad, fix in [("repeat_on_rank1", 1, "allow_repeated_indices=True"),
                               ("negative_on_rank0", 0, "negative sample indices")]:
        errors = [ranks[r][scenario]["error"] for r in range(2)]
        assert all(e is not None for e in errors), (scenario, errors)
        summary = f"Rank(s) [{bad}] refused their sample indices at batch 0 (rank {bad}: "
        assert all(e.startswith(summary) and fix in e for e in errors), errors
        shared = [e.split(" This rank's")[0] for e in errors]
        assert shared[0] == shared[1]  # the same error on every rank; the offending values only where they are
        assert "This rank's offending values" in errors[bad] and "This rank's" not in errors[1 - bad]
        assert all(int(ranks[r][scenario]["count"].sum()) == 0 for r in range(2))


if __name__ == "__main__":
    ddp_main(sys.argv[1])
