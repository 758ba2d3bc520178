"""Hardness-weighted in-batch negatives: the rule against a hand-written reference and against
sentence-transformers' MultipleNegativesRankingLoss(hardness_mode=...), its composition with GIST in
one step (either callback order), logging, the scoring pass and bad input."""

import itertools
import math
import zlib

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from helpers import KeepTopLoss, Recorder

from lightning_select import (
    EmbeddingOutput,
    GuidedNegatives,
    HardnessWeightedNegatives,
    SelectionError,
    build_logits,
    info_nce_per_row,
)
from lightning_select.data import DigitsLDAGuide, DigitsPairsDataModule
from lightning_select.models import DigitsEmbeddingModule
from lightning_select.rules.gist import apply_gist
from lightning_select.rules.hardness import apply_hardness, hardness_logits, hardness_loss, negative_masks

MODES = ["in_batch_negatives", "hard_negatives", "all_negatives"]


# --------------------------------------------------------------------------- hand-written reference
def reference_losses(a, p, n=None, *, alpha, tau, mode="in_batch_negatives", guide=None, margin=0.0,
                     aa=False, pp=False, same_type=False):
    """Per-row losses by explicit candidate lists: GIST's mask (if ``guide``), then the hardness bonus.

    ``guide`` = (ga, gp) guide embeddings; candidates are (student cosine, guide cosine, is own positive,
    is self-pair, kind) with kind "in" (in-batch), "own_hn" (the row's own hard negative) or "same"
    (AA/PP)."""
    an, pn = F.normalize(a, dim=-1), F.normalize(p, dim=-1)
    nn_ = None if n is None else F.normalize(n, dim=-1)
    ga, gp = (an, pn) if guide is None else (F.normalize(guide[0], dim=-1), F.normalize(guide[1], dim=-1))
    losses = []
    for i in range(a.shape[0]):
        t = float(ga[i] @ gp[i])
        cands = [(an[i] @ pn[j], float(ga[i] @ gp[j]), j == i, False, "in") for j in range(a.shape[0])]
        if aa:
            cands += [(an[i] @ an[j], float(ga[i] @ ga[j]), False, j == i, "same") for j in range(a.shape[0])]
        if pp:
            cands += [(pn[i] @ pn[j], float(gp[i] @ gp[j]), False, j == i, "same") for j in range(a.shape[0])]
        if nn_ is not None:
            cands += [(an[i] @ nn_[j, c], float(an[i] @ nn_[j, c]) if guide is None else -2.0, False, False,
                       "own_hn" if j == i else "in") for c in range(nn_.shape[1]) for j in range(a.shape[0])]
        z = []
        for s, g, own, self_pair, kind in cands:
            if guide is not None and not own and g > t - margin:
                z.append(torch.tensor(-math.inf))
                continue
            weighted = not own and not self_pair and (
                (kind == "in" and mode != "hard_negatives") or (kind == "own_hn" and mode != "in_batch_negatives")
                or (kind == "same" and same_type and mode != "hard_negatives"))
            z.append(s / tau + (alpha * s.detach() if weighted else 0.0))
        z = torch.stack(z)
        losses.append(torch.logsumexp(z, 0) - z[i])
    return torch.stack(losses)


def test_rule_matches_the_hand_reference():
    torch.manual_seed(0)
    a, p, n = torch.randn(5, 4), torch.randn(5, 4), torch.randn(5, 2, 4)
    for mode, alpha, k in itertools.product(MODES, [0.0, 0.5, 9.0], [0, 2]):
        neg = n if k else None
        ours = hardness_loss(a, p, neg, alpha=alpha, temperature=0.05, mode=mode)
        expected = reference_losses(a, p, neg, alpha=alpha, tau=0.05, mode=mode)
        assert torch.allclose(ours, expected, atol=1e-5), (mode, alpha, k)


