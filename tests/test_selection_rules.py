"""Selective-Backprop and UniformSubset: the pure rules against independent formulas, option errors,
and end-to-end checks of the scoring pass, the schedule, stale scores and mid-epoch resume."""

import collections
import itertools
import math

import lightning.pytorch as pl
import pytest
import torch
from helpers import PerSampleRegressor, Recorder, regression_loader
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_select import SelectionError, SelectiveBackprop, UniformSubset
from lightning_select.rules.selection import (
    bernoulli_keep,
    composer_keep,
    loss_percentiles,
    push_history,
    selective_backprop_probabilities,
    uniform_keep,
)


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------- the paper's rule
def test_percentiles_equal_scipy_rank_percentile_of_score():
    stats = pytest.importorskip("scipy.stats")
    g = gen(0)
    history = torch.randint(0, 12, (300,), generator=g).float() / 4  # many ties
    history[torch.randperm(300, generator=g)[:40]] = float("nan")  # empty slots
    losses = torch.cat([torch.randint(-2, 14, (200,), generator=g).float() / 4, history[:20]])
    got = loss_percentiles(losses, history)
    finite = history[~history.isnan()].numpy()
    expected = []
    for x in losses.tolist():
        if math.isnan(x):
            expected.append(1.0)
        else:
            expected.append(stats.percentileofscore(finite, x, kind="rank") / 100)
    assert torch.allclose(got, torch.tensor(expected, dtype=torch.float64), atol=1e-12)


def test_probabilities_brute_force_floor_beta_nan_and_empty_history():
    g = gen(1)
    history = torch.randn(50, generator=g)
    losses = torch.randn(30, generator=g)
    for beta, floor in [(3.0, 0.0), (1.0, 0.2), (0.0, 0.0), (5.5, 0.05)]:
        got = selective_backprop_probabilities(losses, history, beta, floor)
        for x, p in zip(losses.tolist(), got.tolist()):
            below = sum(h < x for h in history.tolist())
            equal = sum(h == x for h in history.tolist())
            f = (2 * below + equal + (equal > 0)) / (2 * len(history))
            assert p == pytest.approx(max(floor, f ** beta), abs=1e-6)
    assert selective_backprop_probabilities(torch.tensor([float("nan")]), history).item() == 1.0
    empty = torch.full((8,), float("nan"))
    assert torch.equal(selective_backprop_probabilities(losses, empty), torch.ones(30))
    assert got.dtype == torch.float32


def test_paper_keeps_one_over_beta_plus_one_of_uniform_losses():
    """E[F^β] = 1/(β+1) when losses are spread like the history; the Bernoulli draw realises it."""
    g = gen(2)
    history = torch.rand(50000, generator=g)  # large, so that its own sampling noise is below the tolerance
    losses = torch.rand(20000, generator=g)
    for beta in (1.0, 3.0):
        p = selective_backprop_probabilities(losses, history, beta)
        assert float(p.mean()) == pytest.approx(1 / (beta + 1), abs=0.01)
        kept = bernoulli_keep(p, gen(3)).float().mean()
        assert float(kept) == pytest.approx(float(p.mean()), abs=0.01)


def test_bernoulli_keep_rates_edges_and_determinism():
    p = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0])
    draws = torch.stack([bernoulli_keep(p, gen(s)) for s in range(4000)]).float()
    assert draws[:, 0].sum() == 0 and draws[:, 4].sum() == 4000
    assert torch.allclose(draws.mean(0), p, atol=0.025)
    assert torch.equal(bernoulli_keep(p, gen(7)), bernoulli_keep(p, gen(7)))
    assert bernoulli_keep(p, gen(7)).dtype == torch.bool


def test_push_history_equals_a_deque_of_the_last_r_values():
    r = 7
    buffer, position, reference = torch.full((r,), float("nan")), 0, collections.deque(maxlen=r)
    g, pushed = gen(4), 0
    for m in [3, 0, 5, 1, 12, 7, 2]:
        values = torch.randn(m, generator=g)
        position = push_history(buffer, position, values)
        reference.extend(values.tolist())
        pushed += m
        assert sorted(buffer[~buffer.isnan()].tolist()) == sorted(reference)
        assert position == pushed % r
    # the next write overwrites the oldest value
    oldest = reference[0]
    push_history(buffer, position, torch.tensor([100.0]))
    assert oldest not in buffer.tolist() and 100.0 in buffer.tolist()


