"""GISTEmbed: acceptance numbers from the spec, a differential test against sentence-transformers'
GISTEmbedLoss, end-to-end Trainer runs, the guide cache and bad input."""

import itertools
import math
import zlib

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from helpers import KeepWhere, Recorder

from lightning_select import (
    EmbeddingOutput,
    GuideEmbeddingCache,
    GuidedNegatives,
    LossHistory,
    SelectionEngine,
    SelectionError,
    build_logits,
    false_negative_mask,
    gist_loss,
    gist_thresholds,
    info_nce_per_row,
)
from lightning_select.data import DigitsLDAGuide, DigitsPairsDataModule
from lightning_select.rules.gist import apply_gist
from lightning_select.models import DigitsEmbeddingModule

S3 = math.sqrt(3) / 2


# --------------------------------------------------------------------------- acceptance numbers
def test_one_hot_guide_reduces_to_mnrl():
    torch.manual_seed(0)
    a, p = torch.randn(7, 5), torch.randn(7, 5)
    eye = torch.eye(7)
    for tau in (0.01, 0.05, 0.2):
        ours = gist_loss(a, p, guide_anchor=eye, guide_positive=eye, temperature=tau,
                         contrast_anchors=False, contrast_positives=False)
        assert torch.allclose(ours, info_nce_per_row(EmbeddingOutput(a, p, temperature=tau)), atol=1e-6)


def hand_case():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    p = torch.tensor([[0.5, S3], [0.0, 1.0]])
    ga, gp = torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[0.6, 0.8], [0.8, 0.6]])
    return a, p, ga, gp


def test_hand_case():
    a, p, ga, gp = hand_case()
    losses = gist_loss(a, p, guide_anchor=ga, guide_positive=gp, temperature=0.1,
                       contrast_anchors=False, contrast_positives=False)
    assert abs(losses.mean().item() - 0.116314) < 1e-6
    assert abs(losses.mean().item() - 0.5 * math.log1p(math.exp(-(1 - S3) / 0.1))) < 1e-6
    assert torch.allclose(losses, torch.tensor([0.0, 0.232628]), atol=1e-6)
    losses.mean().backward()
    assert torch.equal(a.grad[0], torch.zeros(2))
    logits = build_logits(EmbeddingOutput(a.detach(), p, temperature=0.1))
    apply_gist(logits, ga, gp, contrast_anchors=False, contrast_positives=False)
    z = logits.logits()
    assert z[0, 0].item() == pytest.approx(5.0) and z[0, 1].item() == -math.inf
    assert torch.allclose(z[1], torch.tensor([10 * S3, 10.0]), atol=1e-5)
    both = gist_loss(a.detach(), p, guide_anchor=ga, guide_positive=gp, temperature=0.1).mean()
    assert abs(both.item() - 0.116314) < 1e-6
    unguided = info_nce_per_row(EmbeddingOutput(a.detach(), p, temperature=0.1)).mean()
    assert abs(unguided.item() - 0.119672) < 1e-6


@pytest.mark.parametrize(
    "strategy,m,t,g,drop",
    [
        ("absolute", 0, 0.7, 0.65, False), ("absolute", 0, 0.7, 0.7, False), ("absolute", 0, 0.7, 0.7001, True),
        ("absolute", 0.1, 0.7, 0.65, True), ("absolute", 0.1, 0.7, 0.59, False),
        ("relative", 0.05, 0.7, 0.65, False), ("relative", 0.05, 0.7, 0.67, True),
        ("relative", 0.05, -0.5, -0.49, True), ("relative", 0.05, -0.5, -0.53, False),
        ("absolute", -0.1, 0.7, 0.75, False), ("absolute", -0.1, 0.7, 0.85, True),
    ],
)
def test_mask_predicate_table(strategy, m, t, g, drop):
    theta = gist_thresholds(torch.tensor([t], dtype=torch.float64), m, strategy)
    assert bool(false_negative_mask(torch.tensor([[g]], dtype=torch.float64), theta)[0, 0]) is drop