def test_hand_numbers_and_equivalent_weights():
    """z = s/τ + α·s off the target; the bonus is a constant weight exp(α·s) in the denominator."""
    a, p = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    losses = hardness_loss(a, p, alpha=2.0, temperature=0.5)
    # row 0: logsumexp(2, 0.6/0.5 + 2·0.6) − 2;  row 1: logsumexp(0, 1.6) − 1.6
    assert torch.allclose(losses, torch.tensor([math.log(math.exp(2) + math.exp(2.4)) - 2,
                                                math.log(1 + math.exp(1.6)) - 1.6]), atol=1e-6)
    weighted = math.log(math.exp(2) + math.exp(2 * 0.6) * math.exp(1.2)) - 2  # w = exp(α s) times exp(s/τ)
    assert abs(losses[0].item() - weighted) < 1e-6


def test_bonus_carries_no_gradient_and_masked_entries_stay_masked():
    torch.manual_seed(1)
    s = torch.rand(3, 3, requires_grad=True)
    negatives = ~torch.eye(3, dtype=torch.bool)
    mask = torch.zeros(3, 3, dtype=torch.bool)
    mask[0, 2] = True
    z = hardness_logits(s, 0.1, 9.0, negatives, mask)
    assert z[0, 2] == -math.inf and torch.allclose(z[0, 1], s[0, 1] * 10 + 9 * s[0, 1])
    z[torch.isfinite(z)].sum().backward()
    expected = torch.full((3, 3), 10.0)
    expected[0, 2] = 0.0
    assert torch.allclose(s.grad, expected)  # d z / d s = 1/τ: the bonus is stop-grad


def test_zero_alpha_is_plain_mnrl():
    torch.manual_seed(2)
    a, p = torch.randn(6, 5), torch.randn(6, 5)
    out = EmbeddingOutput(a, p, temperature=0.05)
    assert torch.equal(hardness_loss(a, p, alpha=0.0, temperature=0.05), info_nce_per_row(out))


# --------------------------------------------------------------------------- differential tests (sentence-transformers)
@pytest.fixture(scope="module")
def st_mnrl():
    st_losses = pytest.importorskip("sentence_transformers.sentence_transformer.losses")
    if "hardness_mode" not in st_losses.MultipleNegativesRankingLoss.__init__.__code__.co_varnames:
        pytest.skip("the installed sentence-transformers has no MNRL hardness_mode")

    def make(**options):
        return st_losses.MultipleNegativesRankingLoss(torch.nn.Identity(), **options)

    return make


def _inputs(key, b=8, d=6, k=0):
    g = torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))
    base = torch.randn(b, d, generator=g)
    a = (base + 0.5 * torch.randn(b, d, generator=g)).requires_grad_(True)
    p = (base + 0.5 * torch.randn(b, d, generator=g)).requires_grad_(True)
    negs = [(base + torch.randn(b, d, generator=g)).requires_grad_(True) for _ in range(k)]
    return a, p, negs


@pytest.mark.parametrize("mode,alpha,k", list(itertools.product(MODES, [0.5, 9.0], [0, 1, 2])))
def test_matches_sentence_transformers_mnrl_hardness(st_mnrl, mode, alpha, k):
    a, p, negs = _inputs((mode, alpha, k), k=k)
    ref = st_mnrl(scale=20.0, hardness_mode=mode, hardness_strength=alpha).compute_loss_from_embeddings(
        [a, p, *negs], None)
    ours = hardness_loss(a, p, torch.stack(negs, 1) if k else None, alpha=alpha, temperature=0.05, mode=mode).mean()
    leaves = [a, p, *negs]
    for r, o in zip(torch.autograd.grad(ref, leaves), torch.autograd.grad(ours, leaves)):
        assert torch.allclose(r, o, atol=1e-5)
    assert abs(ref.item() - ours.item()) < 1e-5


@pytest.mark.parametrize("mode", ["in_batch_negatives", "all_negatives"])
def test_same_type_blocks_off_matches_the_reference_query_to_query_and_doc_to_doc(st_mnrl, mode):
    """GIST's AA/PP blocks with a guide that flags nothing (and self-pairs masked) are the reference's
    query_to_query and doc_to_doc directions; the reference gives them no bonus, nor do we by default."""
    a, p, _ = _inputs(("same_type", mode))
    ref = st_mnrl(scale=20.0, directions=("query_to_doc", "query_to_query", "doc_to_doc"), hardness_mode=mode,
                  hardness_strength=9.0).compute_loss_from_embeddings([a, p], None)
    logits = build_logits(EmbeddingOutput(a, p, temperature=0.05))
    one_hot = torch.eye(a.shape[0])
    apply_gist(logits, one_hot, one_hot, mask_self=True)
    apply_hardness(logits, 9.0, mode)
    ours = logits.per_row_loss().mean()
    assert abs(ref.item() - ours.item()) < 1e-5
    for r, o in zip(torch.autograd.grad(ref, [a, p]), torch.autograd.grad(ours, [a, p])):
        assert torch.allclose(r, o, atol=1e-5)


