"""CoLoR-Filter: the pure rule against an independent formula, the subset file (build, alignment checks),
the subset sampler (order, sharding, weights, mid-epoch resume), the ColorFilter callback, bad input, and
the measured selection of mislabelled samples on noisy digits."""

import math

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from helpers import resumed_batches, Recorder
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DistributedSampler

from lightning_select import ColorFilter, SelectionError
from lightning_select.data.noisy_labels import NoisyDigitsDataModule
from lightning_select.data.subset_file import load_subset_file
from lightning_select.models.classifier import NoisyLabelClassifier
from lightning_select.policies.color_filter import build_color_subset, build_color_subset_from_datamodule
from lightning_select.rules.color_filter import (
    color_scores,
    keep_of,
    keep_size,
    selection_weights,
    top_fraction_mask,
)
from lightning_select.samplers import ResumableDataLoader, SubsetSampler

N_TRAIN, KEPT = 1149, 287  # noisy digits' training split; ⌊1149 / 4⌋


def small_model():
    return NoisyLabelClassifier(arch="mlp", hidden=32)


def build(path, dm=None, **options):
    if dm is None:
        dm = NoisyDigitsDataModule()
        dm.setup("fit")
    options = {"tau": 4, "prior_epochs": 5, "conditional_epochs": 5, "lr": 3e-3, "progress": False, **options}
    return build_color_subset_from_datamodule(dm, small_model, path, **options)


@pytest.fixture(scope="module")
def subset_path(tmp_path_factory):
    return build(tmp_path_factory.mktemp("color") / "digits.pt")


# ---------------------------------------------------------------------------- the pure rule
@pytest.mark.parametrize("n, tau", [(1, 2.0), (10, 3.0), (257, 4.0), (1000, 7.0), (64, 64.0), (50, 1.5)])
def test_rule_equals_an_independent_top_k_with_lower_index_ties(n, tau):
    g = torch.Generator().manual_seed(n)
    prior = torch.randint(0, 6, (n,), generator=g).double() / 2  # many ties among the scores
    conditional = torch.randint(0, 6, (n,), generator=g).double() / 2
    scores = color_scores(prior, conditional)
    expected_scores = [float(np.float32(p) - np.float32(c)) for p, c in zip(prior.tolist(), conditional.tolist())]
    assert scores.dtype == torch.float32 and scores.tolist() == expected_scores
    k = max(1, int(n / tau + 1e-9))  # the public implementation's int(N · select_frac), at least one
    chosen = sorted(range(n), key=lambda i: (-expected_scores[i], i))[:k]
    mask = top_fraction_mask(scores, keep_of(tau=tau))
    assert mask.dtype == torch.bool and mask.nonzero().flatten().tolist() == sorted(chosen)
    assert torch.equal(selection_weights(scores, mask), mask.float())


@pytest.mark.parametrize("n, tau, classes", [(40, 4.0, 3), (257, 3.0, 10), (9, 2.0, 4)])
def test_stratified_rule_equals_an_independent_top_k_per_group(n, tau, classes):
    g = torch.Generator().manual_seed(n)
    scores = torch.randint(0, 5, (n,), generator=g).float()
    groups = torch.randint(0, classes, (n,), generator=g)
    expected = []
    for c in set(groups.tolist()):
        members = [i for i in range(n) if groups[i] == c]
        k = max(1, int(len(members) / tau + 1e-9))
        expected += sorted(members, key=lambda i: (-float(scores[i]), i))[:k]
    mask = top_fraction_mask(scores, keep_of(tau=tau), groups=groups)
    assert mask.nonzero().flatten().tolist() == sorted(expected)


def test_nan_scores_rank_last_and_keep_size_is_the_floor():
    scores = torch.tensor([float("nan"), 1.0, float("nan"), 0.5])
    assert top_fraction_mask(scores, 0.5).tolist() == [False, True, False, True]
    assert [keep_size(0.25, n) for n in (3, 4, 7, 8, 1149)] == [1, 1, 1, 2, 287]
    assert keep_size(0.1, 30) == 3  # not 2: 0.1 · 30 is 3.0000000000000004 in floats