# ---------------------------------------------------------------------------- Composer's rule
def _successive_sampling_probabilities(weights, count):
    """Exact probability of each set drawn by successive sampling without replacement (np.random.choice)."""
    n, total = len(weights), sum(weights)
    out = collections.defaultdict(float)
    for order in itertools.permutations(range(n), count):
        p, left = 1.0, total
        for i in order:
            p *= weights[i] / left
            left -= weights[i]
        out[frozenset(order)] += p
    return out


def test_composer_draw_matches_successive_sampling_with_rank_weights():
    losses = torch.tensor([0.3, 2.0, 0.1, 0.9, 5.0])  # ranks: 0.1→0, 0.3→1, 0.9→2, 2.0→3, 5.0→4
    keep, n = 0.4, 5  # int(0.4·5) = 2 draws, weights ((r + 0.5)/5)^(1/0.4 − 1)
    rank_of = {2: 0, 0: 1, 3: 2, 1: 3, 4: 4}
    weights = [((rank_of[i] + 0.5) / n) ** 1.5 for i in range(n)]
    exact = _successive_sampling_probabilities(weights, 2)
    trials = 20000
    counts = collections.Counter(frozenset(composer_keep(losses, keep, gen(s)).tolist()) for s in range(trials))
    for subset, p in exact.items():
        assert counts[subset] / trials == pytest.approx(p, abs=0.012), (sorted(subset), p)


def test_composer_counts_order_monotonicity_and_rank_invariance():
    g = gen(5)
    losses = torch.rand(40, generator=g)
    for keep in (0.1, 0.25, 0.5, 1.0):
        pos = composer_keep(losses, keep, gen(0))
        assert pos.numel() == int(keep * 40) and torch.equal(pos, pos.unique())  # sorted, distinct
    assert composer_keep(torch.rand(3), 0.3, gen(0)).numel() == 0  # int(0.9) = 0, as in Composer
    # only ranks matter: a monotone transform of the losses gives the same draw
    assert torch.equal(composer_keep(losses, 0.25, gen(9)), composer_keep(losses.exp() * 3, 0.25, gen(9)))
    # inclusion frequency rises with the rank
    freq = torch.zeros(40)
    for s in range(3000):
        freq[composer_keep(losses, 0.25, gen(s))] += 1
    by_rank = freq[losses.argsort()]
    assert bool((by_rank[-8:].mean() > by_rank[16:24].mean()) and (by_rank[16:24].mean() > by_rank[:8].mean()))
    # keep = 1/(β+1) gives the paper's weights F^β with F = (rank + 0.5)/N: same expected count as the paper
    expected_paper = ((torch.arange(40) + 0.5) / 40).pow(3).sum()
    assert composer_keep(losses, 0.25, gen(0)).numel() == 10 == round(float(expected_paper))


# ---------------------------------------------------------------------------- uniform subset
def test_uniform_keep_size_inclusion_and_unbiased_mean():
    assert [uniform_keep(n, 0.5, gen(0)).numel() for n in (0, 1, 3, 8, 157)] == [0, 1, 2, 4, 78]
    assert uniform_keep(10, 0.01, gen(0)).numel() == 1  # at least one row
    values = torch.arange(12.0) ** 2
    draws = [uniform_keep(12, 0.25, gen(s)) for s in range(6000)]
    freq = torch.zeros(12)
    for d in draws:
        assert torch.equal(d, d.unique())
        freq[d] += 1
    assert torch.allclose(freq / 6000, torch.full((12,), 0.25), atol=0.02)
    subset_means = torch.stack([values[d].mean() for d in draws])
    assert float(subset_means.mean()) == pytest.approx(float(values.mean()), rel=0.02)


# ---------------------------------------------------------------------------- options
@pytest.mark.parametrize("options, error, name", [
    ({"keep": 0.0}, ValueError, "keep"), ({"keep": 1.5}, ValueError, "keep"), ({"keep": "half"}, TypeError, "keep"),
    ({"beta": -1.0}, ValueError, "beta"), ({"floor": 1.5}, ValueError, "floor"),
    ({"start": 0.5, "end": 0.5}, ValueError, "start"), ({"end": 1.2}, ValueError, "end"),
    ({"start": -0.1}, ValueError, "start"), ({"history_size": 0}, ValueError, "history_size"),
    ({"history_size": 2.5}, TypeError, "history_size"), ({"interrupt": -1}, ValueError, "interrupt"),
    ({"rule": "biggest"}, ValueError, "rule"), ({"scoring_mode": "test"}, ValueError, "scoring_mode"),
    ({"stale_scores": "yes"}, TypeError, "stale_scores"), ({"stale_epochs": -1}, ValueError, "stale_epochs"),
    ({"warmup_epochs": -1}, ValueError, "warmup_epochs"), ({"seed": 0.5}, TypeError, "seed"),
    ({"scale_factor": 0.0}, ValueError, "scale_factor"), ({"scale_factor": 1.5}, ValueError, "scale_factor"),
    ({"stale_scores": True, "scale_factor": 0.5}, ValueError, "stale_scores"),
    ({"scale_factor": 0.5, "scoring_input": lambda b: b}, ValueError, "scoring_input"),
    ({"scoring_input": "small"}, TypeError, "scoring_input"),
])
def test_selective_backprop_refuses_bad_options(options, error, name):
    with pytest.raises(error, match=f"`{name}`"):
        SelectiveBackprop(**options)


