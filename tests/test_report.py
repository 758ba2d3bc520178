"""`lightning-select report`: numbers against independent formulas, the offline page, bad input, real runs,
and the page rendered by headless Chromium."""

import base64
import html
import io
import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from lightning_select.report import ReportError, build_report, load_run
from lightning_select.report.__main__ import cli, main
from lightning_select.report.facts import roc_auc, unavailable_statistics
from lightning_select.report.figures import flag_counts, metric_series, most_flagged, top_pairs, trace_matrix

ROOT = Path(__file__).resolve().parents[1]
N, EPOCHS = 60, 4
TEXTS = [f"question {i} about topic {i % 3}" for i in range(N)]


class TinyPairs:
    """A datamodule-like text-pair set for the report's text lookup (target of a synthetic config)."""

    def __init__(self, size: int = N) -> None:
        self.size = size

    def setup(self, stage=None) -> None:
        self.train_set = [{"anchor": TEXTS[i], "positive": f"paraphrase of {i}", "anchor_cluster": i % 3}
                          for i in range(self.size)]


def make_run(root: Path, n: int = N, config_data: dict | None = None, parts=("history", "dynamics", "dbpm",
             "pairs", "metrics")) -> Path:
    """A run directory of synthetic tables in the producers' formats."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    noisy = rng.random(n) < 0.25
    p_true = np.clip(rng.normal(np.where(noisy, 0.25, 0.75)[:, None], 0.15, (n, EPOCHS)), 0, 1)
    if "history" in parts:
        history = {"index": np.arange(n), "ema_loss": -np.log(p_true.mean(1)), "count": np.full(n, EPOCHS),
                   "last_epoch": np.full(n, EPOCHS - 1), "stat_false_negatives": rng.integers(0, 5, n).astype(float)}
        history.update({f"loss_epoch_{e}": -np.log(p_true[:, e] + 1e-3) for e in range(EPOCHS)})
        pd.DataFrame(history).sample(frac=1.0, random_state=0).to_parquet(root / "loss_history.parquet")
    if "dynamics" in parts:
        aum = rng.normal(np.where(noisy, -1.0, 1.0), 1.0)
        pd.DataFrame({"index": np.arange(n), "confidence": p_true.mean(1), "variability": p_true.std(1),
                      "correctness": (p_true > 0.5).mean(1), "forgetting_events": rng.integers(0, 3, n).astype(float),
                      "aum": aum, "el2n": np.full(n, np.nan), "epochs_seen": np.full(n, EPOCHS),
                      "label": rng.integers(0, 10, n), "noisy": noisy}).to_parquet(root / "training_dynamics.parquet")
        meta = {"num_samples": n, "epochs": EPOCHS, "seed": 0, "config": None, "dataset": "Synthetic",
                "statistics": {"aum": {"available": True},
                               "el2n": {"available": False, "reason": "EL2N needs class logits (synthetic reason)"}},
                "trace_file": "training_dynamics_trace.npy", "trace_epochs": list(range(EPOCHS))}
        (root / "training_dynamics.json").write_text(json.dumps(meta))
        np.save(root / "training_dynamics_trace.npy", p_true.astype(np.float32))
    if "dbpm" in parts:
        mean_loss = rng.normal(2.0, 0.5, n)
        flag = np.where(mean_loss < 1.2, 1, np.where(mean_loss > 3.0, 2, 0))
        pd.DataFrame({"index": np.arange(n), "mean_loss": mean_loss, "flag": flag,
                      "weight": np.where(flag > 0, 0.3, 1.0)}).to_parquet(root / "dbpm.parquet")
        (root / "dbpm.json").write_text(json.dumps({"mu": 2.0, "sigma": 0.5, "beta_np": 2.0, "beta_fp": 3.0}))
    if "pairs" in parts:
        k = 400
        pd.DataFrame({"anchor_index": rng.integers(0, n, k), "candidate_index": rng.integers(0, n // 2, k),
                      "block": rng.choice(["ap", "aa", "pp"], k), "guide_score": rng.random(k),
                      "threshold": np.full(k, 0.4), "epoch": rng.integers(0, EPOCHS, k),
                      "step": rng.integers(0, 40, k)}).to_parquet(root / "flagged_pairs.parquet")
    if "metrics" in parts:
        (root / "csv" / "version_0").mkdir(parents=True, exist_ok=True)
        steps = np.arange(4, 44, 5)
        pd.DataFrame({"step": steps, "epoch": steps // 10, "gist/masked_fraction_ap": np.linspace(0.1, 0.2, 8),
                      "sb/kept_fraction": np.linspace(1.0, 0.3, 8), "focal/weight_mean": np.ones(8),
                      "focal/ess_fraction": np.linspace(1.0, 0.6, 8)}).to_csv(root / "csv/version_0/metrics.csv",
                                                                             index=False)
    if config_data is not None:
        (root / ".hydra").mkdir(exist_ok=True)
        OmegaConf.save(OmegaConf.create({"seed": 3, "data": config_data, "trainer": {"max_epochs": EPOCHS},
                                         "selector": {"gist": {"_target_": "lightning_select.GuidedNegatives"}}}),
                       root / ".hydra" / "config.yaml")
    return root


def _images(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def assert_offline(page: str) -> None:
    """No reference that a browser would fetch: every src/href is a data: URI or an in-page anchor."""
    refs = re.findall(r'(?:src|href)\s*=\s*["\']?([^"\'\s>]+)', page, flags=re.I)
    assert refs and all(r.startswith(("data:image/png;base64,", "#")) for r in refs), [r[:40] for r in refs]
    assert "http://" not in page and "https://" not in page
    assert not re.search(r"<script|<link|<iframe|@import|url\(", page, flags=re.I)


# ------------------------------------------------------------------------------ numbers vs references
def test_roc_auc_matches_sklearn_with_ties_and_infinity():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)
    score, positive = rng.integers(0, 5, 300).astype(float), rng.random(300) < 0.3
    assert roc_auc(score, positive) == pytest.approx(roc_auc_score(positive, score))
    score[positive & (rng.random(300) < 0.5)] = np.inf  # never learned: ranked above every finite score
    assert roc_auc(score, positive) == pytest.approx(roc_auc_score(positive, np.where(np.isinf(score), 99.0, score)))
    assert np.isnan(roc_auc(score, np.zeros(300, bool)))


def test_pair_and_flag_helpers_match_loops():
    rng = np.random.default_rng(2)
    pairs = pd.DataFrame({"anchor_index": rng.integers(0, 20, 500), "candidate_index": rng.integers(0, 20, 500),
                          "block": rng.choice(["ap", "aa"], 500), "guide_score": rng.random(500),
                          "step": rng.integers(0, 9, 500)})
    counts = Counter(pairs["candidate_index"].tolist())
    assert flag_counts(pairs, 25).tolist() == [counts.get(i, 0) for i in range(25)]
    groups: dict = {}
    for a, c, b, g, s in pairs.itertuples(index=False):
        groups.setdefault((min(a, c), max(a, c)), []).append((b, g, s))
    expected = sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))[:5]
    got = top_pairs(pairs, 5)
    assert list(zip(got["first"], got["second"])) == [key for key, _ in expected]
    for (_, rows), record in zip(expected, got.to_dict("records")):
        assert record["times"] == len(rows) and record["batches"] == len({s for *_, s in rows})
        assert record["blocks"] == ",".join(sorted({b for b, *_ in rows}))
        assert record["guide_score"] == pytest.approx(np.mean([g for _, g, _ in rows]), abs=1e-6)


def test_ranking_traces_series_and_metadata_shapes():
    score = np.array([3.0, np.nan, 5.0, 5.0, -np.inf, 1.0])
    assert most_flagged(score, 3).tolist() == [2, 3, 0]
    assert most_flagged(score, 2, highest=False).tolist() == [5, 0]  # -inf is not finite: never chosen
    epochs, values = trace_matrix(pd.DataFrame({"loss_epoch_10": [1.0], "loss_epoch_2": [2.0], "x": [0.0]}))
    assert epochs == [2, 10] and values.tolist() == [[2.0, 1.0]]
    metrics = pd.DataFrame({"step": [1, 2, 3], "a/kept_fraction": [0.5, np.nan, 0.7], "b/kept": [1, 1, 1]})
    found = metric_series(metrics, r"/kept_fraction$")
    assert {k: v[0].tolist() for k, v in found.items()} == {"a/kept_fraction": [1, 3]}
    assert unavailable_statistics({"unavailable": {"aum": "no logits"}}) == {"aum": "no logits"}
    assert unavailable_statistics({"statistics": {"unavailable": [{"name": "el2n", "reason": "r"}]}}) == {"el2n": "r"}


# ------------------------------------------------------------------------------ the page
def test_synthetic_report_has_every_section_offline(tmp_path):
    from PIL import Image
    from sklearn.metrics import roc_auc_score

    run_dir = make_run(tmp_path / "run", config_data={"_target_": "test_report.TinyPairs"})
    run, path = build_report(run_dir, tmp_path / "out" / "page.html", top=5, progress=False)
    page = path.read_text()
    assert_offline(page)
    for key in ("overview", "cartography", "trajectories", "histograms", "gist", "selection", "dbpm", "unavailable"):
        assert f'<section id="{key}">' in page, key
    images = _images(page)
    assert len(images) == 9  # map, 2 trajectories, histograms, masked fraction, flags, kept, weights, DBPM
    for png in images:
        with Image.open(io.BytesIO(png)) as im:
            assert im.format == "PNG" and im.size[0] >= 600 and im.size[1] >= 200
    dyn = pd.read_parquet(run_dir / "training_dynamics.parquet")
    auc = roc_auc_score(dyn["noisy"], -dyn["aum"])
    assert f"<td>aum</td><td>lower</td><td>{auc:.3f}</td>" in page
    assert "EL2N needs class logits (synthetic reason)" in page
    flagged = pd.read_parquet(run_dir / "flagged_pairs.parquet")["candidate_index"].nunique() / N
    assert f"{flagged:.1%}" in page
    best = top_pairs(pd.read_parquet(run_dir / "flagged_pairs.parquet"), 1).iloc[0]
    assert TEXTS[int(best["first"])] in page and TEXTS[int(best["second"])] in page  # texts from the dataset
    assert "same anchor_cluster" in page and run.dataset is not None


def test_history_only_run_and_unloadable_dataset_say_why(tmp_path):
    data = {"_target_": "lightning_select.data.QuoraDuplicatesDataModule", "data_dir": str(tmp_path / "nowhere")}
    run_dir = make_run(tmp_path / "run", parts=("history", "pairs"), config_data=data)
    run, path = build_report(run_dir, top=3, progress=False)
    page = path.read_text()
    assert path == run_dir / "report.html" and run.dataset is None
    assert "could not be loaded here" in page and "Texts are not shown" in page
    assert '<section id="cartography">' not in page and '<section id="trajectories">' in page
    assert_offline(page)


def test_cli_prints_summary_and_exit_codes(tmp_path, capsys):
    run_dir = make_run(tmp_path / "run", parts=("history", "dynamics"))
    assert main([str(run_dir), "--out", str(tmp_path / "r.html"), "--quiet", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert f"Synthetic ({N} training samples)" in out and "best mislabel detector: confidence (ROC-AUC 1.000)" in out
    assert "unavailable: el2n: EL2N needs class logits" in out and (tmp_path / "r.html").is_file()
    assert cli(["report", str(tmp_path / "missing"), "--quiet"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main([str(run_dir), "--top", "0", "--quiet"]) == 2
    assert "--top must be >= 1" in capsys.readouterr().err
    pyproject = (ROOT / "pyproject.toml").read_text()  # the console script (tomllib is Python 3.11+)
    script = r'\[project\.scripts\][^\[]*\nlightning-select = "lightning_select\.report\.__main__:cli"'
    assert re.search(script, pyproject)


# ------------------------------------------------------------------------------ bad input
def test_missing_directory_file_and_no_history(tmp_path):
    with pytest.raises(ReportError, match="does not exist"):
        load_run(tmp_path / "missing")
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ReportError, match="is a file, not a run directory"):
        load_run(tmp_path / "a_file")
    run_dir = make_run(tmp_path / "run", parts=("metrics", "pairs"))
    with pytest.raises(ReportError, match=r"holds no per-sample history.*\+selector=loss_history"):
        load_run(run_dir)
    with pytest.raises(ValueError, match="`top` to be an int >= 1"):
        build_report(make_run(tmp_path / "ok", parts=("history",)), top=0, progress=False)


def test_histories_of_different_dataset_sizes_are_refused(tmp_path):
    run_dir = make_run(tmp_path / "meta", parts=("dynamics",))
    meta = json.loads((run_dir / "training_dynamics.json").read_text())
    (run_dir / "training_dynamics.json").write_text(json.dumps({**meta, "num_samples": N + 5}))
    with pytest.raises(ReportError, match=f"has {N} rows but its metadata.*records {N + 5} samples"):
        load_run(run_dir)
    run_dir = make_run(tmp_path / "mixed", parts=("dynamics",))
    make_run(run_dir, n=N - 10, parts=("history",))  # another run's history dropped into the folder
    with pytest.raises(ReportError, match=f"disagree on the dataset size.*loss_history.parquet: {N - 10}"):
        load_run(run_dir)
    run_dir = make_run(tmp_path / "pairs", n=20, parts=("history",))
    make_run(run_dir, parts=("pairs",))
    with pytest.raises(ReportError, match="outside the history's 20 samples"):
        load_run(run_dir)


def test_damaged_files_are_refused_by_name(tmp_path):
    run_dir = make_run(tmp_path / "table", parts=("history",))
    (run_dir / "loss_history.parquet").write_bytes(b"not a parquet file")
    with pytest.raises(ReportError, match="Could not read loss_history.parquet"):
        load_run(run_dir)
    run_dir = make_run(tmp_path / "index", parts=("history",))
    frame = pd.read_parquet(run_dir / "loss_history.parquet")
    frame.loc[frame["index"] == 3, "index"] = 4
    frame.to_parquet(run_dir / "loss_history.parquet")
    with pytest.raises(ReportError, match="loss_history.parquet is damaged: its `index` column"):
        load_run(run_dir)
    run_dir = make_run(tmp_path / "json", parts=("history", "dbpm"))
    (run_dir / "dbpm.json").write_text("{mu: 1")
    with pytest.raises(ReportError, match="dbpm.json is not valid JSON"):
        load_run(run_dir)
    run_dir = make_run(tmp_path / "trace", parts=("history", "dynamics"))
    np.save(run_dir / "training_dynamics_trace.npy", np.zeros(N, dtype=np.float32))
    with pytest.raises(ReportError, match=r"trace.npy has shape \(60,\); expected \[samples, epochs\]"):
        load_run(run_dir)


def test_history_from_another_dataset_size_than_the_config(tmp_path):
    digits = {"_target_": "lightning_select.data.DigitsPairsDataModule", "batch_size": 32}
    run_dir = make_run(tmp_path / "run", parts=("history",), config_data=digits)
    with pytest.raises(ReportError, match=r"holds 60 samples, but the run's dataset \(DigitsPairsDataModule.*"
                                          r"has 1437 training samples: a history from a different dataset size"):
        load_run(run_dir)
    assert load_run(run_dir, load_data=False).dataset is None  # --no-data skips the check


@pytest.mark.data
def test_texts_of_flagged_pairs_come_from_the_runs_quora_data(tmp_path):
    from test_text_data import require, shared_data

    require("text_pairs/quora/quora_duplicate_questions.tsv.gz")
    data = {"_target_": "lightning_select.data.QuoraDuplicatesDataModule", "data_dir": str(shared_data()),
            "max_train_pairs": 2000, "test_clusters": 300, "seed": 0}
    run_dir = make_run(tmp_path / "run", n=2000, parts=("history", "pairs"), config_data=data)
    run, path = build_report(run_dir, top=3, progress=False)
    page = path.read_text()
    best = top_pairs(pd.read_parquet(run_dir / "flagged_pairs.parquet"), 3)
    for i in np.concatenate([best["first"], best["second"]]):
        item = run.dataset[int(i)]
        assert html.escape(item["anchor"][:100]) in page and html.escape(item["positive"][:100]) in page
    assert "same anchor_cluster" in page and not run.notes


# ------------------------------------------------------------------------------ real runs
@pytest.fixture(scope="module")
def gist_run(tmp_path_factory):
    """A real Hydra run of train.py: digits, GIST with flagged pairs, loss history with a 2-epoch trace."""
    out = tmp_path_factory.mktemp("gist_run")
    cmd = [sys.executable, str(ROOT / "train.py"), "+selector=[gist,loss_history]",
           "selector.loss_history.trace_epochs=3",
           "selector.gist.flagged_pairs_path=${paths.output_dir}/flagged_pairs.parquet", "trainer.max_epochs=2",
           "+trainer.limit_train_batches=3", "+trainer.limit_val_batches=0", "+trainer.enable_progress_bar=false",
           "callbacks=none", f"hydra.run.dir={out}"]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.slow
def test_report_of_a_real_gist_run(gist_run, tmp_path, capsys):
    assert cli(["report", str(gist_run), "--out", str(tmp_path / "gist.html"), "--top", "5", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "DigitsPairsDataModule (1437 training samples)" in out and "gist (GuidedNegatives)" in out
    page = (tmp_path / "gist.html").read_text()
    assert_offline(page)
    for key in ("trajectories", "histograms", "gist", "selection"):
        assert f'<section id="{key}">' in page, key
    assert "Every sample was kept with weight 1 throughout" in page and "same label" in page
    pairs = pd.read_parquet(gist_run / "flagged_pairs.parquet")
    assert f"{(flag_counts(pairs, 1437) > 0).mean():.1%} ({len(pairs)} flagged pairs)" in out


@pytest.mark.slow
def test_report_of_a_real_training_dynamics_run(tmp_path):
    """TrainingDynamics and LossHistory on noisy digits (conf/selector/training_dynamics.yaml switches the task),
    through the Hydra config and lightning_select.cli.run."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from sklearn.metrics import roc_auc_score

    from lightning_select.cli import run as train

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[
            "+selector=[training_dynamics,loss_history]", "selector.loss_history.trace_epochs=3",
            "selector.training_dynamics.trace_epochs=3", "trainer.max_epochs=3", "+trainer.limit_train_batches=6",
            "+trainer.limit_val_batches=0", "+trainer.enable_progress_bar=false", "callbacks=none",
            f"paths.output_dir={tmp_path}"])
    GlobalHydra.instance().clear()
    (tmp_path / ".hydra").mkdir()
    OmegaConf.save(cfg, tmp_path / ".hydra" / "config.yaml")
    train(cfg)
    run, path = build_report(tmp_path, top=5, progress=False)
    page = path.read_text()
    assert_offline(page)
    for key in ("cartography", "trajectories", "histograms", "selection"):
        assert f'<section id="{key}">' in page, key
    assert run.trace is not None and run.trace_epochs == [0, 1, 2]
    dyn = pd.read_parquet(tmp_path / "training_dynamics.parquet").dropna(subset=["aum"])
    assert f"<td>aum</td><td>lower</td><td>{roc_auc_score(dyn['noisy'], -dyn['aum']):.3f}</td>" in page


# ------------------------------------------------------------------------------ a real browser
def _chromium():
    return next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(name)), None)


@pytest.mark.slow
def test_page_renders_in_headless_chromium_without_network(tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium / chromium-browser binary on PATH: install Debian's `chromium` package to check "
                    "that the report renders in a real browser")
    from PIL import Image

    _, page = build_report(make_run(tmp_path / "run"), tmp_path / "page.html", top=5, progress=False)
    shot = tmp_path / "shot.png"
    cmd = [browser, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars",
           f"--user-data-dir={tmp_path / 'profile'}",
           "--host-resolver-rules=MAP * ~NOTFOUND", f"--screenshot={shot}", "--window-size=1280,2400",
           page.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert shot.is_file() and shot.stat().st_size > 30_000, proc.stderr[-2000:]
    with Image.open(shot) as im:
        assert im.size == (1280, 2400)
        gray = np.asarray(im.convert("L"), dtype=float)
    assert gray.std() > 15  # not a blank page
    background = np.bincount(gray.astype(int).ravel()).argmax()
    assert (np.abs(gray - background) > 30).mean() > 0.05  # figures and text cover a real share of the page
