"""GIST's false-negative modes beyond the reference: ``attract`` (flagged candidates become extra
positives, multi-positive InfoNCE) and the self-guide (``guide="self"``: the student's own detached
similarities flag candidates; no guide model). Checked against hand-written formulas and through a
real Trainer step."""

import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from helpers import Recorder

from lightning_select import GuidedNegatives, HardnessWeightedNegatives, LossHistory, gist_loss
from lightning_select.data import DigitsLDAGuide, DigitsPairsDataModule
from lightning_select.models import DigitsEmbeddingModule


@pytest.fixture(scope="module")
def digits_guide():
    return DigitsLDAGuide.fit(seed=0)


def _loop_attract_loss(a, p, ga, gp, tau, margin, contrast_anchors, contrast_positives):
    """Multi-positive InfoNCE written out with Python loops (independent of the library's blocks)."""
    a, p, ga, gp = (F.normalize(x.double(), dim=-1) for x in (a, p, ga, gp))
    b = a.shape[0]
    losses = []
    for i in range(b):
        theta = float(ga[i] @ gp[i]) - margin
        logits, positive = [], []
        for j in range(b):  # AP
            flagged = float(ga[i] @ gp[j]) > theta
            logits.append(float(a[i] @ p[j]) / tau)
            positive.append(j == i or flagged)
        if contrast_anchors:
            for j in range(b):
                flagged = float(ga[i] @ ga[j]) > theta
                if j == i and flagged:
                    continue  # a self-pair that the guide flags is removed, never attracted
                logits.append(float(a[i] @ a[j]) / tau)
                positive.append(flagged and j != i)
        if contrast_positives:
            for j in range(b):
                flagged = float(gp[i] @ gp[j]) > theta
                if j == i and flagged:
                    continue
                logits.append(float(p[i] @ p[j]) / tau)
                positive.append(flagged and j != i)
        lse = math.log(sum(math.exp(z) for z in logits))
        pos = [z for z, is_pos in zip(logits, positive) if is_pos]
        losses.append(lse - sum(pos) / len(pos))
    return torch.tensor(losses, dtype=torch.float64)


@pytest.mark.parametrize("blocks", [(False, False), (True, True)])
@pytest.mark.parametrize("margin", [0.0, 0.3])
def test_attract_matches_a_loop_formula(blocks, margin):
    g = torch.Generator().manual_seed(3)
    a, p = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    ga = torch.randn(6, 4, generator=g)
    gp = ga + 0.3 * torch.randn(6, 4, generator=g)
    ga[3] = ga[1] + 0.01  # rows 1 and 3 look like duplicates to the guide
    gp[3] = gp[1] + 0.01
    got = gist_loss(a, p, guide_anchor=ga, guide_positive=gp, temperature=0.1, margin=margin,
                    contrast_anchors=blocks[0], contrast_positives=blocks[1], false_negatives="attract")
    want = _loop_attract_loss(a, p, ga, gp, 0.1, margin, *blocks)
    assert torch.allclose(got.double(), want, atol=1e-5), (got, want)


def test_attract_without_flags_equals_drop_and_differs_with_flags():
    g = torch.Generator().manual_seed(0)
    a, p = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)
    one_hot = torch.eye(8)  # flags nothing but the self-pairs
    kw = dict(guide_anchor=one_hot, guide_positive=one_hot, temperature=0.05, margin=0.1)
    assert torch.allclose(gist_loss(a, p, **kw, false_negatives="attract"), gist_loss(a, p, **kw), atol=1e-6)
    ga = torch.ones(8, 3) + 0.01 * torch.randn(8, 3, generator=g)  # everything looks alike: many flags
    kw = dict(guide_anchor=ga, guide_positive=ga, temperature=0.05, margin=0.01)
    drop, attract = gist_loss(a, p, **kw), gist_loss(a, p, **kw, false_negatives="attract")
    assert not torch.allclose(drop, attract)


def test_attracted_entries_get_no_hardness_bonus():
    from lightning_select.rules.contrastive import EmbeddingOutput, build_logits
    from lightning_select.rules.gist import apply_gist
    from lightning_select.rules.hardness import apply_hardness

    g = torch.Generator().manual_seed(1)
    a, p = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    ga = torch.randn(5, 3, generator=g)
    ga[2] = ga[0]
    logits = build_logits(EmbeddingOutput(a, p, temperature=0.1))
    apply_gist(logits, ga, ga, margin=0.05, contrast_anchors=False, contrast_positives=False,
               false_negatives="attract")
    ap = logits.block("ap")
    assert bool(ap.positive[0, 2]) and bool(ap.positive[2, 0])
    apply_hardness(logits, alpha=2.0)
    assert float(ap.bias[0, 2]) == 0.0 and float(ap.bias[0, 1]) != 0.0


def _spy_fit(policies, trainer_kwargs, margin_guide=None):
    seen = {}

    class Spy(DigitsEmbeddingModule):
        def training_step(self, batch, batch_idx):
            out = super().training_step(batch, batch_idx)
            if torch.is_grad_enabled() and "out" not in seen:
                seen["out"] = out
            return out

    rec = Recorder()
    trainer = pl.Trainer(callbacks=[*policies, rec], max_steps=1, limit_val_batches=0, **trainer_kwargs)
    trainer.fit(Spy(), DigitsPairsDataModule(batch_size=64))
    return seen["out"], rec.records[0]["losses"], trainer


