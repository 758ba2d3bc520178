import math

import numpy as np
import pandas as pd
import pytest
import torch

from lightning_select import SampleLossStore


def reference_history(n, updates, decay, trace_epochs):
    """Independent per-sample Python implementation of the documented semantics."""
    rows = {i: dict(last=math.nan, ema=math.nan, count=0, fs=-1, ls=-1, fe=-1, le=-1) for i in range(n)}
    trace = {}
    for idx, loss, step, epoch in updates:
        groups = {}
        for i, l in zip(idx.tolist(), loss.tolist()):
            groups.setdefault(i, []).append(l)
        for i, ls in groups.items():
            value = sum(ls) / len(ls)
            r = rows[i]
            r["ema"] = value if r["count"] == 0 else decay * r["ema"] + (1 - decay) * value
            if r["count"] == 0:
                r["fs"], r["fe"] = step, epoch
            r["count"] += 1
            r["last"], r["ls"], r["le"] = value, step, epoch
            trace[(i, epoch)] = value
    return rows, trace


def random_updates(n, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    updates = []
    for s in range(steps):
        b = int(torch.randint(1, 12, (1,), generator=g))
        idx = torch.randint(0, n, (b,), generator=g)  # duplicates included on purpose
        updates.append((idx, torch.rand(b, generator=g) * 5, s, s // 4))
    return updates


def test_store_matches_independent_reference_with_duplicates_and_trace():
    n, decay = 30, 0.7
    updates = random_updates(n, 40)
    store = SampleLossStore(n, ema_decay=decay, trace_epochs=3)
    for idx, loss, step, epoch in updates:
        store.update(idx, loss, step, epoch)
    rows, trace = reference_history(n, updates, decay, 3)
    for i in range(n):
        r = rows[i]
        assert store.count[i].item() == r["count"]
        for ours, ref in ((store.last_loss[i], r["last"]), (store.ema_loss[i], r["ema"])):
            assert (math.isnan(ref) and torch.isnan(ours)) or abs(ours.item() - ref) < 1e-5
        assert (store.first_step[i].item(), store.last_step[i].item()) == (r["fs"], r["ls"])
        assert (store.first_epoch[i].item(), store.last_epoch[i].item()) == (r["fe"], r["le"])
    epochs, values = store.epoch_trace()
    assert epochs.tolist() == [7, 8, 9]  # ring buffer keeps the last 3 epochs
    for k, e in enumerate(epochs.tolist()):
        for i in range(n):
            ref = trace.get((i, e), math.nan)
            assert (math.isnan(ref) and math.isnan(values[i, k])) or abs(values[i, k].item() - ref) < 1e-5


def test_default_fields_fit_in_64_bytes_per_sample():
    store = SampleLossStore(100_000)
    assert store.bytes_per_sample() == 28.0
    assert store.bytes_per_sample() <= 64


def test_out_of_range_index_raises_and_changes_nothing():
    store = SampleLossStore(5)
    store.update(torch.tensor([1]), torch.tensor([1.0]), 0, 0)
    before = store.state_dict()
    for bad in (torch.tensor([2, 5]), torch.tensor([-1])):
        with pytest.raises(IndexError, match=r"outside \[0, 5\).*num_samples"):
            store.update(bad, torch.ones(bad.numel()), 1, 0)
    after = store.state_dict()
    for k, v in before.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v.nan_to_num(-9), after[k].nan_to_num(-9)), k


def test_state_dict_round_trip_and_extra_stats(tmp_path):
    store = SampleLossStore(6, trace_epochs=2)
    store.update(torch.tensor([0, 3]), torch.tensor([1.0, 2.0]), 0, 0, stats={"false_negatives": torch.tensor([2.0, 0.0])})
    store.update(torch.tensor([3]), torch.tensor([4.0]), 1, 1, stats={"false_negatives": torch.tensor([1.0])})
    state = store.state_dict()
    torch.save(state, tmp_path / "state.pt")
    loaded = SampleLossStore.from_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    for k, v in store.per_sample_tensors().items():
        assert torch.equal(v.nan_to_num(-1), loaded.per_sample_tensors()[k].nan_to_num(-1))
    assert loaded.stats["false_negatives"].tolist() == [2.0, 0, 0, 1.0, 0, 0]


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".npz"])
def test_export_reads_back_with_pandas_or_numpy(tmp_path, suffix):
    store = SampleLossStore(4, trace_epochs=2)
    store.update(torch.tensor([0, 2]), torch.tensor([0.5, 1.5]), 3, 1)
    path = store.export(tmp_path / f"h{suffix}")
    if suffix == ".npz":
        data = dict(np.load(path))
    else:
        data = pd.read_parquet(path) if suffix == ".parquet" else pd.read_csv(path)
    assert list(data["index"]) == [0, 1, 2, 3]
    assert list(data["count"]) == [1, 0, 1, 0]
    assert float(data["last_loss"][2]) == 1.5 and float(data["loss_epoch_1"][0]) == 0.5
    with pytest.raises(ValueError, match="parquet, .csv or .npz"):
        store.export(tmp_path / "h.json")


def test_invalid_arguments():
    with pytest.raises(ValueError, match="ema_decay"):
        SampleLossStore(3, ema_decay=1.0)
    with pytest.raises(ValueError, match="num_samples"):
        SampleLossStore(0)


@pytest.mark.parametrize("with_duplicates", [False, True])
def test_update_many_equals_sequential_updates(with_duplicates):
    g = torch.Generator().manual_seed(3)
    perm = torch.randperm(50, generator=g)
    observations = []
    for s in range(6):
        idx = perm[s * 8:(s + 1) * 8].clone()
        if with_duplicates and s == 4:
            idx[0] = perm[0]  # repeats an index of step 0 (like DistributedSampler padding)
        observations.append((idx, torch.rand(8, generator=g), s, 0, {"fn": torch.rand(8, generator=g)}))
    batched, sequential = SampleLossStore(50, 0.8, 2), SampleLossStore(50, 0.8, 2)
    batched.update_many(observations)
    for obs in observations:
        sequential.update(*obs)
    for k, v in sequential.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.allclose(v.nan_to_num(-1), batched.state_dict()[k].nan_to_num(-1), atol=1e-6), k
