"""SampleTable against a per-sample Python reference, plus schema, trace, state and export checks."""

import math

import numpy as np
import pytest
import torch

from lightning_select import SampleTable

REDUCES = ["last", "first", "sum", "ema", "max", "min", "count"]


def _reference(updates, n, decay):
    """Per-sample Python replay: duplicates within one update are one observation (mean of floats)."""
    ref = {r: [math.nan] * n for r in REDUCES if r != "count"}
    ref["count"] = [0] * n
    for idx, val in updates:
        groups = {}
        for i, v in zip(idx, val):
            groups.setdefault(i, []).append(v)
        for i, vs in groups.items():
            mean = sum(vs) / len(vs)
            ref["last"][i] = mean
            if math.isnan(ref["first"][i]):
                ref["first"][i] = mean
            ref["sum"][i] = (0.0 if math.isnan(ref["sum"][i]) else ref["sum"][i]) + sum(vs)
            ref["ema"][i] = mean if math.isnan(ref["ema"][i]) else decay * ref["ema"][i] + (1 - decay) * mean
            ref["max"][i] = max(vs) if math.isnan(ref["max"][i]) else max(ref["max"][i], max(vs))
            ref["min"][i] = min(vs) if math.isnan(ref["min"][i]) else min(ref["min"][i], min(vs))
            ref["count"][i] += 1
    return ref


def test_every_reduce_matches_a_python_reference_with_duplicates():
    n, decay = 20, 0.7
    g = torch.Generator().manual_seed(0)
    table = SampleTable(n)
    for r in REDUCES:
        default = 0 if r == "count" else float("nan")
        table.add_column(r, torch.int32 if r == "count" else torch.float64, default, r,
                         ema_decay=decay if r == "ema" else None)
    updates = []
    for _ in range(12):
        idx = torch.randint(0, n, (9,), generator=g)  # repeats within an update on purpose
        val = torch.randn(9, generator=g, dtype=torch.float64)
        table.update(idx, {r: val for r in REDUCES if r != "count"})
        updates.append((idx.tolist(), val.tolist()))
    ref = _reference(updates, n, decay)
    for r in REDUCES:
        ours = table[r].double().tolist()
        for i in range(n):
            if math.isnan(ref[r][i]) if isinstance(ref[r][i], float) else False:
                assert math.isnan(ours[i]), (r, i)
            else:
                assert ours[i] == pytest.approx(ref[r][i], abs=1e-9), (r, i)


def test_integer_columns_keep_the_latest_duplicate_and_first_keeps_the_first():
    table = SampleTable(4)
    table.add_column("first_step", torch.int32, -1, "first")
    table.add_column("last_step", torch.int32, -1, "last")
    table.update(torch.tensor([2, 2]), {"first_step": torch.tensor([3, 5]), "last_step": torch.tensor([3, 5])})
    table.update(torch.tensor([2]), {"first_step": 9, "last_step": 9})
    assert table["first_step"].tolist() == [-1, -1, 5, -1] and table["last_step"].tolist() == [-1, -1, 9, -1]


def test_schema_errors_name_the_problem():
    table = SampleTable(3)
    table.add_column("x", torch.float32, 0.0, "sum")
    table.add_column("x", torch.float32, 0.0, "sum")  # identical declaration: idempotent
    with pytest.raises(ValueError, match="already declared"):
        table.add_column("x", torch.float32, 0.0, "max")
    with pytest.raises(ValueError, match="reduce"):
        table.add_column("y", reduce="median")
    with pytest.raises(ValueError, match="ema_decay"):
        table.add_column("y", reduce="ema")
    with pytest.raises(KeyError, match="Unknown column"):
        table.update(torch.tensor([0]), {"nope": torch.ones(1)})
    before = table["x"].clone()
    with pytest.raises(IndexError, match=r"outside \[0, 3\).*No state was changed"):
        table.update(torch.tensor([0, 3]), {"x": torch.ones(2)})
    assert torch.equal(table["x"], before)
    with pytest.raises(ValueError, match="num_samples"):
        SampleTable(0)


def test_trace_ring_buffer_clears_a_reused_slot():
    table = SampleTable(3)
    table.add_trace("loss", epochs=2)
    table.update_trace("loss", torch.tensor([0, 1]), torch.tensor([1.0, 2.0]), epoch=0)
    table.update_trace("loss", torch.tensor([1]), torch.tensor([3.0]), epoch=1)
    table.update_trace("loss", torch.tensor([2, 2]), torch.tensor([4.0, 6.0]), epoch=2)  # reuses epoch 0's slot
    epochs, values = table.trace("loss")
    assert epochs.tolist() == [1, 2]
    assert values[:, 0].nan_to_num(-1).tolist() == [-1, 3.0, -1] and values[:, 1].nan_to_num(-1).tolist() == [-1, -1, 5.0]


def test_state_round_trip_is_bit_exact_and_memory_is_measured(tmp_path):
    table = SampleTable(5)
    table.add_column("loss", torch.float32, float("nan"), "ema", ema_decay=0.9)
    table.add_column("seen", torch.int32, 0, "count")
    table.add_trace("loss_trace", 3)
    table.update(torch.tensor([1, 4]), {"loss": torch.tensor([0.25, 1.5])})
    table.update_trace("loss_trace", torch.tensor([1]), torch.tensor([0.25]), epoch=0)
    torch.save(table.state_dict(), tmp_path / "t.pt")
    loaded = SampleTable.from_state_dict(torch.load(tmp_path / "t.pt", weights_only=True))
    for name in ("loss", "seen"):
        assert torch.equal(loaded[name].nan_to_num(-7), table[name].nan_to_num(-7))
    assert torch.equal(loaded.trace("loss_trace")[1].nan_to_num(-7), table.trace("loss_trace")[1].nan_to_num(-7))
    assert table.bytes_per_sample(include_traces=False) == 8.0 and table.bytes_per_sample() == 20.0
    cols = table.to_columns()
    assert list(cols) == ["index", "loss", "seen", "loss_trace_epoch_0"]
    assert np.array_equal(cols["seen"], [0, 1, 0, 0, 1])
