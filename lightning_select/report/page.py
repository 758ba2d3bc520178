"""The report page: one self-contained HTML file (inline CSS, figures as base64 PNG data URIs, no scripts).

Each ``section_*`` function turns a :class:`~lightning_select.report.run.RunData` into one section, or
``None`` when the run has no data for it; :func:`build_report` runs them under a progress bar and
writes the page.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np

from lightning_select.report import facts
from lightning_select.report import figures as fig
from lightning_select.report.run import RunData, describe_sample, load_run

GOLD_KEYS = ("anchor_cluster", "cluster", "clean_label", "label")


@dataclass
class Section:
    key: str
    title: str
    body: str


def _e(value: Any) -> str:
    return html.escape(str(value))


def image(png: bytes, alt: str, caption: str = "") -> str:
    """An ``<img>`` holding the PNG itself (a ``data:`` URI): the page needs no other file and no network."""
    data = base64.b64encode(png).decode("ascii")
    cap = f"<figcaption>{_e(caption)}</figcaption>" if caption else ""
    return f'<figure><img alt="{_e(alt)}" src="data:image/png;base64,{data}">{cap}</figure>'


def table(header: Optional[list[str]], rows: list[list[Any]]) -> str:
    """An HTML table of escaped cells (no header row when ``header`` is None)."""
    head = "" if header is None else "<thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr></thead>"
    body = "".join("<tr>" + "".join(f"<td>{_e(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table>{head}<tbody>{body}</tbody></table>"


def folded(title: str, content: str) -> str:
    """A collapsible block (``<details>``), for long tables."""
    return f"<details><summary>{_e(title)}</summary>{content}</details>"


def _note(text: str) -> str:
    return f'<p class="note">{_e(text)}</p>'


# ----------------------------------------------------------------------------------------- sections
def section_overview(run: RunData, top: int) -> Section:
    rows = [[k, v] for k, v in facts.run_facts(run).items()]
    numbers = [[k, v] for k, v in facts.headline(run).items()]
    body = table(None, rows)
    if numbers:
        body += "<h3>Headline numbers</h3>" + table(None, numbers)
    body += f'<p class="small">Files read: {_e(", ".join(run.files))}</p>'
    return Section("overview", "Run", body)


def section_cartography(run: RunData, top: int) -> Optional[Section]:
    frame = run.dynamics
    if frame is None:
        return None
    need = ("variability", "confidence", "correctness")
    if not all(k in frame for k in need) or not np.isfinite(frame["confidence"].to_numpy(dtype=float)).any():
        return Section("cartography", "Cartography", _note(
            "The dynamics table has no finite confidence/variability/correctness (see Unavailable statistics)."))
    noisy = facts.noisy_labels(run)
    png = fig.cartography_png(*(frame[k].to_numpy(dtype=float) for k in need), noisy)
    body = image(png, "cartography map", "Each dot is one training sample. Low confidence with low variability: "
                 "hard to learn (often mislabelled); high variability: ambiguous.")
    aucs = facts.detection_aucs(run)
    if aucs:
        rows = [[name, "lower" if facts.SUSPICION[name] < 0 else "higher", f"{auc:.3f}"]
                for name, auc in sorted(aucs.items(), key=lambda kv: -np.nan_to_num(kv[1], nan=-1))]
        body += (f"<h3>How well each statistic finds the {int(noisy.sum())} mislabelled samples</h3>"
                 + table(["statistic", "suspicious when", "ROC-AUC"], rows))
    return Section("cartography", "Cartography", body)


def flag_ranking(run: RunData) -> tuple[np.ndarray, str]:
    """Per-sample suspicion (higher = more flagged) and what it is, from the strongest signal the run has."""
    n = run.num_samples
    if run.dynamics is not None and "aum" in run.dynamics and np.isfinite(run.dynamics["aum"]).any():
        return -run.dynamics["aum"].to_numpy(dtype=float), "lowest AUM"
    if run.dbpm is not None and {"flag", "mean_loss"} <= set(run.dbpm.columns) and (run.dbpm["flag"] > 0).any():
        loss = run.dbpm["mean_loss"].to_numpy(dtype=float)
        flagged = run.dbpm["flag"].to_numpy() > 0
        return np.where(flagged, np.abs(loss - np.nanmean(loss)), -np.inf), "DBPM-flagged, farthest from the mean loss"
    if run.pairs is not None and len(run.pairs):
        return fig.flag_counts(run.pairs, n).astype(float), "most often flagged as a GIST false negative"
    if run.history is not None and "stat_false_negatives" in run.history:
        return run.history["stat_false_negatives"].to_numpy(dtype=float), "most masked false negatives in their row"
    if run.history is not None and "ema_loss" in run.history:
        return run.history["ema_loss"].to_numpy(dtype=float), "highest EMA loss"
    return np.zeros(n), "first samples"


def section_trajectories(run: RunData, top: int) -> Optional[Section]:
    score, criterion = flag_ranking(run)
    chosen = fig.most_flagged(score, top)
    body = ""
    if run.history is not None:
        epochs, values = fig.trace_matrix(run.history)
        if len(epochs) >= 2:
            body += image(fig.trajectories_png(epochs, values, chosen, "per-sample loss",
                                               f"Loss of the {len(chosen)} most-flagged samples ({criterion})"),
                          "loss trajectories", "From the loss history's per-epoch trace.")
        else:
            body += _note("The loss history has fewer than 2 trace epochs: train with "
                          "selector.loss_history.trace_epochs=K (K ≥ 2) for loss trajectories.")
    if run.trace is not None and run.trace.shape[1] >= 2:
        body += image(fig.trajectories_png(run.trace_epochs, np.asarray(run.trace), chosen, "p(true label)",
                                           f"p(true label) of the {len(chosen)} most-flagged samples ({criterion})"),
                      "p(true) trajectories", "From training_dynamics_trace.npy.")
    if not body:
        return None
    rows = [[int(i), f"{score[i]:.4g}"] + _describe(run, int(i)) for i in chosen[:top]]
    body += folded(f"The {len(chosen)} samples ({criterion})", table(["index", "score", "sample"], rows))
    return Section("trajectories", "Loss trajectories of the most-flagged samples", body)


def section_histograms(run: RunData, top: int) -> Optional[Section]:
    if run.history is None:
        return None
    epochs, values = fig.trace_matrix(run.history)
    if epochs:
        return Section("histograms", "Per-sample loss by epoch", image(
            fig.epoch_histograms_png(epochs, values), "loss histograms by epoch",
            "Histogram of each sample's last loss in each traced epoch (common bins)."))
    return Section("histograms", "Per-sample loss by epoch", _note(
        "No per-epoch trace in loss_history (trace_epochs=0): set selector.loss_history.trace_epochs=K."))


def _describe(run: RunData, index: int) -> list[str]:
    if run.dataset is None:
        return ["(dataset not loaded)"]
    fields = describe_sample(run.dataset, index)
    return ["; ".join(f"{k}: {v}" for k, v in fields.items()) or "(no text or scalar fields)"]


def section_gist(run: RunData, top: int) -> Optional[Section]:
    masked = fig.metric_series(run.metrics, r"^gist/(masked|attracted)_fraction_")
    if run.pairs is None and not masked:
        return None
    body = ""
    if masked:
        body += image(fig.lines_png(masked, "share of candidates", "GIST: masked fraction over training"),
                      "masked fraction", "Share of in-batch candidates masked as false negatives, per block.")
    if run.pairs is None:
        body += _note("No flagged_pairs.parquet: set selector.gist.flagged_pairs_path to list the flagged pairs.")
        return Section("gist", "GIST false negatives", body)
    counts = fig.flag_counts(run.pairs, run.num_samples)
    if counts.any():
        body += image(fig.flag_hist_png(counts), "flags per sample")
    best = fig.top_pairs(run.pairs, top)
    gold = None
    if run.dataset is not None and len(best):
        first = describe_sample(run.dataset, int(best["first"].iloc[0]))
        gold = next((k for k in GOLD_KEYS if k in first), None)
    rows = []
    for record in best.to_dict("records"):
        a, b = int(record["first"]), int(record["second"])
        row = [a, b, record["times"], record["batches"], record["blocks"], f"{record['guide_score']:.3f}"]
        if run.dataset is not None:
            fa, fb = describe_sample(run.dataset, a), describe_sample(run.dataset, b)
            texts = [_pair_text(fa), _pair_text(fb)]
            row += texts + ([("yes" if fa.get(gold) == fb.get(gold) else "no")] if gold else [])
        rows.append(row)
    header = ["sample i", "sample j", "times flagged", "in batches", "blocks", "mean guide score"]
    if run.dataset is not None:
        header += ["sample i", "sample j"] + ([f"same {gold}"] if gold else [])
    body += f"<h3>The {len(rows)} most-flagged false-negative pairs</h3>" + table(header, rows)
    if run.dataset is None:
        body += _note("Texts are not shown: the run's dataset was not loaded (see Notes).")
    return Section("gist", "GIST false negatives", body)


def _pair_text(fields: dict[str, str]) -> str:
    texts = {k: v for k, v in fields.items() if k in ("anchor", "positive", "text")}
    return " ⟷ ".join(texts.values()) if texts else ", ".join(f"{k}={v}" for k, v in fields.items())


def section_selection(run: RunData, top: int) -> Optional[Section]:
    kept = fig.metric_series(run.metrics, r"/(kept_fraction|kept_share)$")
    weights = fig.metric_series(run.metrics, r"/(weight_mean|weight_ess|weight_ess_fraction|ess_fraction|"
                                r"max_mean_ratio|weight_max)$")
    varies = [name for name, (_, v) in {**kept, **weights}.items() if np.ptp(v) > 0 or abs(v[0] - 1.0) > 1e-9]
    if not varies:
        if kept or weights:
            return Section("selection", "Selection and weights", _note(
                "Every sample was kept with weight 1 throughout (no selection or weighting policy acted)."))
        return None
    body = ""
    if any(name in kept for name in varies):
        body += image(fig.lines_png(kept, "kept fraction", "Kept fraction over training"), "kept fraction")
    elif kept:
        body += _note("Every sample was kept throughout (kept fraction 1); the weights below varied.")
    if weights:
        body += image(fig.lines_png(weights, "value", "Weight statistics over training"), "weight statistics",
                      "weight_mean: mean weight; *ess_fraction: Kish effective sample size / rows; "
                      "max_mean_ratio: largest weight over the mean.")
    return Section("selection", "Selection and weights", body)


def section_dbpm(run: RunData, top: int) -> Optional[Section]:
    if run.dbpm is None or not {"mean_loss", "flag"} <= set(run.dbpm.columns):
        return None
    weight = run.dbpm["weight"].to_numpy(dtype=float) if "weight" in run.dbpm else None
    meta = run.dbpm_meta
    cuts = None
    if all(isinstance(meta.get(k), (int, float)) for k in ("mu", "sigma", "beta_np", "beta_fp")):
        cuts = (meta["mu"] - meta["beta_np"] * meta["sigma"], meta["mu"] + meta["beta_fp"] * meta["sigma"])
    body = image(fig.dbpm_png(run.dbpm["mean_loss"].to_numpy(dtype=float), run.dbpm["flag"].to_numpy(), weight, cuts),
                 "DBPM", "Noisy pairs: mean loss ≤ μ − β_np·σ; faulty pairs: ≥ μ + β_fp·σ (dashed lines). "
                 "Right: each pair's weight in the last step it was trained.")
    shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in meta.items()
             if isinstance(v, (int, float, str, bool))}
    if shown:
        body += folded("DBPM settings and counts", table(["setting", "value"], [[k, v] for k, v in shown.items()]))
    return Section("dbpm", "DBPM bad positive pairs", body)


def section_unavailable(run: RunData, top: int) -> Optional[Section]:
    missing = facts.unavailable_statistics(run.dynamics_meta)
    missing.update({f"dbpm/{k}": v for k, v in facts.unavailable_statistics(run.dbpm_meta).items()})
    if run.dynamics is not None:
        for name in facts.DYNAMICS_STATISTICS:
            if name not in missing and (name not in run.dynamics
                                        or not np.isfinite(run.dynamics[name].to_numpy(dtype=float)).any()):
                missing[name] = "not in training_dynamics (no reason recorded in its metadata)"
    if not missing:
        return None
    body = "".join(f'<div class="missing"><h3>{_e(name)}</h3><p>{_e(reason)}</p></div>'
                   for name, reason in missing.items())
    return Section("unavailable", "Unavailable statistics", body)


def section_notes(run: RunData, top: int) -> Optional[Section]:
    if not run.notes:
        return None
    return Section("notes", "Notes", "<ul>" + "".join(f"<li>{_e(n)}</li>" for n in run.notes) + "</ul>")


SECTIONS: tuple[Callable[[RunData, int], Optional[Section]], ...] = (
    section_overview, section_cartography, section_trajectories, section_histograms, section_gist,
    section_selection, section_dbpm, section_unavailable, section_notes)

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;background:#f6f7f9;color:#1d2430}
header{background:#25324a;color:#fff;padding:18px 32px}header h1{margin:0;font-size:24px}
header p{margin:4px 0 0;color:#c7d0e0}nav{padding:8px 32px;background:#e9edf3;font-size:14px}
nav a{margin-right:14px;color:#25324a}main{max-width:1080px;margin:0 auto;padding:8px 24px 40px}
section{background:#fff;border:1px solid #dde2ea;border-radius:8px;padding:12px 20px;margin:16px 0}
h2{font-size:19px;margin:6px 0 10px}h3{font-size:15px;margin:14px 0 6px}
figure{margin:8px 0}img{max-width:100%;height:auto}figcaption{font-size:13px;color:#5a6475}
table{border-collapse:collapse;font-size:13px;width:100%}td,th{border-bottom:1px solid #e4e8ee;
padding:4px 8px;text-align:left;vertical-align:top}th{background:#f0f3f7}
.note{background:#fff7e0;border-left:4px solid #e0a800;padding:6px 10px}.small{font-size:12px;color:#5a6475}
details{margin:8px 0}summary{cursor:pointer;font-weight:600;font-size:14px}
.missing{border-left:4px solid #c0392b;padding:2px 10px;margin:8px 0}.missing h3{margin:4px 0}
"""


