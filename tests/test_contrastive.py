import math

import pytest
import torch
import torch.nn.functional as F

from lightning_select import EmbeddingOutput, build_logits, info_nce_per_row


def reference_mnrl(a, p, n, scale):
    """Independent MNRL: cross-entropy over scale·cos(a, [p; n_1; …]) with targets on the diagonal."""
    cands = [p] + ([n[:, k] for k in range(n.shape[1])] if n is not None else [])
    scores = F.cosine_similarity(a.unsqueeze(1), torch.cat(cands).unsqueeze(0), dim=-1) * scale
    return F.cross_entropy(scores, torch.arange(a.shape[0]), reduction="none")


@pytest.mark.parametrize("k", [0, 1, 3])
def test_info_nce_matches_independent_mnrl(k):
    torch.manual_seed(k)
    a, p = torch.randn(6, 5), torch.randn(6, 5)
    n = torch.randn(6, k, 5) if k else None
    ours = info_nce_per_row(EmbeddingOutput(a, p, n, temperature=0.05))
    ref = reference_mnrl(a, p, n, scale=20.0)
    assert torch.allclose(ours, ref, atol=1e-5)


def test_info_nce_matches_sentence_transformers_mnrl():
    st_losses = pytest.importorskip("sentence_transformers.losses")
    from sentence_transformers import util

    torch.manual_seed(1)
    a, p, n = torch.randn(5, 4), torch.randn(5, 4), torch.randn(5, 4)

    class Fixed(torch.nn.Module):
        def forward(self, features):
            return {"sentence_embedding": features["emb"]}

    loss = st_losses.MultipleNegativesRankingLoss(Fixed(), scale=20.0, similarity_fct=util.cos_sim)
    ref = loss([{"emb": a}, {"emb": p}, {"emb": n}], labels=None)
    ours = info_nce_per_row(EmbeddingOutput(a, p, n, temperature=0.05)).mean()
    assert abs(float(ref) - float(ours)) < 1e-5


def test_masks_and_target_protection():
    out = EmbeddingOutput(torch.eye(2), torch.eye(2), temperature=0.1)
    logits = build_logits(out)
    logits.block("ap").add_mask(torch.ones(2, 2, dtype=torch.bool))  # try to mask everything
    z = logits.logits()
    assert z[0, 0] == 10.0 and z[0, 1] == -math.inf  # the target survives
    assert torch.allclose(logits.per_row_loss(), torch.zeros(2))
    assert logits.masked_fraction()["ap"].item() == 1.0


def test_embedding_output_validation():
    with pytest.raises(ValueError, match="temperature"):
        EmbeddingOutput(torch.zeros(2, 3), torch.zeros(2, 3), temperature=0.0)
    with pytest.raises(ValueError, match="same shape"):
        EmbeddingOutput(torch.zeros(2, 3), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="negatives"):
        EmbeddingOutput(torch.zeros(2, 3), torch.zeros(2, 3), negatives=torch.zeros(2, 4))


def test_losses_are_fp32_under_bf16_autocast():
    a = torch.randn(4, 8).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = info_nce_per_row(EmbeddingOutput(a, a))
    assert losses.dtype == torch.float32
