"""RHO-LOSS: the pure top-fraction rules, the irreducible-loss table, and ``ReducibleLossSelection`` on noisy digits."""

import math

import lightning.pytorch as pl
import pytest
import torch
from helpers import Recorder, ScoreRecorder

from lightning_select import ReducibleLossSelection, SelectionAudit, SelectionError
from lightning_select.data.noisy_labels import NoisyDigitsDataModule
from lightning_select.models.classifier import NoisyLabelClassifier
from lightning_select.policies.reducible_loss import (
    build_irreducible_table,
    build_irreducible_table_two_halves,
    load_irreducible_table,
)
from lightning_select.rules.reducible_loss import global_top_fraction, keep_count, reducible_loss, top_fraction


def brute_top(scores, k):
    """Positions of the k largest scores, ties by lower position, sorted: an independent formula."""
    return sorted(sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k])


# ---------------------------------------------------------------------------- the pure rules
@pytest.mark.parametrize("keep", [0.05, 0.1, 1 / 3, 0.5, 0.999, 1.0])
def test_top_fraction_equals_brute_force_sort(keep):
    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 7, 64, 320):
        scores = torch.randint(0, 5, (n,), generator=g).float()  # many ties
        k = math.ceil(round(keep * n, 9))
        assert top_fraction(scores, keep).tolist() == brute_top(scores.tolist(), k)


def test_keep_count_and_reducible_loss():
    assert [keep_count(0.1, n) for n in (320, 256, 125, 1, 9)] == [32, 26, 13, 1, 1]
    r = reducible_loss(torch.tensor([2.0, 1.0]), torch.tensor([0.5, 1.5]))
    assert r.tolist() == [1.5, -0.5] and r.dtype == torch.float32


def test_global_top_fraction_differs_from_per_rank_on_a_two_rank_example():
    gathered = torch.tensor([[9.0, 1.0, 8.0, 7.0],   # rank 0: the three largest scores of all
                             [2.0, 6.0, 0.0, 3.0]])  # rank 1
    per_rank = [top_fraction(gathered[r], 0.5).tolist() for r in range(2)]
    global_ = [global_top_fraction(gathered[r], gathered, r, 0.5).tolist() for r in range(2)]
    assert per_rank == [[0, 2], [1, 3]]             # 2 + 2 rows
    assert global_ == [[0, 2, 3], [1]]              # the global top 4: 9, 8, 7 (rank 0) and 6 (rank 1)
    flat = gathered.flatten().tolist()
    assert sorted(r * 4 + p for r in range(2) for p in global_[r]) == brute_top(flat, 4)
    # a tie across ranks goes to the lower global position (rank 0)
    tie = torch.tensor([[5.0, 1.0], [5.0, 0.0]])
    assert [global_top_fraction(tie[r], tie, r, 0.25).tolist() for r in range(2)] == [[0], []]
    # padding (counts) never counts, even when larger
    padded = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, 5.0]])
    counts = torch.tensor([2, 3])
    assert [global_top_fraction(padded[r, :int(counts[r])], padded, r, 0.4, counts).tolist() for r in range(2)] \
        == [[], [1, 2]]
    with pytest.raises(ValueError, match="row 1"):
        global_top_fraction(gathered[0], gathered, 1, 0.5)


# ---------------------------------------------------------------------------- the table
@pytest.fixture(scope="module")
def digits():
    dm = NoisyDigitsDataModule(batch_size=320)
    dm.setup("fit")
    return dm


@pytest.fixture(scope="module")
def table(digits, tmp_path_factory):
    path = tmp_path_factory.mktemp("rho") / "il.pt"
    build_irreducible_table(lambda: NoisyLabelClassifier(arch="mlp", hidden=64), digits.holdout_dataloader(64, True),
                            digits.scoring_dataloader(), epochs=15, path=path, lr=3e-3, progress=False)
    return path


def test_table_round_trip(table, digits):
    il, targets, meta = load_irreducible_table(table, digits.train_labels)
    raw = torch.load(table, weights_only=True)
    assert il.dtype == torch.float32 and il.shape == (len(digits.train_set),) and bool(torch.isfinite(il).all())
    assert torch.equal(targets, digits.train_labels) and torch.equal(raw["irreducible_loss"], il)
    assert meta["source"] == "holdout" and meta["num_samples"] == len(digits.train_set)
    # the IL model (trained on noisy holdout labels) gives mislabelled samples a higher irreducible loss
    noisy = digits.train_noisy_mask
    assert float(il[noisy].mean()) > float(il[~noisy].mean())


def test_two_halves_table_covers_every_sample(digits, tmp_path):
    path = build_irreducible_table_two_halves(lambda: NoisyLabelClassifier(arch="mlp", hidden=32), digits.train_set,
                                              epochs=2, path=tmp_path / "halves.pt", split="permutation",
                                              progress=False)
    il, targets, meta = load_irreducible_table(path, digits.train_labels)
    assert bool(torch.isfinite(il).all()) and meta["source"] == "two_halves/permutation"
    assert torch.equal(targets, digits.train_labels)