def test_softmax_weights_equal_the_formula_and_average_one_over_the_kept():
    scores = torch.tensor([0.3, -1.0, 2.0, 0.7, 0.1])
    mask = torch.tensor([True, False, True, True, False])
    w = selection_weights(scores, mask, temperature=0.5)
    e = np.exp(np.array([0.3, 2.0, 0.7]) / 0.5)
    expected = e / e.sum() * 3
    assert w[~mask].tolist() == [0.0, 0.0]
    assert np.allclose(w[mask].numpy(), expected, rtol=1e-6) and math.isclose(float(w[mask].mean()), 1.0, rel_tol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    ({"tau": 1}, "tau=1 keeps everything"), ({"tau": 0.5}, "`tau` > 1"), ({"tau": 0}, "`tau` > 1"),
    ({"tau": -4}, "`tau` > 1"), ({"tau": float("inf")}, "`tau` > 1"), ({"tau": float("nan")}, "`tau` > 1"),
    ({"keep": 0.0}, r"\(0, 1\]"), ({"keep": 1.5}, r"\(0, 1\]"), ({"keep": -0.2}, r"\(0, 1\]"),
    ({}, "exactly one"), ({"tau": 4, "keep": 0.25}, "exactly one"),
])
def test_bad_tau_or_keep_is_a_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        keep_of(**kwargs)
    with pytest.raises(ValueError, match=match):
        ColorFilter("subset.pt", **{"tau": None, **kwargs})


def test_bad_option_types_and_values_fail_at_construction():
    with pytest.raises(TypeError, match="tau"):
        ColorFilter("s.pt", tau="4")
    for options, match in (({"prior_epochs": 0}, "prior_epochs"), ({"prior_fraction": 0.0}, "prior_fraction"),
                           ({"temperature": -1.0}, "temperature"), ({"lr": 0.0}, "lr")):
        with pytest.raises(ValueError, match=match):
            ColorFilter("s.pt", **options)
    with pytest.raises(TypeError, match="build_if_missing"):
        ColorFilter("s.pt", build_if_missing="yes")
    assert ColorFilter("s.pt", tau=None, keep=1.0).keep == 1.0  # an explicit keep-everything control is allowed


# ---------------------------------------------------------------------------- the subset file
def test_built_file_keeps_the_top_quarter_by_prior_minus_conditional_loss(subset_path):
    dm = NoisyDigitsDataModule()
    dm.setup("fit")
    subset = load_subset_file(subset_path, dm.train_labels)
    assert subset.num_samples == N_TRAIN and int(subset.kept.sum()) == KEPT == subset.meta["num_kept"]
    assert torch.equal(subset.targets, dm.train_labels)  # stored beside the scores, by sample index
    assert torch.equal(subset.scores, subset.prior_loss - subset.conditional_loss)
    assert torch.equal(subset.kept, top_fraction_mask(subset.scores, 0.25))
    assert torch.equal(subset.weights, subset.kept.float())
    assert subset.meta["keep"] == 0.25 and subset.meta["tau"] == 4.0 and subset.meta["prior_samples"] == N_TRAIN
    assert subset.meta["target_samples"] == len(dm.holdout_set)
    assert float(subset.scores[subset.kept].min()) >= float(subset.scores[~subset.kept].max())


def test_building_leaves_the_callers_rng_untouched_and_is_deterministic(tmp_path, subset_path):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    again = build(tmp_path / "again.pt")
    assert torch.equal(torch.get_rng_state(), before)
    a, b = torch.load(subset_path, weights_only=True), torch.load(again, weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in ("kept", "score", "targets"))


def test_the_conditional_model_fits_the_target_key(tmp_path):
    """With conditional_target_key='label' the fine-tune fits the holdout's noisy labels: another selection."""
    noisy_target = load_subset_file(build(tmp_path / "noisy.pt", conditional_target_key="label"))
    clean_target = load_subset_file(build(tmp_path / "clean.pt"))
    assert not torch.equal(noisy_target.kept, clean_target.kept)