def test_mislabelled_hard_negative():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p = torch.tensor([[0.8, 0.6], [0.6, 0.8]])
    n = torch.tensor([[0.9, math.sqrt(0.19)], [-1.0, 0.0]])
    losses = gist_loss(a, p, n.unsqueeze(1), guide_anchor=a, guide_positive=p, guide_negatives=n, temperature=0.1,
                       contrast_anchors=False, contrast_positives=False)
    assert abs(losses.mean().item() - 0.138490) < 1e-6
    logits = build_logits(EmbeddingOutput(a, p, n, temperature=0.1))
    apply_gist(logits, a, p, n.unsqueeze(1), contrast_anchors=False, contrast_positives=False)
    expected = torch.tensor([[8, 6, -math.inf, -10], [6, 8, 10 * math.sqrt(0.19), 0]])
    assert torch.allclose(logits.logits(), expected, atol=1e-5)


def test_mask_self_masks_duplicate_self_similarities():
    torch.manual_seed(1)
    x = torch.randn(4, 3)
    reference = build_logits(EmbeddingOutput(x, x, temperature=0.1))
    apply_gist(reference, x, x)  # anchor == positive: t_i = 1, strict > keeps AA/PP diagonals
    z = reference.logits()
    assert torch.isfinite(z[:, 4:8].diagonal()).all() and torch.isfinite(z[:, 8:12].diagonal()).all()
    masked = build_logits(EmbeddingOutput(x, x, temperature=0.1))
    apply_gist(masked, x, x, mask_self=True)
    zm = masked.logits()
    assert (zm[:, 4:8].diagonal() == -math.inf).all() and (zm[:, 8:12].diagonal() == -math.inf).all()
    assert torch.isfinite(zm[:, :4].diagonal()).all()  # the target is never masked


# --------------------------------------------------------------------------- differential test
@pytest.fixture(scope="module")
def reference_loss_factory():
    st_losses = pytest.importorskip("sentence_transformers.sentence_transformer.losses")
    from transformers import AutoTokenizer

    from lightning_select.guides.encoders import minilm_guide_path

    tokenizer = AutoTokenizer.from_pretrained(minilm_guide_path(), local_files_only=True)

    class Fixed(torch.nn.Module):
        """Returns the embeddings stored under ``key`` in the features: identical inputs for both sides."""

        def __init__(self, key):
            super().__init__()
            self.key, self.tokenizer, self.max_seq_length = key, tokenizer, 128

        def forward(self, features):
            return {"sentence_embedding": features[self.key]}

    def make(**options):
        return st_losses.GISTEmbedLoss(Fixed("student"), Fixed("guide"), **options)

    return make


GRID = list(itertools.product(["absolute", "relative"], [0.0, 0.1, -0.05], [True, False], [True, False], [0, 1]))


@pytest.mark.parametrize("strategy,margin,anchors,positives,k", GRID)
def test_matches_sentence_transformers_gist(reference_loss_factory, strategy, margin, anchors, positives, k):
    g = torch.Generator().manual_seed(zlib.crc32(repr((strategy, margin, anchors, positives, k)).encode()))
    b, d, gd = 9, 6, 5
    base = torch.randn(b, d, generator=g)
    base[3] = base[1]  # an exact duplicate and a near duplicate: masks fire
    base[5] = base[2] + 0.05 * torch.randn(d, generator=g)
    a = (base + 0.3 * torch.randn(b, d, generator=g)).requires_grad_(True)
    p = (base + 0.3 * torch.randn(b, d, generator=g)).requires_grad_(True)
    n = torch.randn(b, d, generator=g).requires_grad_(True)
    proj = torch.randn(d, gd, generator=g)
    ga, gp, gn = a.detach() @ proj, p.detach() @ proj, n.detach() @ proj
    options = dict(temperature=0.05, margin_strategy=strategy, margin=margin, contrast_anchors=anchors,
                   contrast_positives=positives)
    columns = [{"student": a, "guide": ga}, {"student": p, "guide": gp}] + ([{"student": n, "guide": gn}] if k else [])
    ref = reference_loss_factory(**options)(columns, None)
    ref_grads = torch.autograd.grad(ref, [a, p] + ([n] if k else []))
    ours = gist_loss(a, p, n.unsqueeze(1) if k else None, guide_anchor=ga, guide_positive=gp,
                     guide_negatives=gn.unsqueeze(1) if k else None, **options).mean()
    our_grads = torch.autograd.grad(ours, [a, p] + ([n] if k else []))
    assert abs(ref.item() - ours.item()) < 1e-5
    for r, o in zip(ref_grads, our_grads):
        assert torch.allclose(r, o, atol=1e-5)


