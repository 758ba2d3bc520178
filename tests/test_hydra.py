"""Hydra: every config file composes, selectors compose and nest, unknown names fail with the options."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf, open_dict

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def _compose(overrides=(), hydra_cfg=True):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=hydra_cfg)
    if hydra_cfg:
        HydraConfig().set_config(cfg)
    return cfg


def _options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group", ["data", "model", "trainer", "selector", "experiment", "logger", "callbacks", "paths", "guide"])
def test_every_config_file_composes(group, tmp_path):
    for option in _options(group):
        override = {"selector": f"+selector={option}",
                    "guide": f"guide@selector.gist.guide={option}"}.get(group, f"{group}={option}")
        extra = ["+selector=gist"] if group == "guide" else []
        cfg = _compose(extra + [override, f"hydra.run.dir={tmp_path}"])
        job = cfg.copy()
        with open_dict(job):
            del job["hydra"]
        resolved = OmegaConf.to_container(job, resolve=True)  # every interpolation resolves
        assert resolved["trainer"]["_target_"] == "lightning.pytorch.Trainer"


def test_launcher_config_ties_slurm_tasks_to_trainer():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    cfg = _compose(["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=3"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.tasks_per_node, launcher.nodes) == (4, 3)


def test_selectors_nest_and_compose():
    cfg = _compose(["+selector=[loss_history]", "selector.loss_history.ema_decay=0.5"])
    assert cfg.selector.loss_history.ema_decay == 0.5
    cfg = _compose(["experiment=digits_history"])
    assert cfg.selector.loss_history.trace_epochs == 30 and cfg.trainer.max_epochs == 30


def test_unknown_selector_lists_available_options():
    with pytest.raises(ConfigCompositionException) as err:
        _compose(["+selector=not_a_selector"])
    message = str(err.value) + str(err.value.__cause__)
    assert "not_a_selector" in message and "Available options" in message and "loss_history" in message


def test_build_callbacks_rejects_flat_selector_nodes():
    from lightning_select.cli import build_callbacks

    cfg = _compose(["+selector=loss_history"])
    with open_dict(cfg):
        cfg.selector.flat = 0.3
    with pytest.raises(ValueError, match="nest their content under their own name"):
        build_callbacks(cfg)


def test_run_in_process_with_gist_and_history(tmp_path):
    from lightning_select.cli import run

    cfg = _compose([
        "+selector=[gist,loss_history]", "trainer.max_epochs=1", f"paths.output_dir={tmp_path}", "callbacks=none",
    ])
    assert cfg.selector.gist.guide._target_.endswith("DigitsLDAGuide.fit")
    metrics = run(cfg)
    assert 0.0 < metrics["heldout/precision@1"] <= 1.0
    import pandas as pd

    history = pd.read_parquet(tmp_path / "loss_history.parquet")
    assert history["stat_false_negatives"].sum() > 0  # GIST's per-sample counts flow into the history


def test_run_in_process_with_history(tmp_path):
    from lightning_select.cli import run

    cfg = _compose([
        "+selector=loss_history", "trainer.max_epochs=2", f"paths.output_dir={tmp_path}", "callbacks=none",
    ])
    metrics = run(cfg)
    assert 0.0 < metrics["heldout/precision@1"] <= 1.0
    assert (tmp_path / "loss_history.parquet").exists()


def test_train_py_multirun_subprocess(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "train.py"), "-m", "+selector=loss_history", "seed=0,1",
           "trainer.max_epochs=1", "callbacks=none", f"hydra.sweep.dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("final held-out metrics") == 2
    assert sorted(p.parent.name for p in tmp_path.glob("*/loss_history.parquet")) == ["0", "1"]


def test_readme_lists_every_selector_file():
    """The README's list of `+selector=` names is the set of files in conf/selector (no stale or missing name)."""
    import re

    line = next(l for l in (ROOT / "README.md").read_text().splitlines() if l.startswith("- `selector`:"))
    listed = set(re.findall(r"`([a-z0-9_]+)`", line.split(":", 1)[1]))
    files = {p.stem for p in (ROOT / "conf" / "selector").glob("*.yaml")}
    assert listed == files, f"README lists {sorted(listed - files)} without a file; files not listed: {sorted(files - listed)}"
