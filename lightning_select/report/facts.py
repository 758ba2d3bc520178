"""What a run is and its headline numbers, from a :class:`~lightning_select.report.run.RunData`.

Shared by the console summary and the page's overview; every number is computed from the run's own files.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from lightning_select.report.figures import flag_counts, metric_series
from lightning_select.report.run import RunData

DYNAMICS_STATISTICS = ("confidence", "variability", "correctness", "forgetting_events", "aum", "el2n")
# How each statistic ranks a likely mislabelled sample: +1 higher is more suspicious, -1 lower is.
SUSPICION = {"aum": -1, "confidence": -1, "correctness": -1, "forgetting_events": +1, "el2n": +1,
             "variability": +1, "ema_loss": +1}


def short_target(node: Any) -> str:
    """The class name of a config node's ``_target_`` (``"?"`` without one).

    Example::

        >>> short_target({"_target_": "lightning_select.data.DigitsPairsDataModule"})
        'DigitsPairsDataModule'
    """
    target = node.get("_target_") if hasattr(node, "get") else None
    return str(target).removesuffix(".fit").split(".")[-1] if target else "?"  # Class.fit: a classmethod target


def unavailable_statistics(meta: dict) -> dict[str, str]:
    """``{statistic: reason}`` of the statistics a metadata file marks unavailable.

    Accepts ``{"unavailable": {name: reason}}``, ``{"statistics": {"unavailable": {name: reason} or
    [{"name", "reason"}]}}`` and ``{"statistics": {name: {"available": false, "reason": ...}}}``.

    Example::

        >>> unavailable_statistics({"statistics": {"aum": {"available": False, "reason": "no logits"},
        ...                                        "el2n": {"available": True}}})
        {'aum': 'no logits'}
    """
    found: dict[str, str] = {}
    stats = meta.get("statistics")
    for source in (meta.get("unavailable"), stats.get("unavailable") if isinstance(stats, dict) else None):
        if isinstance(source, dict):
            found.update({str(k): str(v) for k, v in source.items()})
        elif isinstance(source, list):
            for entry in source:
                if isinstance(entry, dict) and "name" in entry:
                    found[str(entry["name"])] = str(entry.get("reason", "no reason given"))
                elif isinstance(entry, str):
                    found[entry] = "no reason given"
    if isinstance(stats, dict):
        for name, entry in stats.items():
            if isinstance(entry, dict) and entry.get("available") is False:
                found[str(name)] = str(entry.get("reason", "no reason given"))
    return found


def roc_auc(score: np.ndarray, positive: np.ndarray) -> float:
    """ROC-AUC of ``score`` ranking the ``positive`` samples first (ties count one half; +inf is the top,
    NaN rows are dropped): the Mann–Whitney U statistic over the rank sums.

    Example::

        >>> roc_auc(np.array([0.9, 0.8, np.inf, 0.1]), np.array([True, False, True, False]))
        1.0
    """
    from scipy.stats import rankdata

    score = np.asarray(score, dtype=float)
    keep = ~np.isnan(score)
    score, positive = score[keep], np.asarray(positive, dtype=bool)[keep]
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(score)  # +inf ranks above every finite score
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def noisy_labels(run: RunData) -> Optional[np.ndarray]:
    """``[N]`` bool, True where the training label differs from the clean one (when any file knows)."""
    if run.dynamics is not None and "noisy" in run.dynamics:
        return run.dynamics["noisy"].to_numpy().astype(bool)
    return None


def detection_aucs(run: RunData) -> dict[str, float]:
    """ROC-AUC with which each statistic ranks the truly mislabelled samples first."""
    noisy = noisy_labels(run)
    if noisy is None:
        return {}
    out = {}
    for name, sign in SUSPICION.items():
        for frame in (run.dynamics, run.history):
            if frame is not None and name in frame and np.isfinite(frame[name].to_numpy(dtype=float)).any():
                out[name] = roc_auc(sign * frame[name].to_numpy(dtype=float), noisy)
                break
    return out


def run_facts(run: RunData) -> dict[str, str]:
    """What the run is: dataset, size, epochs, seed, policies and statistics."""
    cfg, meta = run.config, run.dynamics_meta
    facts = {"run": run.run_dir.resolve().name}
    dataset = short_target(cfg.data) if cfg is not None and cfg.get("data") is not None else meta.get("dataset")
    facts["dataset"] = f"{dataset or 'unknown'} ({run.num_samples} training samples)"
    seen = []
    if run.history is not None and "last_epoch" in run.history and (run.history["last_epoch"] >= 0).any():
        seen.append(f"{int(run.history['last_epoch'].max()) + 1} trained")
    if meta.get("epochs") is not None:
        seen.append(f"{meta['epochs']} in the dynamics")
    if cfg is not None and cfg.get("trainer") is not None and cfg.trainer.get("max_epochs") is not None:
        seen.append(f"max_epochs={cfg.trainer.max_epochs}")
    facts["epochs"] = ", ".join(seen) or "unknown"
    seed = cfg.get("seed") if cfg is not None else meta.get("seed")
    facts["seed"] = "unknown" if seed is None else str(seed)
    selector = (cfg.get("selector") if cfg is not None else None) or {}
    facts["policies"] = ", ".join(f"{name} ({short_target(node)})" for name, node in selector.items()) or (
        "none (plain training)" if cfg is not None else "unknown (no config)")
    stats = []
    if run.history is not None:
        epochs = [c for c in run.history.columns if str(c).startswith("loss_epoch_")]
        stats.append(f"loss history ({len(epochs)}-epoch trace)" if epochs else "loss history (no trace)")
    if run.dynamics is not None:
        present = [s for s in DYNAMICS_STATISTICS if s in run.dynamics]
        stats.append(f"training dynamics: {', '.join(present) or 'none'}")
    if run.dbpm is not None:
        stats.append("DBPM flags")
    if run.pairs is not None:
        stats.append(f"GIST flagged pairs ({len(run.pairs)})")
    if run.metrics is not None:
        stats.append("logged metrics")
    facts["statistics"] = "; ".join(stats)
    return facts


def _mean_of(series: dict[str, tuple[np.ndarray, np.ndarray]]) -> str:
    return ", ".join(f"{name} {float(np.mean(values)):.3f}" for name, (_, values) in series.items())


def headline(run: RunData) -> dict[str, str]:
    """The numbers that say what happened (shares, means), each labelled."""
    out: dict[str, str] = {}
    n = run.num_samples
    if run.history is not None and "count" in run.history:
        seen = run.history["count"].to_numpy() > 0
        out["samples seen"] = f"{seen.mean():.1%}"
        ema = run.history["ema_loss"].to_numpy(dtype=float)[seen] if "ema_loss" in run.history else np.zeros(0)
        if np.isfinite(ema).any():
            out["mean EMA loss"] = f"{float(np.nanmean(ema)):.4f}"
    if run.pairs is not None:
        counts = flag_counts(run.pairs, n)
        out["samples flagged as a false negative"] = f"{(counts > 0).mean():.1%} ({len(run.pairs)} flagged pairs)"
    elif run.history is not None and "stat_false_negatives" in run.history:
        share = float((run.history["stat_false_negatives"].to_numpy() > 0).mean())
        out["samples whose row masked a false negative"] = f"{share:.1%}"
    masked = metric_series(run.metrics, r"^gist/masked_fraction_")
    if masked:
        out["mean masked fraction"] = _mean_of(masked)
    kept = metric_series(run.metrics, r"/kept_fraction$")
    if kept:
        out["mean kept fraction"] = _mean_of(kept)
    ess = metric_series(run.metrics, r"/(weight_)?ess_fraction$")
    if ess:
        out["mean weight ESS fraction"] = _mean_of(ess)
    if run.dbpm is not None and "flag" in run.dbpm:
        flag = run.dbpm["flag"].to_numpy()
        out["DBPM flags"] = f"noisy {(flag == 1).mean():.1%}, faulty {(flag == 2).mean():.1%}"
    if run.dynamics is not None:
        if "forgetting_events" in run.dynamics:
            out["never learned"] = f"{np.isposinf(run.dynamics['forgetting_events'].to_numpy(dtype=float)).mean():.1%}"
        noisy = noisy_labels(run)
        if noisy is not None:
            out["truly mislabelled"] = f"{noisy.mean():.1%}"
        aucs = detection_aucs(run)
        if aucs:
            best = max((k for k in aucs if np.isfinite(aucs[k])), key=aucs.get, default=None)
            if best is not None:
                out["best mislabel detector"] = f"{best} (ROC-AUC {aucs[best]:.3f})"
    return out


def summary_text(run: RunData, out_path: Optional[str] = None) -> str:
    """The console summary: the run's facts, its headline numbers, and what was not available."""
    lines = [f"lightning-select report: {run.run_dir}"]
    lines += [f"  {key:<10} {value}" for key, value in run_facts(run).items() if key != "run"]
    numbers = headline(run)
    if numbers:
        lines.append("  headline:")
        lines += [f"    {key}: {value}" for key, value in numbers.items()]
    for name, reason in unavailable_statistics(run.dynamics_meta).items():
        lines.append(f"  unavailable: {name}: {reason}")
    lines += [f"  note: {note}" for note in run.notes]
    if out_path:
        lines.append(f"  page: {out_path}")
    return "\n".join(lines)