def test_any_number_of_negative_columns():
    torch.manual_seed(2)
    a, p, n = torch.randn(5, 4), torch.randn(5, 4), torch.randn(5, 3, 4)
    losses = gist_loss(a, p, n, guide_anchor=a, guide_positive=p, guide_negatives=n, temperature=0.1)
    # independent: explicit candidate list with the reference's masking rule
    an, pn, nn_ = F.normalize(a, dim=-1), F.normalize(p, dim=-1), F.normalize(n, dim=-1)
    expected = []
    for i in range(5):
        t = (an[i] * pn[i]).sum()
        cands = [(an[i] @ pn[j], an[i] @ pn[j], j == i) for j in range(5)]
        cands += [(an[i] @ an[j], an[i] @ an[j], False) for j in range(5)]
        cands += [(pn[i] @ pn[j], pn[i] @ pn[j], False) for j in range(5)]
        cands += [(an[i] @ nn_[j, c], an[i] @ nn_[j, c], False) for c in range(3) for j in range(5)]
        z = torch.stack([s / 0.1 if (own or g <= t) else torch.tensor(-math.inf) for s, g, own in cands])
        expected.append(torch.logsumexp(z, 0) - (an[i] @ pn[i]) / 0.1)
    assert torch.allclose(losses, torch.stack(expected), atol=1e-5)


# --------------------------------------------------------------------------- callback end to end
@pytest.fixture(scope="module")
def digits_guide():
    return DigitsLDAGuide.fit(seed=0)