def test_stratified_file_keeps_a_quarter_of_every_label(tmp_path):
    dm = NoisyDigitsDataModule()
    dm.setup("fit")
    subset = load_subset_file(build(tmp_path / "strat.pt", dm=dm, stratify=True), dm.train_labels)
    counts = torch.bincount(dm.train_labels, minlength=10)
    assert torch.bincount(dm.train_labels[subset.kept], minlength=10).tolist() == (counts // 4).tolist()
    assert subset.meta["stratify"] is True


def test_prior_fraction_trains_the_prior_on_a_seeded_share(tmp_path):
    subset = load_subset_file(build(tmp_path / "half.pt", prior_fraction=0.5, prior_epochs=2, conditional_epochs=2))
    assert subset.meta["prior_samples"] == round(0.5 * N_TRAIN) and subset.meta["prior_fraction"] == 0.5


def _damaged(path, tmp_path, damage):
    raw = torch.load(path, weights_only=True)
    if damage == "length":
        raw = {k: (v[:-3] if isinstance(v, torch.Tensor) else v) for k, v in raw.items()}
    else:
        raw["targets"][[4, 10, 11]] = (raw["targets"][[4, 10, 11]] + 1) % 10
    bad = tmp_path / f"bad_{damage}.pt"
    torch.save(raw, bad)
    return bad


def fit(callbacks, datamodule, ckpt_path=None, **kwargs):
    pl.seed_everything(0)
    options = {"accelerator": "cpu", "devices": 1, "max_epochs": 1, "logger": False, "enable_checkpointing": False,
               "enable_progress_bar": False, "enable_model_summary": False, "limit_val_batches": 0, **kwargs}
    model = small_model()
    pl.Trainer(callbacks=callbacks, **options).fit(model, datamodule, ckpt_path=ckpt_path)
    return model


@pytest.mark.parametrize("damage", ["length", "targets"])
def test_misaligned_file_is_refused_before_anything_is_trained(subset_path, tmp_path, damage):
    bad = _damaged(subset_path, tmp_path, damage)
    recorder = Recorder()
    with pytest.raises(SelectionError) as err:
        fit([recorder], NoisyDigitsDataModule(sampler="subset_file", subset_path=str(bad)))
    message = str(err.value)
    assert str(bad) in message and "python -m lightning_select.color_filter" in message
    assert ("holds 1146 samples" in message) if damage == "length" else \
        ("differ at 3 of 1149" in message and "[4, 10, 11]" in message)
    assert recorder.records == []
    with pytest.raises(SelectionError, match="differ at 3 of" if damage == "targets" else "1146"):  # the callback too
        fit([ColorFilter(bad, build_if_missing=False, check_options=False)], NoisyDigitsDataModule())


def test_missing_file_names_the_command_that_builds_it(tmp_path):
    missing = tmp_path / "none.pt"
    with pytest.raises(SelectionError, match=r"No CoLoR-Filter subset file at .*python -m lightning_select.color_filter"):
        fit([], NoisyDigitsDataModule(sampler="subset_file", subset_path=str(missing)))
    with pytest.raises(SelectionError, match="build_if_missing=False.*python -m lightning_select.color_filter"):
        fit([ColorFilter(missing, build_if_missing=False)], NoisyDigitsDataModule(sampler="subset_file",
                                                                                  subset_path=str(missing)))
    assert not missing.exists()


def test_other_files_and_empty_subsets_are_refused(subset_path, tmp_path):
    from lightning_select.policies.reducible_loss import _write_table

    rho = _write_table(tmp_path / "rho.pt", 3, torch.arange(3), torch.ones(3), torch.zeros(3), {})
    with pytest.raises(SelectionError, match="is not a CoLoR-Filter subset file .*'score'"):
        load_subset_file(rho)
    raw = torch.load(subset_path, weights_only=True)
    raw["kept"][:] = False
    torch.save(raw, tmp_path / "empty.pt")
    with pytest.raises(SelectionError, match="keeps no sample"):
        load_subset_file(tmp_path / "empty.pt")


def test_datamodule_option_needs_its_path():
    with pytest.raises(ValueError, match="subset_path"):
        NoisyDigitsDataModule(sampler="subset_file")
    with pytest.raises(ValueError, match="subset_path"):
        NoisyDigitsDataModule(subset_path="s.pt")


# ---------------------------------------------------------------------------- the sampler
def test_sampler_permutes_the_subset_per_epoch_as_a_pure_function_of_seed_and_epoch():
    kept = [3, 9, 4, 17, 11, 0, 8]
    s = SubsetSampler(kept, seed=5)
    orders = []
    for epoch in range(3):
        s.set_epoch(epoch)
        orders.append(list(s))
    assert all(sorted(o) == sorted(kept) for o in orders) and len(s) == 7
    assert orders[0] != orders[1] or orders[1] != orders[2]
    fresh = SubsetSampler(list(reversed(kept)), seed=5)  # the input order does not matter
    fresh.set_epoch(2)
    assert list(fresh) == orders[2]


@pytest.mark.parametrize("m, world", [(7, 2), (8, 2), (5, 3), (1, 2)])
def test_sampler_shards_like_distributed_sampler(m, world):
    kept = list(range(10, 10 + 2 * m, 2))
    full = SubsetSampler(kept, seed=1)
    full.set_epoch(4)
    order = list(full)
    shares = []
    for rank in range(world):
        s = SubsetSampler(kept, seed=1, num_replicas=world, rank=rank)
        s.set_epoch(4)
        reference = DistributedSampler(order, num_replicas=world, rank=rank, shuffle=False)
        assert list(s) == [order[i] for i in reference] and len(s) == len(reference) == math.ceil(m / world)
        shares += list(s)
    assert set(shares) == set(kept)


def test_weighted_sampler_draws_by_the_weights():
    s = SubsetSampler([0, 1, 2], seed=0, weights=[1.0, 3.0, 0.0])
    counts = torch.zeros(3)
    for epoch in range(2000):
        s.set_epoch(epoch)
        counts += torch.bincount(torch.tensor(list(s)), minlength=3)
    assert counts[2] == 0 and abs(float(counts[1] / counts.sum()) - 0.75) < 0.02


@pytest.mark.parametrize("kwargs, match", [
    ({"indices": []}, "non-empty"), ({"indices": [1.0, 2.0]}, "integer"), ({"indices": [1, 1]}, "distinct"),
    ({"indices": [-1, 2]}, "non-negative"), ({"indices": [1, 2], "weights": [1.0]}, "weights"),
    ({"indices": [1, 2], "weights": [0.0, 0.0]}, "weights"), ({"indices": [1, 2], "weights": [1.0, -1.0]}, "weights"),
    ({"indices": [1, 2], "num_replicas": 2, "rank": 2}, "rank"),
])
def test_sampler_refuses_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SubsetSampler(**kwargs)


def test_sampler_resumes_mid_epoch_exactly_in_a_resumable_loader():
    def loader():
        sampler = SubsetSampler(list(range(0, 90, 3)), seed=2, num_replicas=2, rank=1)
        sampler.set_epoch(3)
        return ResumableDataLoader(list(range(100)), batch_size=4, sampler=sampler)

    full, resumed = resumed_batches(loader, stop_after=2)
    assert resumed == full and len(full) == math.ceil(15 / 4)


# ---------------------------------------------------------------------------- the callback in a Trainer
def test_callback_builds_a_missing_file_and_training_stays_inside_the_subset(tmp_path):
    path = tmp_path / "built.pt"
    recorder = Recorder()
    policy = ColorFilter(path, prior_epochs=3, conditional_epochs=3, progress=False)
    fit([policy, recorder], NoisyDigitsDataModule(batch_size=64, sampler="subset_file", subset_path=str(path)),
        max_epochs=2)
    subset = load_subset_file(path)
    trained = torch.cat([r["indices"] for r in recorder.records])
    assert int(subset.kept.sum()) == KEPT and subset.meta["prior_epochs"] == 3 and subset.meta["seed"] == 0
    assert len(recorder.records) == 2 * math.ceil(KEPT / 64)  # the step count of the subset, not of all 1149
    assert sorted(trained.tolist()) == sorted(subset.indices.tolist() * 2)  # each kept sample once per epoch
    assert policy.trained_rows == 2 * KEPT and policy.steps == len(recorder.records)
    with pytest.raises(SelectionError, match="other options .*tau|other options .*keep"):  # a stale file is refused
        fit([ColorFilter(path, tau=8, prior_epochs=3, conditional_epochs=3)],
            NoisyDigitsDataModule(sampler="subset_file", subset_path=str(path)))


def test_callback_refuses_a_loader_that_ignores_the_file(subset_path):
    recorder = Recorder()
    with pytest.raises(SelectionError, match="outside the CoLoR-Filter subset.*sampler='subset_file'"):
        fit([ColorFilter(subset_path, build_if_missing=False, check_options=False), recorder], NoisyDigitsDataModule())
    assert len(recorder.records) <= 1


def test_mid_epoch_resume_is_exact(subset_path, tmp_path):
    def run(name, ckpt_path=None, **kw):
        recorder = Recorder()
        policy = ColorFilter(subset_path, build_if_missing=False, check_options=False)
        ckpt = ModelCheckpoint(dirpath=tmp_path / name, save_last=True, save_top_k=0, every_n_train_steps=4)
        dm = NoisyDigitsDataModule(batch_size=64, sampler="subset_file", subset_path=str(subset_path))
        model = fit([policy, recorder, ckpt], dm, ckpt_path=ckpt_path, enable_checkpointing=True, **kw)
        return model, policy, recorder.records

    full_model, full, full_steps = run("full", max_epochs=3)
    run("part", max_epochs=3, max_steps=8)  # 5 steps per epoch: stops at the 3rd step of epoch 1
    model, resumed, steps = run("resumed", ckpt_path=tmp_path / "part" / "last.ckpt", max_epochs=3)
    assert len(full_steps) == 15 and len(steps) == 7
    for a, b in zip(full_steps[8:], steps):
        assert torch.equal(a["indices"], b["indices"]) and torch.equal(a["losses"], b["losses"])
    assert full.state_dict()["trained_rows"] == resumed.state_dict()["trained_rows"] == 3 * KEPT
    assert torch.equal(full.score_sum, resumed.score_sum)
    for p, q in zip(full_model.parameters(), model.parameters()):
        assert torch.equal(p, q)


# ---------------------------------------------------------------------------- measured on noisy digits
def test_color_filter_keeps_far_fewer_mislabelled_samples_than_the_base_rate(tmp_path):
    """Seed 0, the Hydra defaults (MLP 128, 20 + 20 epochs, tau=4): measured ratio 0.035 (3 seeds: 0.035-0.057,
    benchmarks/results/color_filter.json); asserted < 0.25 of the base rate."""
    dm = NoisyDigitsDataModule(seed=0)
    dm.setup("fit")
    path = build_color_subset_from_datamodule(
        dm, lambda: NoisyLabelClassifier(arch="mlp", hidden=128, lr=3e-3, weight_decay=0.01), tmp_path / "s.pt",
        tau=4, prior_epochs=20, conditional_epochs=20, lr=3e-3, progress=False)
    subset = load_subset_file(path, dm.train_labels)
    noisy = dm.train_noisy_mask
    base, share = float(noisy.float().mean()), float(noisy[subset.kept].float().mean())
    assert 0.28 < base < 0.31 and share / base < 0.25, (share, base)
    # the score separates the mislabelled samples (AUC of −score as a detector of a wrong label)
    scores = subset.scores
    pos, neg = scores[noisy], scores[~noisy]
    auc = float((neg.view(-1, 1) > pos.view(1, -1)).float().mean())
    assert auc > 0.9, auc


def test_build_color_subset_accepts_a_given_prior(tmp_path):
    dm = NoisyDigitsDataModule()
    dm.setup("fit")
    prior = small_model()
    torch.save(prior.state_dict(), tmp_path / "prior.pt")
    path = build_color_subset(small_model, dm.scoring_dataloader(), dm.holdout_dataloader(64, True),
                              dm.scoring_dataloader(), tmp_path / "given.pt", keep=0.5, prior_epochs=1,
                              conditional_epochs=2, prior_state=tmp_path / "prior.pt", progress=False)
    subset = load_subset_file(path, dm.train_labels)
    assert int(subset.kept.sum()) == N_TRAIN // 2 and subset.meta["prior_state"] == str(tmp_path / "prior.pt")
    with torch.no_grad():  # the prior losses are the given model's
        batch = next(iter(dm.scoring_dataloader()))
        expected = prior.training_step(batch, 0)["loss"]
    assert torch.allclose(subset.prior_loss[batch["index"]], expected, atol=1e-6)


def test_command_line_builds_the_file_and_reports_the_mislabelled_share(tmp_path, capsys):
    import json

    from lightning_select.color_filter import main

    summary = main(["--out", str(tmp_path / "cli.pt"), "--tau", "4", "--prior-epochs", "3", "--conditional-epochs",
                    "3", "--hidden", "32", "--no-progress", "--export", str(tmp_path / "scores.npz")])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == summary
    assert summary["num_samples"] == N_TRAIN and summary["num_kept"] == KEPT and summary["base_rate"] > 0.28
    assert load_subset_file(tmp_path / "cli.pt").meta["prior_epochs"] == 3
    assert set(np.load(tmp_path / "scores.npz").files) >= {"index", "score", "kept", "mislabelled"}
    with pytest.raises(SystemExit):  # tau and keep are exclusive
        main(["--out", "x.pt", "--tau", "4", "--keep", "0.5"])
    with pytest.raises(ValueError, match="`tau` > 1"):
        main(["--out", str(tmp_path / "bad.pt"), "--tau", "1", "--prior-epochs", "1", "--conditional-epochs", "1"])