def test_negative_masks_per_block():
    torch.manual_seed(3)
    logits = build_logits(EmbeddingOutput(torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 1, 4)))
    apply_gist(logits, torch.eye(3), torch.eye(3), torch.eye(3).unsqueeze(1) * 0)
    eye = torch.eye(3, dtype=torch.bool)
    masks = negative_masks(logits, "in_batch_negatives")
    assert sorted(masks) == ["an0", "ap"] and torch.equal(masks["ap"], ~eye) and torch.equal(masks["an0"], ~eye)
    assert torch.equal(negative_masks(logits, "hard_negatives")["an0"], eye)
    assert not negative_masks(logits, "hard_negatives")["ap"].any()
    assert negative_masks(logits, "all_negatives")["an0"].all()
    both = negative_masks(logits, "in_batch_negatives", same_type_blocks=True)
    assert torch.equal(both["aa"], ~eye) and torch.equal(both["pp"], ~eye)  # self-pairs never


# --------------------------------------------------------------------------- composition with GIST (pure rules)
@pytest.mark.parametrize("same_type", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_gist_mask_then_hardness_matches_the_hand_reference(same_type, mode):
    torch.manual_seed(4)
    b = 6
    base = torch.randn(b, 5)
    base[3] = base[1] + 0.01 * torch.randn(5)  # near duplicates: the guide flags them
    a, p, n = base + 0.3 * torch.randn(b, 5), base + 0.3 * torch.randn(b, 5), torch.randn(b, 1, 5)
    ga, gp = base + 0.1 * torch.randn(b, 5), base + 0.1 * torch.randn(b, 5)
    logits = build_logits(EmbeddingOutput(a, p, n, temperature=0.05))
    apply_gist(logits, ga, gp, margin=0.1)  # no guide for the hard negatives: they are never flagged
    stats = apply_hardness(logits, 9.0, mode, same_type_blocks=same_type)
    expected = reference_losses(a, p, n, alpha=9.0, tau=0.05, mode=mode, guide=(ga, gp), margin=0.1, aa=True,
                                pp=True, same_type=same_type)
    assert torch.allclose(logits.per_row_loss(), expected, atol=1e-5)
    if mode != "hard_negatives":
        assert int(stats["masked"]) > 0  # GIST flagged some of the negatives: they got no bonus
    assert int(stats["weighted"]) + int(stats["masked"]) == int(stats["negatives"])


# --------------------------------------------------------------------------- the callback in a Trainer
@pytest.fixture(scope="module")
def digits_guide():
    return DigitsLDAGuide.fit(seed=0)


class Spy(DigitsEmbeddingModule):
    """Keeps the first training-pass EmbeddingOutput and batch."""

    def __init__(self):
        super().__init__()
        self.seen = {}

    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        if torch.is_grad_enabled() and "out" not in self.seen:
            self.seen = {"out": out, "batch": batch}
        return out


def _one_step(callbacks, trainer_kwargs, batch_size=16, **kw):
    pl.seed_everything(0)
    rec = Recorder()
    model = Spy()
    trainer = pl.Trainer(callbacks=[*callbacks, rec], max_steps=1, limit_val_batches=0, **{**trainer_kwargs, **kw})
    trainer.fit(model, DigitsPairsDataModule(batch_size=batch_size))
    return trainer, model, rec.records[0]["losses"]


@pytest.mark.parametrize("same_type", [False, True])
def test_engine_loss_equals_the_hand_reference_in_either_callback_order(trainer_kwargs, digits_guide, same_type):
    """GIST masks first, hardness weights what is left, whatever the order in Trainer(callbacks=...)."""
    results = []
    for order in ("gist_first", "hardness_first"):
        gist = GuidedNegatives(digits_guide, "image", "image", margin=0.3)
        hardness = HardnessWeightedNegatives(alpha=9.0, same_type_blocks=same_type)
        callbacks = [gist, hardness] if order == "gist_first" else [hardness, gist]
        _, model, losses = _one_step(callbacks, trainer_kwargs)
        out, batch = model.seen["out"], model.seen["batch"]
        g = digits_guide(batch["image"])
        expected = reference_losses(out.anchor.detach(), out.positive.detach(), alpha=9.0, tau=out.temperature,
                                    guide=(g, g), margin=0.3, aa=True, pp=True, same_type=same_type)
        assert torch.allclose(losses, expected, atol=1e-5), order
        summary = hardness.summary()
        assert 0 < summary["masked_fraction"] < 1  # the guide flagged some negatives
        b = out.anchor.shape[0]
        assert summary["masked_fraction"] == pytest.approx(
            float(sum(gist.last_masks[k].sum() for k in (["ap", "aa", "pp"] if same_type else ["ap"])))
            / ((3 if same_type else 1) * b * (b - 1)))
        results.append(losses)
    assert torch.equal(results[0], results[1])


def test_running_hardness_before_gist_would_differ(trainer_kwargs, digits_guide):
    """Why ``order`` matters: weighting before GIST's edit misses the AA/PP blocks it adds."""

    class Early(HardnessWeightedNegatives):
        order = 200

    _, _, right = _one_step([GuidedNegatives(digits_guide, "image", "image", margin=0.3),
                             HardnessWeightedNegatives(same_type_blocks=True)], trainer_kwargs)
    early = Early(same_type_blocks=True)
    _, _, wrong = _one_step([GuidedNegatives(digits_guide, "image", "image", margin=0.3), early], trainer_kwargs)
    assert not torch.allclose(right, wrong, atol=1e-3)
    assert early.summary()["masked_fraction"] == 0  # it ran before anything was masked


def test_logs_and_totals(tmp_path, trainer_kwargs, digits_guide):
    import pandas as pd
    from lightning.pytorch.loggers import CSVLogger

    gist = GuidedNegatives(digits_guide, "image", "image", margin=0.3)
    hardness = HardnessWeightedNegatives(alpha=9.0)
    trainer = pl.Trainer(callbacks=[hardness, gist], max_steps=4, limit_val_batches=0, log_every_n_steps=1,
                         **{**trainer_kwargs, "logger": CSVLogger(tmp_path)})
    trainer.fit(DigitsEmbeddingModule(), DigitsPairsDataModule(batch_size=32))
    logged = pd.read_csv(next(tmp_path.glob("**/metrics.csv")))
    for name in ("weighted_fraction", "masked_fraction", "bonus_mean", "bonus_max", "weight_mean"):
        assert logged[f"hardness/{name}"].notna().sum() == 4, name
    total = (logged["hardness/weighted_fraction"] + logged["hardness/masked_fraction"]).dropna()
    assert ((total - 1).abs() < 1e-6).all()
    assert logged["hardness/masked_fraction"].dropna().tolist() == pytest.approx(
        logged["gist/masked_fraction_ap"].dropna().tolist())  # pairs only, AP only: the same share
    summary = hardness.summary()
    assert summary["steps"] == 4 and summary["negatives"] == 4 * 32 * 31
    assert math.isclose(summary["weighted_fraction"] + summary["masked_fraction"], 1.0)
    assert summary["weight_mean"] >= math.exp(summary["bonus_mean"]) * (1 - 1e-9)  # Jensen
    state = hardness.state_dict()
    fresh = HardnessWeightedNegatives(alpha=9.0)
    fresh.load_state_dict(state)
    assert fresh.steps == 4 and torch.equal(fresh.sums, hardness.sums) and fresh.sums.dtype == torch.float64


def test_scoring_pass_is_edited_but_not_recorded(trainer_kwargs):
    """The scoring pass sees the same objective; only the trained rows are counted."""
    rec = Recorder()
    hardness = HardnessWeightedNegatives(alpha=9.0)
    trainer = pl.Trainer(callbacks=[KeepTopLoss(8), hardness, rec], max_steps=3, limit_val_batches=0,
                         **trainer_kwargs)
    trainer.fit(DigitsEmbeddingModule(), DigitsPairsDataModule(batch_size=32))
    assert hardness.steps == 3 and hardness.summary()["negatives"] == 3 * 8 * 7  # kept rows only


def test_non_embedding_output_names_the_policy_and_the_fix(trainer_kwargs):
    class TensorOut(DigitsEmbeddingModule):
        def training_step(self, batch, batch_idx):
            return info_nce_per_row(super().training_step(batch, batch_idx))

    trainer = pl.Trainer(callbacks=[HardnessWeightedNegatives()], max_steps=1, limit_val_batches=0, **trainer_kwargs)
    with pytest.raises(SelectionError, match=r"HardnessWeightedNegatives edit\(s\) contrastive logits.*Return an "
                                             r"EmbeddingOutput"):
        trainer.fit(TensorOut(), DigitsPairsDataModule(batch_size=16))


def test_hard_negatives_mode_without_negatives_is_refused(trainer_kwargs):
    trainer = pl.Trainer(callbacks=[HardnessWeightedNegatives(mode="hard_negatives")], max_steps=1,
                         limit_val_batches=0, **trainer_kwargs)
    with pytest.raises(SelectionError, match="without `negatives`"):
        trainer.fit(DigitsEmbeddingModule(), DigitsPairsDataModule(batch_size=16))


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(alpha=-1.0), ValueError, r"`alpha` >= 0"),
    (dict(alpha=float("nan")), ValueError, "finite `alpha`"),
    (dict(alpha=float("inf")), ValueError, "finite `alpha`"),
    (dict(alpha="9"), TypeError, "`alpha` to be a real number"),
    (dict(mode="hard"), ValueError, "`mode` in"),
    (dict(same_type_blocks="yes"), TypeError, "`same_type_blocks`"),
])
def test_invalid_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        HardnessWeightedNegatives(**kwargs)