class CountingGuide(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls, self.rows = inner, 0, 0

    def forward(self, x):
        self.calls += 1
        self.rows += len(x)
        return self.inner(x)


def _fit(callbacks, trainer_kwargs, epochs=1, batch_size=64, **kw):
    trainer = pl.Trainer(callbacks=callbacks, max_epochs=epochs, limit_val_batches=0,
                         **{**trainer_kwargs, **kw})
    model = DigitsEmbeddingModule()
    trainer.fit(model, DigitsPairsDataModule(batch_size=batch_size))
    return trainer, model


def test_callback_losses_equal_pure_function(trainer_kwargs, digits_guide):
    rec = Recorder()
    seen = {}

    class Spy(DigitsEmbeddingModule):
        def training_step(self, batch, batch_idx):
            out = super().training_step(batch, batch_idx)
            if torch.is_grad_enabled() and "out" not in seen:
                seen["out"], seen["batch"] = out, batch
            return out

    gist = GuidedNegatives(digits_guide, anchor_column="image", positive_column="image", margin=0.3)
    trainer = pl.Trainer(callbacks=[gist, rec], max_steps=1, limit_val_batches=0, **trainer_kwargs)
    trainer.fit(Spy(), DigitsPairsDataModule(batch_size=64))
    out, batch = seen["out"], seen["batch"]
    g = digits_guide(batch["image"])
    expected = gist_loss(out.anchor.detach(), out.positive.detach(), guide_anchor=g, guide_positive=g,
                         temperature=out.temperature, margin=0.3)
    assert torch.allclose(rec.records[0]["losses"], expected, atol=1e-6)


def test_cache_skips_the_guide_after_the_first_epoch(trainer_kwargs, digits_guide):
    guide = CountingGuide(digits_guide)
    gist = GuidedNegatives(guide, anchor_column="image", positive_column="image", margin=0.3)
    _fit([gist], trainer_kwargs, epochs=1)
    calls_epoch1 = guide.calls
    assert guide.rows == 1437 and gist.cache.filled.all()  # both roles read `image`: one guide pass each
    dm = DigitsPairsDataModule()
    dm.setup()
    images = dm.train_set.dataset.images[:5]  # sample index i is training-set position i
    assert torch.allclose(gist.cache.values[:5, 0], digits_guide(images), atol=1e-5)
    trainer = pl.Trainer(callbacks=[gist], max_epochs=2, limit_val_batches=0, **trainer_kwargs)
    trainer.fit(DigitsEmbeddingModule(), DigitsPairsDataModule(batch_size=64))
    assert guide.calls == calls_epoch1  # the cache was reused (same callback, same dataset)


def test_precompute_and_disk_cache_with_fingerprint(tmp_path, trainer_kwargs, digits_guide):
    guide = CountingGuide(digits_guide)
    gist = GuidedNegatives(guide, anchor_column="image", positive_column="image", margin=0.3, cache="disk",
                           cache_dir=str(tmp_path / "cache"), precompute=True, cache_dtype="float16")
    _fit([gist], trainer_kwargs, max_steps=2)
    assert gist.cache.filled.all() and gist.cache.values.dtype == torch.float16
    rows_after_precompute = guide.rows
    assert rows_after_precompute == 1437
    # a second run with the same guide reopens the disk cache: no guide calls at all
    again = GuidedNegatives(guide, anchor_column="image", positive_column="image", margin=0.3, cache="disk",
                            cache_dir=str(tmp_path / "cache"), precompute=True)
    with pytest.warns(RuntimeWarning, match="shape or dtype differs"):
        _fit([again], trainer_kwargs, max_steps=2)  # float32 now: invalidated, recomputed
    same = GuidedNegatives(guide, anchor_column="image", positive_column="image", margin=0.3, cache="disk",
                           cache_dir=str(tmp_path / "cache"), precompute=True)
    before = guide.rows
    _fit([same], trainer_kwargs, max_steps=2)
    assert guide.rows == before
    changed = DigitsLDAGuide(digits_guide.mean, digits_guide.projection * 2)
    other = GuidedNegatives(changed, anchor_column="image", positive_column="image", cache="disk",
                            cache_dir=str(tmp_path / "cache"))
    with pytest.warns(RuntimeWarning, match="the guide changed"):
        _fit([other], trainer_kwargs, max_steps=1)


def test_history_gets_false_negative_counts_and_pairs_export(tmp_path, trainer_kwargs, digits_guide):
    import pandas as pd

    history = LossHistory()
    gist = GuidedNegatives(digits_guide, anchor_column="image", positive_column="image", margin=0.3,
                           flagged_pairs_path=str(tmp_path / "pairs.parquet"))
    _fit([gist, history], trainer_kwargs)
    fn = history.store.stats["false_negatives"]
    assert fn.sum() > 0 and torch.isfinite(fn).all()
    pairs = pd.read_parquet(tmp_path / "pairs.parquet")
    assert len(pairs) > 0 and (pairs["guide_score"] > pairs["threshold"]).all()
    assert set(pairs["block"]) <= {"ap", "aa", "pp"}
    assert int(fn.sum()) == len(pairs)  # every flagged pair was counted once for its anchor
    assert (pairs["anchor_index"] != pairs["candidate_index"]).all()  # self-pairs are not false negatives
    labels = DigitsPairsDataModule()
    labels.setup()
    y = labels.train_set.dataset.labels
    anchors, candidates = torch.as_tensor(pairs["anchor_index"].to_numpy()), torch.as_tensor(pairs["candidate_index"].to_numpy())
    same_class = (y[anchors] == y[candidates]).float().mean()
    assert same_class > 0.9  # the LDA guide flags real false negatives (same digit)


def test_gist_logs_masked_fractions(tmp_path, trainer_kwargs, digits_guide):
    from lightning.pytorch.loggers import CSVLogger

    gist = GuidedNegatives(digits_guide, anchor_column="image", positive_column="image", margin=0.3)
    trainer, _ = _fit([gist], {**trainer_kwargs, "logger": CSVLogger(tmp_path), "log_every_n_steps": 1},
                      max_steps=2)
    for key in ("gist/masked_fraction_ap", "gist/masked_fraction_aa", "gist/masked_fraction_pp",
                "gist/threshold_mean", "gist/cache_hit_rate"):
        assert key in trainer.logged_metrics
    assert 0 < float(trainer.logged_metrics["gist/masked_fraction_ap"]) < 0.5


def test_guide_stays_frozen_in_eval_and_out_of_the_checkpoint(tmp_path, trainer_kwargs):
    guide = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.Dropout(0.5))
    gist = GuidedNegatives(guide, anchor_column="image", positive_column="image", margin=0.2)
    trainer, model = _fit([gist], trainer_kwargs, max_steps=2)
    assert not guide.training and not any(p.requires_grad for p in guide.parameters())
    trainer.save_checkpoint(tmp_path / "c.ckpt")
    ckpt = torch.load(tmp_path / "c.ckpt", weights_only=False)
    assert all("guide" not in k for k in ckpt["state_dict"])
    assert all(p.shape != (16, 64) for group in trainer.optimizers[0].param_groups for p in group["params"])


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"margin_strategy": "percent"}, "margin_strategy"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"cache": "disk"}, "cache_dir"),
        ({"cache": None, "precompute": True}, "precompute"),
    ],
)
def test_invalid_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GuidedNegatives(torch.nn.Linear(2, 2), **kwargs)


