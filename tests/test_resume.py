"""Exact resume (single process): stop at an epoch boundary, resume, compare with an uninterrupted run."""

import lightning.pytorch as pl
import pytest
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


def test_mid_epoch_resume_is_exact_with_a_schedule_sized_from_the_loader(tmp_path):
    """A cosine schedule sized in configure_optimizers makes Lightning set up the training loader before the
    checkpoint is restored, so Lightning never hands the loader its saved position; the engine loads it at
    on_train_start (otherwise the resumed run would train the interrupted epoch again from its start)."""
    import lightning.pytorch as pl
    from helpers import Recorder
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_select import LossHistory
    from lightning_select.data.noisy_labels import NoisyDigitsDataModule
    from lightning_select.models.classifier import NoisyLabelClassifier

    class StopAt(pl.Callback):  # stop the planned 3-epoch run after `step` steps (the schedule keeps its length)
        def __init__(self, step):
            self.step = step

        def on_train_batch_end(self, trainer, *args):
            trainer.should_stop = trainer.should_stop or trainer.global_step == self.step

    def fit(name, ckpt_path=None, stop_at=None):
        pl.seed_everything(0)
        recorder = Recorder()
        ckpt = ModelCheckpoint(dirpath=tmp_path / name, save_last=True, save_top_k=0, every_n_train_steps=1)
        callbacks = [LossHistory(), recorder, ckpt] + ([StopAt(stop_at)] if stop_at else [])
        trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, limit_val_batches=0, enable_progress_bar=False,
                             enable_model_summary=False, callbacks=callbacks, max_epochs=3)
        model = NoisyLabelClassifier(arch="mlp", hidden=32, cosine_schedule=True)
        trainer.fit(model, NoisyDigitsDataModule(batch_size=256), ckpt_path=ckpt_path)
        return model, recorder.records, trainer

    full_model, full_steps, _ = fit("full")
    _, part_steps, _ = fit("part", stop_at=7)  # 5 steps per epoch: stops after the 2nd step of epoch 1
    assert len(part_steps) == 7
    model, steps, trainer = fit("resumed", ckpt_path=tmp_path / "part" / "last.ckpt")
    assert len(steps) == len(full_steps) - 7 == 8
    for a, b in zip(full_steps[7:], steps):
        assert torch.equal(a["indices"], b["indices"]) and torch.equal(a["losses"], b["losses"])
    for p, q in zip(full_model.parameters(), model.parameters()):
        assert torch.equal(p, q)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