@pytest.mark.parametrize("options, error", [({"keep": 0}, ValueError), ({"keep": 2}, ValueError),
                                            ({"keep": "x"}, TypeError), ({"seed": None}, TypeError)])
def test_uniform_subset_refuses_bad_options(options, error):
    with pytest.raises(error, match="UniformSubset"):
        UniformSubset(**options)


def test_option_defaults_and_instance_scoring_mode():
    paper, composer = SelectiveBackprop(), SelectiveBackprop(rule="composer", scoring_mode="train")
    assert (paper.beta, paper.history_size, paper.floor, paper.warmup_epochs) == (3.0, 1024, 0.0, 1)
    assert composer.warmup_epochs == 0 and composer.scoring_mode == "train"
    assert SelectiveBackprop.scoring_mode == "eval"  # the instance attribute overrides, the class keeps its default
    assert SelectiveBackprop(stale_scores=True).needs_global_rows and not SelectiveBackprop().needs_global_rows
    assert not SelectiveBackprop(stale_scores=True, warmup_epochs=0).needs_scores  # no scoring pass, ever


# ---------------------------------------------------------------------------- end to end
class CountingRegressor(PerSampleRegressor):
    """Counts ``training_step`` calls with and without grad, and the module mode of the no-grad ones."""

    def __init__(self, mode="per_sample"):
        super().__init__(mode=mode)
        self.grad_calls, self.nograd_calls, self.nograd_training = 0, 0, []

    def training_step(self, batch, batch_idx):
        if torch.is_grad_enabled():
            self.grad_calls += 1
        else:
            self.nograd_calls += 1
            self.nograd_training.append(self.training)
        return super().training_step(batch, batch_idx)


def run(policy, trainer_kwargs, epochs=2, mode="per_sample", **overrides):
    pl.seed_everything(0)
    model, recorder = CountingRegressor(mode), Recorder()
    trainer = pl.Trainer(callbacks=[policy, recorder], max_epochs=epochs, **{**trainer_kwargs, **overrides})
    trainer.fit(model, regression_loader(n=64, batch_size=8, shuffle=True))
    return model, recorder.records


def test_stale_mode_runs_no_scoring_pass_and_the_scoring_mode_one_per_step(trainer_kwargs):
    steps = 2 * 8
    stale, records = run(SelectiveBackprop(stale_scores=True), trainer_kwargs)
    assert stale.nograd_calls == 0 and stale.grad_calls == steps
    assert sum(r["indices"].numel() for r in records[8:]) < 64  # epoch 1 selected on stale scores
    assert all(r["indices"].numel() == 8 for r in records[:8])  # epoch 0: nothing known yet, all kept
    for mode in ("eval", "train"):
        fresh, _ = run(SelectiveBackprop(warmup_epochs=0, scoring_mode=mode), trainer_kwargs)
        assert fresh.nograd_calls == steps and fresh.grad_calls == steps
        assert fresh.nograd_training == [mode == "train"] * steps  # the explicit scoring-pass mode


def test_schedule_warmup_interrupt_and_window(trainer_kwargs):
    warm, records = run(SelectiveBackprop(), trainer_kwargs)  # paper: the first epoch trains on everything
    assert warm.nograd_calls == 8 and all(r["indices"].numel() == 8 for r in records[:8])
    interrupted, records = run(SelectiveBackprop(warmup_epochs=0, interrupt=2), trainer_kwargs)
    assert interrupted.nograd_calls == 8  # batches 1, 3, 5, 7 of each epoch are normal steps
    assert all(records[i]["indices"].numel() == 8 for i in range(1, 16, 2))
    window, _ = run(SelectiveBackprop(rule="composer", start=0.25, end=0.75), trainer_kwargs)
    assert window.nograd_calls == 8  # global steps 4 .. 11 of 16