class BadGuide(torch.nn.Module):
    def __init__(self, mode):
        super().__init__()
        self.mode = mode
        self.lin = torch.nn.Linear(64, 8)

    def forward(self, x):
        out = self.lin(x)
        if self.mode == "rows":
            return out[:-1]
        if self.mode == "shape":
            return out.unsqueeze(1)
        if self.mode == "nan":
            return out * float("nan")
        if self.mode == "dims":
            return out if x.shape[1] == 64 and self.calls_dims() else out[:, :4]
        return out

    def calls_dims(self):
        self._n = getattr(self, "_n", 0) + 1
        return self._n % 2 == 1


@pytest.mark.parametrize(
    "mode,match",
    [
        ("rows", "guide and student must see the same samples"),
        ("shape", r"\[batch, dim\] tensor"),
        ("nan", "non-finite embeddings"),
        ("dims", "different dimensions|same dimension"),
    ],
)
def test_bad_guides_raise_clear_errors(trainer_kwargs, mode, match):
    gist = GuidedNegatives(BadGuide(mode), anchor_column="view1", positive_column="view2", cache=None)
    with pytest.raises(SelectionError, match=match):
        _fit([gist], trainer_kwargs, max_steps=1)


def test_missing_columns_and_non_embedding_output(trainer_kwargs, digits_guide):
    gist = GuidedNegatives(digits_guide, anchor_column="anchor_text", positive_column="image")
    with pytest.raises(SelectionError, match=r"raw-input columns \['anchor_text'\]"):
        _fit([gist], trainer_kwargs, max_steps=1)
    with pytest.raises(SelectionError, match="Return an EmbeddingOutput"):
        trainer = pl.Trainer(callbacks=[GuidedNegatives(digits_guide, "image", "image")], max_steps=1,
                             limit_val_batches=0, **trainer_kwargs)
        trainer.fit(_TensorOut(), DigitsPairsDataModule(batch_size=32))


class _TensorOut(DigitsEmbeddingModule):
    def training_step(self, batch, batch_idx):
        return info_nce_per_row(super().training_step(batch, batch_idx))


def test_text_guide_refuses_token_ids():
    from lightning_select.guides.encoders import check_texts

    with pytest.raises(TypeError, match="never re-tokenizes student ids"):
        check_texts(torch.tensor([[101, 2023]]), "TransformerGuide")


