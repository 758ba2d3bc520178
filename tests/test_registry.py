"""Tests every policy in the registry (tests/policy_registry.py) gets: fit, exact resume, Hydra.

The 2-process DDP checks of the registry run in the shared launch (tests/ddp_scenarios.py, tests/test_ddp.py).
"""

import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from helpers import Recorder
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from policy_registry import REGISTRY, assert_same_state

ROOT = Path(__file__).resolve().parents[1]
cases = pytest.mark.parametrize("case", REGISTRY, ids=lambda case: case.name)


def fit(case, max_epochs, *, callbacks=(), ckpt_path=None, **trainer_kwargs):
    """Seeded fit of the case's task with fresh policies; returns ``(trainer, model, policies)``."""
    pl.seed_everything(0)
    policies = case.make_policies()
    model, data = case.make_task()
    kwargs = {"accelerator": "cpu", "devices": 1, "max_epochs": max_epochs, "limit_val_batches": 0, "logger": False,
              "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False,
              **trainer_kwargs}
    trainer = pl.Trainer(callbacks=[*policies, *callbacks], **kwargs)
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return trainer, model, policies


@cases
def test_fit_end_to_end(case, tmp_path):
    trainer, _, policies = fit(case, 2, logger=CSVLogger(tmp_path), log_every_n_steps=4)
    state = case.state(policies)
    assert case.activity(state) > 0
    case.check(state, 2)
    assert float(trainer.callback_metrics[case.metric]) > 0  # the policy's own statistic was logged
    assert 0 < float(trainer.callback_metrics["select/loss_mean"]) < 10  # the engine ran the steps


@pytest.mark.parametrize("case", REGISTRY, ids=lambda case: case.name)
def test_resume_is_exact(case, tmp_path):
    def run(max_epochs, name, ckpt_path=None):
        recorder = Recorder()  # the rows, losses and weights of every step
        checkpoint = ModelCheckpoint(dirpath=tmp_path / name, save_last=True, save_top_k=0)
        _, model, policies = fit(case, max_epochs, callbacks=[recorder, checkpoint], ckpt_path=ckpt_path,
                                 enable_checkpointing=True)
        return model, case.state(policies), recorder.records

    full_model, full_state, full_steps = run(4, "full")
    run(2, "part")
    resumed_model, resumed_state, resumed_steps = run(4, "resumed", ckpt_path=tmp_path / "part" / "last.ckpt")

    assert case.activity(full_state) > 0
    assert len(resumed_steps) == len(full_steps) // 2 > 0  # the resumed run trained epochs 2 and 3 only
    for full, resumed in zip(full_steps[-len(resumed_steps):], resumed_steps):
        for key in ("indices", "weights", "losses"):
            assert torch.equal(full[key], resumed[key]), key
    for (name, p), q in zip(full_model.named_parameters(), resumed_model.parameters()):
        assert torch.equal(p, q), name
    assert_same_state(full_state, resumed_state)


@cases
def test_hydra_selector_composes_and_runs(case, tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from lightning_select.cli import build_callbacks, run

    selectors = list(dict.fromkeys([case.selector, "loss_history"]))
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[
            f"+selector=[{','.join(selectors)}]", f"paths.output_dir={tmp_path}", "callbacks=none",
            "trainer.max_epochs=1", "++trainer.limit_train_batches=3", "++trainer.limit_val_batches=1",
            "trainer.log_every_n_steps=1",
        ])
    built = {type(cb) for cb in build_callbacks(cfg)}
    assert {type(p) for p in case.make_policies()} <= built  # the selector builds this entry's policy

    metrics = run(cfg)
    assert 0.0 < metrics[case.hydra_metric] <= 1.0
    import pandas as pd

    logged = pd.read_csv(next(tmp_path.glob("csv/*/metrics.csv")))
    assert case.metric in logged and (logged[case.metric].dropna() > 0).any()
    history = pd.read_parquet(tmp_path / "loss_history.parquet")
    loaded = int(cfg.data.batch_size)  # the rows of each of the 3 loaded batches (the selector may switch the task)
    trained = int(history["count"].sum())
    if case.hydra_kept_fraction == 1.0:
        assert trained == 3 * loaded
    else:
        assert 0 < trained <= 3 * math.ceil(loaded * case.hydra_kept_fraction)