def test_zero_alpha_warns_and_leaves_the_loss_unchanged(trainer_kwargs):
    with pytest.warns(UserWarning, match="alpha=0"):
        policy = HardnessWeightedNegatives(alpha=0.0)
    _, model, losses = _one_step([policy], trainer_kwargs)
    assert torch.equal(losses, info_nce_per_row(model.seen["out"]).detach())


def test_gradient_cached_mode_matches_plain_mode(trainer_kwargs, digits_guide):
    from helpers import GradCapture

    results = []
    for chunk in (None, 7):
        pl.seed_everything(0)
        grads, rec = GradCapture(), Recorder()
        gist = GuidedNegatives(digits_guide, "image", "image", margin=0.3, mini_batch_size=chunk)
        trainer = pl.Trainer(callbacks=[HardnessWeightedNegatives(same_type_blocks=True), gist, rec, grads],
                             max_steps=1, limit_val_batches=0, **trainer_kwargs)
        trainer.fit(DigitsEmbeddingModule(), DigitsPairsDataModule(batch_size=30))
        results.append((rec.records[0]["losses"], grads.grads[0]))
    (l0, g0), (l1, g1) = results
    assert torch.allclose(l0, l1, atol=1e-5)
    for a, b in zip(g0, g1):
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


def test_hydra_gist_then_hardness_runs_on_the_default(tmp_path):
    """`+selector=[gist,hardness]` composes, builds both policies and runs on the embedded default."""
    from pathlib import Path

    import pandas as pd
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from lightning_select.cli import build_callbacks, run

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[
            "+selector=[gist,hardness]", f"paths.output_dir={tmp_path}", "callbacks=none", "trainer.max_epochs=1",
            "++trainer.limit_train_batches=3", "++trainer.limit_val_batches=1", "trainer.log_every_n_steps=1"])
    built = {type(cb) for cb in build_callbacks(cfg)}
    assert {GuidedNegatives, HardnessWeightedNegatives} <= built
    assert 0.0 < run(cfg)["heldout/precision@1"] <= 1.0
    logged = pd.read_csv(next(tmp_path.glob("csv/*/metrics.csv")))
    masked = logged["hardness/masked_fraction"].dropna()
    assert masked.tolist() == pytest.approx(logged["gist/masked_fraction_ap"].dropna().tolist())
    assert (masked > 0).any()  # the digits guide flags negatives, which then get no bonus