def test_guide_inside_the_module_is_rejected(trainer_kwargs, digits_guide):
    class WithGuide(DigitsEmbeddingModule):
        def __init__(self):
            super().__init__()
            self.guide = torch.nn.Linear(64, 8)

    model = WithGuide()
    gist = GuidedNegatives(model.guide, "image", "image")
    trainer = pl.Trainer(callbacks=[gist], max_steps=1, limit_val_batches=0, **trainer_kwargs)
    with pytest.raises(SelectionError, match="submodule of the LightningModule"):
        trainer.fit(model, DigitsPairsDataModule(batch_size=32))


def test_cache_rejects_mixed_dimensions():
    cache = GuideEmbeddingCache(4, 2)
    cache.store(0, torch.tensor([0]), torch.ones(1, 3))
    with pytest.raises(SelectionError, match="same dimension"):
        cache.store(1, torch.tensor([0]), torch.ones(1, 5))


def test_gist_composes_with_selection(trainer_kwargs, digits_guide):
    rec = Recorder()
    gist = GuidedNegatives(digits_guide, "image", "image", margin=0.3)
    trainer = pl.Trainer(callbacks=[KeepWhere(2, (0,)), gist, rec, SelectionEngine()], max_steps=2,
                         limit_val_batches=0, **trainer_kwargs)
    trainer.fit(DigitsEmbeddingModule(), DigitsPairsDataModule(batch_size=64))
    assert all((r["indices"] % 2 == 0).all() for r in rec.records)


@pytest.mark.parametrize("chunk", [7, 64])
def test_gradient_cached_mode_matches_plain_mode(trainer_kwargs, digits_guide, chunk):
    from helpers import GradCapture

    results = []
    for mini_batch_size in (None, chunk):
        pl.seed_everything(0)
        grads, rec = GradCapture(), Recorder()
        gist = GuidedNegatives(digits_guide, "image", "image", margin=0.3, mini_batch_size=mini_batch_size)
        trainer = pl.Trainer(callbacks=[gist, rec, grads], max_steps=1, limit_val_batches=0,
                             accumulate_grad_batches=1, **trainer_kwargs)
        trainer.fit(DigitsEmbeddingModule(), DigitsPairsDataModule(batch_size=50))
        results.append((rec.records[0]["losses"], grads.grads[0]))
    (l0, g0), (l1, g1) = results
    assert torch.allclose(l0, l1, atol=1e-5)
    for a, b in zip(g0, g1):
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


def test_gradient_cached_mode_with_dropout_and_accumulation(trainer_kwargs):
    """Dropout: the chunk re-forward must replay the RNG state of the no-grad forward (one chunk of the
    whole batch draws the same masks as the plain mode, so any replay error shows); accumulation:
    Lightning's 1/N scale must reach the cached gradients."""
    from helpers import GradCapture

    class Dropped(DigitsEmbeddingModule):
        def __init__(self):
            super().__init__()
            self.drop = torch.nn.Dropout(0.3)

        def forward(self, x):
            return self.drop(self.encoder(x))

    results = []
    for chunk in (None, 40):
        pl.seed_everything(0)
        grads = GradCapture()
        trainer = pl.Trainer(callbacks=[SelectionEngine(embedding_chunk_size=chunk), grads], max_steps=1,
                             limit_val_batches=0, accumulate_grad_batches=2, **trainer_kwargs)
        trainer.fit(Dropped(), DigitsPairsDataModule(batch_size=40))
        results.append(grads.grads[0])
    for a, b in zip(*results):
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


def test_plots_of_history_and_flagged_pairs(tmp_path, trainer_kwargs, digits_guide):
    from PIL import Image

    from lightning_select.plots import plot_flagged_pairs, plot_loss_history

    history = LossHistory(trace_epochs=2)
    gist = GuidedNegatives(digits_guide, "image", "image", margin=0.6, flagged_pairs_path=str(tmp_path / "p.npz"))
    _fit([gist, history], trainer_kwargs, epochs=2)
    for path in (plot_loss_history(history.store, tmp_path / "h.png"),
                 plot_flagged_pairs(gist.flagged_pairs(), tmp_path / "f.png")):
        with Image.open(path) as image:
            assert image.size[0] > 300 and image.size[1] > 200