@pytest.mark.parametrize("mode", ["drop", "attract"])
def test_self_guide_through_a_trainer_equals_gist_with_the_students_embeddings(trainer_kwargs, mode):
    gist = GuidedNegatives("self", anchor_column="image", positive_column="image", margin=-0.1,
                           false_negatives=mode)
    out, losses, trainer = _spy_fit([gist], trainer_kwargs)
    a, p = out.anchor.detach(), out.positive.detach()
    expected = gist_loss(a, p, guide_anchor=a, guide_positive=p, temperature=out.temperature, margin=-0.1,
                         false_negatives=mode)
    assert torch.allclose(losses, expected, atol=1e-6)
    assert gist.cache is None and gist.guide == "self"
    # the rule: a candidate is flagged iff its student similarity beats the positive's by more than 0.1
    s = F.normalize(a, dim=-1) @ F.normalize(p, dim=-1).T
    flagged = s > (s.diagonal() + 0.1).unsqueeze(1)
    flagged.fill_diagonal_(False)
    got = gist.last_masks["ap"]
    assert torch.equal(got, flagged)


def test_attract_through_a_trainer_logs_and_counts_false_negatives(tmp_path, trainer_kwargs, digits_guide):
    from lightning.pytorch.loggers import CSVLogger

    gist = GuidedNegatives(digits_guide, anchor_column="image", positive_column="image", margin=0.3,
                           false_negatives="attract", record_flagged_pairs=True)
    history = LossHistory()
    trainer = pl.Trainer(callbacks=[gist, history], max_epochs=1, limit_val_batches=0, log_every_n_steps=1,
                         logger=CSVLogger(tmp_path), **{k: v for k, v in trainer_kwargs.items() if k != "logger"})
    trainer.fit(DigitsEmbeddingModule(), DigitsPairsDataModule(batch_size=64))
    metrics = trainer.callback_metrics
    assert float(metrics["gist/attracted_fraction_ap"]) > 0
    assert float(metrics["gist/masked_fraction_ap"]) == 0.0  # attracted, not masked
    assert float(history.store.stats["false_negatives"].sum()) > 0
    assert gist.flagged_pairs()["anchor_index"].numel() > 0


def test_self_guide_with_hardness_and_bad_mode(trainer_kwargs):
    with pytest.raises(ValueError, match="false_negatives"):
        GuidedNegatives("self", false_negatives="pull")
    gist = GuidedNegatives("self", anchor_column="image", positive_column="image", margin=-0.1)
    _, losses, _ = _spy_fit([gist, HardnessWeightedNegatives(alpha=2.0)], trainer_kwargs)
    assert bool(torch.isfinite(losses).all())


# --------------------------------------------------------------------------- the gold false-negative audit
def test_audit_counts_equal_a_recount_of_the_step(trainer_kwargs, digits_guide):
    from lightning_select import FalseNegativeAudit

    seen = {}

    class Spy(DigitsEmbeddingModule):
        def training_step(self, batch, batch_idx):
            if torch.is_grad_enabled() and "label" not in seen:
                seen["label"] = batch["label"].clone()
            return super().training_step(batch, batch_idx)

    for mode in ("drop", "attract"):
        seen.clear()
        gist = GuidedNegatives(digits_guide, anchor_column="image", positive_column="image", margin=0.3,
                               false_negatives=mode)
        audit = FalseNegativeAudit(key="label")
        pl.Trainer(callbacks=[gist, audit], max_steps=1, limit_val_batches=0, **trainer_kwargs).fit(
            Spy(), DigitsPairsDataModule(batch_size=64))
        y, flagged = seen["label"], gist.last_masks["ap"]
        gold = y.view(-1, 1) == y.view(1, -1)
        gold.fill_diagonal_(False)
        assert audit.sums[0].tolist() == [64 * 63, int(gold.sum()), int(flagged.sum()), int((gold & flagged).sum())]
        summary = audit.summary()
        assert summary["ap/gold_fraction"] > 0.05  # ten digit classes: about a tenth of the candidates
        assert 0 < summary["ap/recall"] <= 1 and summary["ap/precision"] > 0.5
        assert summary["ap/left_in_fraction"] < summary["ap/gold_fraction"]


def test_audit_without_gist_measures_the_batches_and_rejects_missing_keys(trainer_kwargs):
    from lightning_select import FalseNegativeAudit, SelectionError

    audit = FalseNegativeAudit(key="label")
    pl.Trainer(callbacks=[audit], max_steps=2, limit_val_batches=0, **trainer_kwargs).fit(
        DigitsEmbeddingModule(), DigitsPairsDataModule(batch_size=64))
    candidates, gold, flagged, true_flags = audit.sums[0].tolist()
    assert candidates == 2 * 64 * 63 and flagged == true_flags == 0 and gold > 0
    assert audit.summary()["ap/left_in_fraction"] == audit.summary()["ap/gold_fraction"]
    with pytest.raises(SelectionError, match="gold keys under 'cluster'"):
        pl.Trainer(callbacks=[FalseNegativeAudit(key="cluster")], max_steps=1, limit_val_batches=0,
                   **trainer_kwargs).fit(DigitsEmbeddingModule(), DigitsPairsDataModule(batch_size=64))
