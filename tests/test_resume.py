"""Exact resume (single process): stop at an epoch boundary, resume, compare with an uninterrupted run."""

import lightning.pytorch as pl
import torch
from helpers import RandomHalf
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_select import LossHistory, SelectionEngine
from lightning_select.data import DigitsPairsDataModule
from lightning_select.models import DigitsEmbeddingModule


def _run(tmp_path, max_epochs, ckpt_path=None, name="run"):
    pl.seed_everything(0)
    history, selector = LossHistory(trace_epochs=4), RandomHalf(seed=3)
    ckpt = ModelCheckpoint(dirpath=tmp_path / name, save_last=True, save_top_k=0)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=max_epochs, logger=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, callbacks=[SelectionEngine(), selector, history, ckpt],
    )
    model = DigitsEmbeddingModule()
    trainer.fit(model, DigitsPairsDataModule(batch_size=256), ckpt_path=ckpt_path)
    return model, history, selector


def test_resume_equals_uninterrupted_run(tmp_path):
    full_model, full_hist, full_sel = _run(tmp_path, 4, name="full")
    _run(tmp_path, 2, name="part")
    res_model, res_hist, res_sel = _run(tmp_path, 4, ckpt_path=tmp_path / "part" / "last.ckpt", name="resumed")
    a, b = full_hist.store.state_dict(), res_hist.store.state_dict()
    for key, value in a.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value.nan_to_num(-7), b[key].nan_to_num(-7)), key
    assert int(a["count"].sum()) > 0
    # same selections in the resumed epochs (the last 2 of 4)
    n = len(res_sel.selected)
    assert [s.tolist() for s in full_sel.selected[-n:]] == [s.tolist() for s in res_sel.selected]
    for p, q in zip(full_model.parameters(), res_model.parameters()):
        assert torch.equal(p, q)