def _fit(policies, epochs=1, batch_size=320, **kwargs):
    pl.seed_everything(0)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=policies,
                         **kwargs)
    trainer.fit(NoisyLabelClassifier(arch="mlp", hidden=64), NoisyDigitsDataModule(batch_size=batch_size))
    return trainer


@pytest.mark.parametrize("damage", ["length", "targets"])
def test_mismatched_table_raises_before_anything_is_trained(table, tmp_path, damage):
    raw = torch.load(table, weights_only=True)
    if damage == "length":
        raw = {**raw, "irreducible_loss": raw["irreducible_loss"][:-3], "targets": raw["targets"][:-3]}
    else:
        raw["targets"][[4, 10, 11]] = (raw["targets"][[4, 10, 11]] + 1) % 10
    bad = tmp_path / "bad.pt"
    torch.save(raw, bad)
    recorder = Recorder()
    with pytest.raises(SelectionError) as err:
        _fit([ReducibleLossSelection(bad, build_if_missing=False), recorder])
    message = str(err.value)
    assert str(bad) in message and "rebuild it with" in message
    assert ("1146 samples" in message) if damage == "length" else ("differ at 3 of" in message and "[4, 10, 11]" in message)
    assert recorder.records == []


def test_missing_table_without_building_names_the_command(tmp_path):
    with pytest.raises(SelectionError, match="build_irreducible_table"):
        _fit([ReducibleLossSelection(tmp_path / "none.pt", build_if_missing=False)])


@pytest.mark.parametrize("options, error", [
    ({"keep": 0.0}, ValueError), ({"keep": 1.5}, ValueError), ({"keep": -0.1}, ValueError),
    ({"keep": "0.1"}, TypeError), ({"scope": "world"}, ValueError), ({"scoring_mode": "test"}, ValueError),
    ({"il_epochs": 0}, ValueError), ({"build_if_missing": "yes"}, TypeError),
])
def test_invalid_options_raise_at_construction(options, error):
    with pytest.raises(error, match=next(iter(options))):
        ReducibleLossSelection("il.pt", **options)


# ---------------------------------------------------------------------------- end to end
def test_trained_rows_are_the_top_reducible_losses(table, digits):
    policy, recorder = ReducibleLossSelection(table, keep=0.1, build_if_missing=False), ScoreRecorder()
    _fit([policy, recorder], epochs=2)
    il = load_irreducible_table(table)[0]
    assert len(recorder.steps) == 2 * 4  # 1149 rows in batches of 320
    for scores, indices, kept in recorder.steps:
        reducible = (scores - il[indices]).tolist()
        expected = brute_top(reducible, math.ceil(round(0.1 * len(reducible), 9)))
        assert kept.tolist() == indices[expected].tolist()
    assert policy.kept_rows == 2 * (3 * 32 + 19)


def test_builds_the_table_on_first_use_and_then_reuses_it(tmp_path):
    path = tmp_path / "built" / "il.pt"
    rec_built, rec_loaded = ScoreRecorder(), ScoreRecorder()
    _fit([ReducibleLossSelection(path, il_epochs=2, progress=False), rec_built])
    assert path.is_file()
    stamp = path.stat().st_mtime_ns
    _fit([ReducibleLossSelection(path, il_epochs=2, progress=False), rec_loaded])  # the table now exists
    assert path.stat().st_mtime_ns == stamp  # not rebuilt
    assert len(rec_built.steps) == len(rec_loaded.steps) == 4
    for a, b in zip(rec_built.steps, rec_loaded.steps):  # building inside the fit changed nothing else
        assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])


def test_rho_loss_trains_on_fewer_mislabelled_samples_than_the_base_rate(table, capsys):
    audit = SelectionAudit(datamodule_attr="train_noisy_mask")
    _fit([ReducibleLossSelection(table, keep=0.1, build_if_missing=False), audit], epochs=10)
    with capsys.disabled():
        print(f"\n[rho_loss] mislabelled share of trained rows {audit.share:.3f} vs base rate {audit.base_rate:.3f} "
              f"(ratio {audit.ratio:.3f}, 10 epochs, 320 -> 32)")
    assert audit.ratio < 0.8


def test_plain_dataloader_reads_the_targets_from_the_dataset_items(table, digits):
    """Without a datamodule the start check reads the training dataset's items; a wrong target_key is named."""
    from torch.utils.data import DataLoader

    recorder = ScoreRecorder()
    pl.seed_everything(0)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[ReducibleLossSelection(table, build_if_missing=False), recorder])
    trainer.fit(NoisyLabelClassifier(arch="mlp", hidden=64), DataLoader(digits.train_set, batch_size=320))
    assert len(recorder.steps) == 4
    with pytest.raises(SelectionError, match="target_key='y'"):
        pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False,
                   callbacks=[ReducibleLossSelection(table, target_key="y", build_if_missing=False)]).fit(
            NoisyLabelClassifier(arch="mlp", hidden=64), DataLoader(digits.train_set, batch_size=320))
