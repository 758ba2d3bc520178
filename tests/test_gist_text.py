"""GIST on real text: the tiny static student with the offline all-MiniLM-L6-v2 guide."""

import os
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from helpers import Recorder

from lightning_select import GuidedNegatives, LossHistory, SelectionEngine, gist_loss, load_guide

pytestmark = pytest.mark.data
DATA = Path(os.environ.get("LIGHTNING_SELECT_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(scope="module")
def data_dir():
    if not (DATA / "text_pairs" / "sick2014" / "SICK_train.txt").exists():
        if os.environ.get("CI"):
            pytest.fail(f"shared data missing at {DATA} (set LIGHTNING_SELECT_DATA)")
        pytest.skip(f"shared data missing at {DATA}")
    return str(DATA)


@pytest.fixture(scope="module")
def minilm():
    return load_guide("minilm")


def test_transformers_and_sentence_transformers_guides_agree(minilm):
    st = load_guide("minilm", backend="sentence-transformers")
    texts = ["A man is playing a guitar.", "Two dogs run on the beach.", "How do I learn Python?"]
    a, b = minilm(texts), st(texts)
    assert a.shape == (3, 384)
    assert torch.allclose(a, b.to(a), atol=1e-4)


def test_static_student_with_minilm_guide_end_to_end(data_dir, minilm, trainer_kwargs):
    from lightning_select.data import SickDataModule
    from lightning_select.models import TextEmbeddingModule

    seen = {}

    class Spy(TextEmbeddingModule):
        def training_step(self, batch, batch_idx):
            out = super().training_step(batch, batch_idx)
            if "out" not in seen and torch.is_grad_enabled():
                seen["out"], seen["batch"] = out, batch
            return out

    rec, history = Recorder(), LossHistory()
    gist = GuidedNegatives(minilm, "anchor", "positive", precompute=False)  # lazily: a few steps only
    trainer = pl.Trainer(callbacks=[SelectionEngine(), gist, history, rec], max_steps=3, limit_val_batches=0,
                         **trainer_kwargs)
    trainer.fit(Spy(student_path=str(Path(data_dir) / "models" / "minilm-l6-m2v-128d")),
                SickDataModule(data_dir=data_dir, batch_size=32))
    out, batch = seen["out"], seen["batch"]
    expected = gist_loss(out.anchor.detach(), out.positive.detach(), guide_anchor=minilm(batch["anchor"]),
                         guide_positive=minilm(batch["positive"]), temperature=out.temperature)
    assert torch.allclose(rec.records[0]["losses"], expected, atol=1e-5)
    assert history.store.stats["false_negatives"].sum() > 0  # SICK repeats sentences: the guide flags some


def test_sentence_transformers_gist_refuses_a_static_student_that_we_accept():
    """The gap users hit: sentence-transformers' GISTEmbedLoss rejects a static-embedding student."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import GISTEmbedLoss
    from sentence_transformers.sentence_transformer.modules import StaticEmbedding
    from tokenizers import Tokenizer

    path = DATA / "models" / "minilm-l6-m2v-128d"
    if not path.exists():
        pytest.skip("static student missing")
    static = StaticEmbedding(Tokenizer.from_file(str(path / "tokenizer.json")), embedding_dim=8)
    with pytest.raises(ValueError):
        GISTEmbedLoss(SentenceTransformer(modules=[static]), SentenceTransformer(modules=[static]))


def test_guide_scores_are_fp32_under_bf16_autocast(trainer_kwargs):
    """Mask decisions near the threshold must not flip under mixed precision: same masks as fp32."""
    from lightning_select.data import DigitsLDAGuide, DigitsPairsDataModule
    from lightning_select.models import DigitsEmbeddingModule

    masks = []
    for precision in ("32-true", "bf16-mixed"):
        pl.seed_everything(0)
        gist = GuidedNegatives(DigitsLDAGuide.fit(seed=0), "image", "image", margin=0.6)
        trainer = pl.Trainer(callbacks=[gist], max_steps=1, limit_val_batches=0, precision=precision,
                             **trainer_kwargs)
        trainer.fit(DigitsEmbeddingModule(), DigitsPairsDataModule(batch_size=128))
        masks.append({k: v.clone() for k, v in gist.last_masks.items()})
    assert masks[0].keys() == masks[1].keys() and all(torch.equal(masks[0][k], masks[1][k]) for k in masks[0])