def test_scoring_pass_on_a_scalar_loss_gives_the_engines_error(trainer_kwargs):
    model = CountingRegressor(mode="scalar")
    trainer = pl.Trainer(callbacks=[SelectiveBackprop(warmup_epochs=0)], max_steps=1, **trainer_kwargs)
    with pytest.raises(SelectionError, match=r"scalar loss, but SelectiveBackprop need\(s\) per-sample losses.*"
                                             r"reduction='none'"):
        trainer.fit(model, regression_loader())
    assert (model.nograd_calls, model.grad_calls) == (1, 0)  # raised in the scoring pass


def test_stale_epochs_zero_forces_every_row(trainer_kwargs):
    _, records = run(SelectiveBackprop(stale_scores=True, stale_epochs=0, warmup_epochs=0), trainer_kwargs)
    assert all(r["indices"].numel() == 8 for r in records)  # each sample is seen once per epoch: always too old


@pytest.mark.parametrize("options", [{"warmup_epochs": 0}, {"stale_scores": True}, {"rule": "composer"}])
def test_mid_epoch_resume_is_exact(options, tmp_path):
    from lightning_select.data import DigitsPairsDataModule
    from lightning_select.models import DigitsEmbeddingModule

    def fit(name, ckpt_path=None, **kw):
        pl.seed_everything(0)
        policy, recorder = SelectiveBackprop(seed=2, **options), Recorder()
        ckpt = ModelCheckpoint(dirpath=tmp_path / name, save_last=True, save_top_k=0, every_n_train_steps=4)
        trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, limit_val_batches=0,
                             enable_progress_bar=False, enable_model_summary=False,
                             callbacks=[policy, recorder, ckpt], **kw)
        model = DigitsEmbeddingModule(hidden=32, dim=16)
        trainer.fit(model, DigitsPairsDataModule(batch_size=256), ckpt_path=ckpt_path)
        return model, policy, recorder.records

    full_model, full, full_steps = fit("full", max_epochs=3)
    fit("part", max_steps=8)  # stops in the middle of epoch 1 (6 steps per epoch)
    model, resumed, steps = fit("resumed", ckpt_path=tmp_path / "part" / "last.ckpt", max_epochs=3)
    assert len(steps) == len(full_steps) - 8 == 10
    for a, b in zip(full_steps[8:], steps):
        assert torch.equal(a["indices"], b["indices"]) and torch.equal(a["losses"], b["losses"])
    assert sum(s["indices"].numel() for s in steps) < 10 * 256  # it really selected
    assert torch.equal(full.history.nan_to_num(-7), resumed.history.nan_to_num(-7))
    assert full.history_next == resumed.history_next and full.selecting_steps == resumed.selecting_steps
    if full.table is not None:
        for name in ("loss", "epoch"):
            assert torch.equal(full.table[name].nan_to_num(-7), resumed.table[name].nan_to_num(-7))
    for p, q in zip(full_model.parameters(), model.parameters()):
        assert torch.equal(p, q)


def test_uniform_subset_end_to_end(trainer_kwargs):
    model, records = run(UniformSubset(keep=0.25, seed=1), trainer_kwargs)
    assert model.nograd_calls == 0
    assert [r["indices"].numel() for r in records] == [2] * 16
    _, records_again = run(UniformSubset(keep=0.25, seed=1), trainer_kwargs)
    assert all(torch.equal(a["indices"], b["indices"]) for a, b in zip(records, records_again))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("options", [{"warmup_epochs": 0}, {"stale_scores": True},
                                     {"rule": "composer", "scoring_mode": "train"}])
