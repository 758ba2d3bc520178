"""Pre-emption: a real SIGTERM mid-epoch saves a checkpoint and the history, exits non-zero, and resuming
gives exactly the uninterrupted run (history, selections, parameters)."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import pytest
import torch
from helpers import RandomHalf, SignalAt
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_select import LossHistory, PreemptionCheckpoint, SelectionEngine, TrainingPreempted
from lightning_select.data import DigitsPairsDataModule
from lightning_select.models import DigitsEmbeddingModule

ROOT = Path(__file__).resolve().parents[1]


def _run(tmp_path, name, max_epochs=3, ckpt_path=None, signal_at=None):
    pl.seed_everything(0)
    history, selector = LossHistory(trace_epochs=3, export_path=str(tmp_path / name / "history.parquet")), RandomHalf(3)
    callbacks = [SelectionEngine(), selector, history, PreemptionCheckpoint(),
                 ModelCheckpoint(dirpath=tmp_path / name / "checkpoints", save_last=True, save_top_k=1)]
    if signal_at is not None:
        callbacks.append(SignalAt(signal_at))
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=max_epochs, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, callbacks=callbacks)
    model = DigitsEmbeddingModule()
    trainer.fit(model, DigitsPairsDataModule(batch_size=128), ckpt_path=ckpt_path)
    return model, history, selector


def test_sigterm_mid_epoch_checkpoints_exports_and_resumes_exactly(tmp_path):
    full_model, full_hist, full_sel = _run(tmp_path, "full")
    with pytest.raises(TrainingPreempted) as caught:
        _run(tmp_path, "killed", signal_at=17)  # 12 batches per epoch: step 17 is in the middle of epoch 1
    assert caught.value.code == 128 + signal.SIGTERM
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    assert caught.value.checkpoint == last and last.exists()
    assert torch.load(last, weights_only=False)["global_step"] == 18  # the step the signal arrived in finished
    partial = pd.read_parquet(tmp_path / "killed" / "history.parquet")
    assert int(partial["count"].sum()) > 0 and int(partial["last_step"].max()) == 17  # exported on the way out
    assert signal.getsignal(signal.SIGTERM) is not None  # handlers restored

    res_model, res_hist, res_sel = _run(tmp_path, "resumed", ckpt_path=last)
    a, b = full_hist.store.state_dict(), res_hist.store.state_dict()
    for key, value in a.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value.nan_to_num(-7), b[key].nan_to_num(-7)), key
    n = len(res_sel.selected)
    assert n == 36 - 18  # the resumed run trained exactly the remaining batches
    assert [s.tolist() for s in full_sel.selected[-n:]] == [s.tolist() for s in res_sel.selected]
    for p, q in zip(full_model.parameters(), res_model.parameters()):
        assert torch.equal(p, q)


def _train_py(tmp_path, run_dir, *overrides, env_extra=None):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), **(env_extra or {})}
    cmd = [sys.executable, str(ROOT / "train.py"), "+selector=[gist,loss_history]", "trainer.max_epochs=3",
           f"hydra.run.dir={run_dir}", "logger=csv", *overrides]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_train_py_sigterm_then_resume_with_one_command(tmp_path):
    full = _train_py(tmp_path, tmp_path / "full")
    assert full.returncode == 0, full.stderr[-3000:]
    killed = _train_py(tmp_path, tmp_path / "killed", "+callbacks.signal._target_=helpers.SignalAt",
                       "+callbacks.signal.step=17")
    assert killed.returncode == 128 + signal.SIGTERM, killed.stderr[-3000:]
    assert (tmp_path / "killed" / "checkpoints" / "last.ckpt").exists()
    resumed = _train_py(tmp_path, tmp_path / "killed", "ckpt_path=last")  # same run folder, one command
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = pd.read_parquet(tmp_path / "full" / "loss_history.parquet")
    b = pd.read_parquet(tmp_path / "killed" / "loss_history.parquet")
    assert list(a.columns) == list(b.columns)
    for column in a.columns:
        assert np.array_equal(a[column].to_numpy(), b[column].to_numpy(), equal_nan=True), column
    final = [line for line in full.stdout.splitlines() if line.startswith("[lightning_select] final held-out")]
    assert len(final) == 1 and final == [line for line in resumed.stdout.splitlines()
                                         if line.startswith("[lightning_select] final held-out")]
    assert "resuming from" in resumed.stdout and "outputs: run folder" in killed.stdout
    assert "final held-out metrics" in (tmp_path / "full" / "train.log").read_text()  # also in the run's log


def test_shipped_config_keeps_last_ckpt_current_during_training(tmp_path):
    """conf/callbacks/default.yaml writes last.ckpt at every epoch end, not only when training ends."""
    from helpers import LastCheckpointProbe
    from test_hydra import _compose

    from lightning_select.cli import run

    LastCheckpointProbe.seen = []
    cfg = _compose(["trainer.max_epochs=3", "+callbacks.probe._target_=helpers.LastCheckpointProbe",
                    f"hydra.run.dir={tmp_path}", f"paths.output_dir={tmp_path}", "logger=csv"])
    run(cfg)
    assert LastCheckpointProbe.seen == [(1, True), (2, True)]