def render(run: RunData, sections: list[Section]) -> str:
    """The whole page as one string."""
    name = _e(run.run_dir.resolve().name)
    nav = "".join(f'<a href="#{s.key}">{_e(s.title)}</a>' for s in sections)
    body = "".join(f'<section id="{s.key}"><h2>{_e(s.title)}</h2>{s.body}</section>' for s in sections)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>Report: {name}</title>'
            f"<style>{CSS}</style></head><body><header><h1>Training report: {name}</h1>"
            f"<p>{run.num_samples} samples · lightning-select report</p></header><nav>{nav}</nav>"
            f"<main>{body}</main></body></html>")


def build_report(run_dir: Union[str, Path], out: Optional[Union[str, Path]] = None, top: int = 20,
                 data_dir: Optional[str] = None, load_data: bool = True, progress: bool = True) -> tuple[RunData, Path]:
    """Read ``run_dir``, build every section that has data (progress bar on stderr) and write the page.

    ``out`` defaults to ``<run_dir>/report.html``. Returns the run and the page's path.
    """
    from tqdm.auto import tqdm

    if not isinstance(top, int) or isinstance(top, bool) or top < 1:
        raise ValueError(f"Expected `top` to be an int >= 1 (samples and pairs listed), but got {top!r}.")
    bar = tqdm(total=1 + len(SECTIONS), desc="report", unit="step", disable=not progress, leave=False)
    try:
        bar.set_postfix_str("reading the run")
        run = load_run(run_dir, data_dir=data_dir, load_data=load_data)
        bar.update()
        sections = []
        for build in SECTIONS:
            bar.set_postfix_str(build.__name__.replace("section_", ""))
            section = build(run, top)
            if section is not None:
                sections.append(section)
            bar.update()
    finally:
        bar.close()
    path = Path(out) if out is not None else run.run_dir / "report.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(run, sections), encoding="utf-8")
    return run, path