def test_cuda_16_mixed_selections_resume_exactly(options, tmp_path):
    """On a GPU under 16-mixed: per-sample scores stay fp32, selections are drawn on the CPU generator,
    and 2 + 2 resumed epochs reproduce 4 uninterrupted ones (selections, losses, history, table)."""
    from lightning_select.data import DigitsPairsDataModule
    from lightning_select.models import DigitsEmbeddingModule

    torch.backends.cudnn.deterministic = True

    def fit(name, epochs, ckpt_path=None):
        pl.seed_everything(0)
        policy, recorder = SelectiveBackprop(seed=1, **options), Recorder()
        ckpt = ModelCheckpoint(dirpath=tmp_path / name, save_last=True, save_top_k=0)
        trainer = pl.Trainer(accelerator="gpu", devices=1, precision="16-mixed", max_epochs=epochs, logger=False,
                             limit_val_batches=0, enable_progress_bar=False, enable_model_summary=False,
                             callbacks=[policy, recorder, ckpt])
        trainer.fit(DigitsEmbeddingModule(), DigitsPairsDataModule(batch_size=128), ckpt_path=ckpt_path)
        return policy, recorder.records

    full, full_steps = fit("full", 4)
    fit("part", 2)
    resumed, steps = fit("resumed", 4, tmp_path / "part" / "last.ckpt")
    assert all(s["dtype"] == torch.float32 for s in steps) and steps[0]["losses"].device.type == "cuda"
    assert sum(s["indices"].numel() for s in steps) < 0.9 * sum(128 for _ in steps)  # it selected
    assert len(steps) == len(full_steps) // 2
    for a, b in zip(full_steps[-len(steps):], steps):
        assert torch.equal(a["indices"], b["indices"]), "selections differ after resume"
        assert torch.allclose(a["losses"], b["losses"], atol=1e-5, rtol=1e-4)
    assert torch.equal(full.history.nan_to_num(-7), resumed.history.nan_to_num(-7)) or options.get("rule") == "composer"


# ---------------------------------------------------------------------------- cheaper scoring input
class ImageDataset(torch.utils.data.Dataset):
    def __init__(self, n=32, side=16, seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.images, self.labels = torch.rand(n, 3, side, side, generator=gen), torch.randint(0, 10, (n,), generator=gen)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": self.labels[i], "index": i}


class ShapeRecordingClassifier:
    """Wraps NoisyLabelClassifier.training_step to record the input side of every call, with or without grad."""

    @staticmethod
    def make():
        from lightning_select.models.classifier import NoisyLabelClassifier

        model = NoisyLabelClassifier(arch="cnn", width=4)
        model.sides = []
        step = model.training_step

        def training_step(batch, batch_idx):
            model.sides.append((torch.is_grad_enabled(), batch["image"].shape[-1]))
            return step(batch, batch_idx)

        model.training_step = training_step
        return model


def test_scale_factor_scores_a_downscaled_input_and_trains_the_full_one(trainer_kwargs):
    from helpers import ScoreRecorder

    pl.seed_everything(0)
    model = ShapeRecordingClassifier.make()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    data = ImageDataset()
    recorder = ScoreRecorder()
    policy = SelectiveBackprop(rule="composer", keep=0.5, scale_factor=0.5)
    trainer = pl.Trainer(callbacks=[policy, recorder], max_steps=2, **trainer_kwargs)
    trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=8))
    assert model.sides == [(False, 8), (True, 16)] * 2  # the scoring pass at 8 px, training at 16 px
    # independent: the first step's scores are the eval-mode losses of the bilinearly downscaled batch
    from lightning_select.models.classifier import NoisyLabelClassifier

    probe = NoisyLabelClassifier(arch="cnn", width=4)
    probe.load_state_dict(start)
    probe.eval()
    with torch.no_grad():
        small = torch.nn.functional.interpolate(data.images[:8], scale_factor=0.5, mode="bilinear")
        expected = torch.nn.functional.cross_entropy(probe(small), data.labels[:8], reduction="none")
    scores, indices, kept = recorder.steps[0]
    assert torch.equal(indices, torch.arange(8)) and kept.numel() == 4
    assert torch.allclose(scores, expected, atol=1e-6)


def test_scoring_input_callable_and_bad_batches_for_scale_factor(trainer_kwargs):
    seen = []

    def first_half_channels(batch):  # any view with the same rows works
        seen.append(batch["image"].shape)
        return {**batch, "image": batch["image"] * 0.5}

    pl.seed_everything(0)
    model = ShapeRecordingClassifier.make()
    trainer = pl.Trainer(callbacks=[SelectiveBackprop(rule="composer", scoring_input=first_half_channels)],
                         max_steps=1, **trainer_kwargs)
    trainer.fit(model, torch.utils.data.DataLoader(ImageDataset(), batch_size=8))
    assert seen == [torch.Size([8, 3, 16, 16])]
    policy = SelectiveBackprop(rule="composer", scale_factor=0.5, scale_key="pixels")
    with pytest.raises(SelectionError, match="scale_key"):
        policy.scoring_batch({"image": torch.rand(2, 3, 8, 8)})
    with pytest.raises(SelectionError, match="scoring_input"):
        SelectiveBackprop(scale_factor=0.5).scoring_batch({"image": torch.arange(6).view(2, 3)})
