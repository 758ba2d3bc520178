"""The report's numbers and figures: pure functions of numpy arrays and pandas tables.

The helpers (:func:`trace_matrix`, :func:`flag_counts`, :func:`top_pairs`, :func:`most_flagged`,
:func:`metric_series`) compute what the figures show and are tested on their own; the ``*_png`` functions
draw one matplotlib figure (Agg backend) and return it as PNG bytes, ready to embed in the page.
"""

from __future__ import annotations

import io
import re
from typing import Any, Optional, Sequence

import numpy as np

_TRACE = re.compile(r"^loss_epoch_(\d+)$")


def trace_matrix(frame: Any, pattern: re.Pattern = _TRACE) -> tuple[list[int], np.ndarray]:
    """``(epochs, values [N, E])`` from a history's ``loss_epoch_{e}`` columns, sorted by epoch.

    Example::

        >>> import pandas as pd
        >>> epochs, values = trace_matrix(pd.DataFrame({"loss_epoch_3": [1.0, 2.0], "loss_epoch_1": [3.0, 4.0]}))
        >>> epochs, values.tolist()
        ([1, 3], [[3.0, 1.0], [4.0, 2.0]])
    """
    found = sorted((int(m.group(1)), name) for name in frame.columns if (m := pattern.match(str(name))))
    if not found:
        return [], np.zeros((len(frame), 0))
    return [e for e, _ in found], np.stack([frame[name].to_numpy(dtype=float) for _, name in found], axis=1)


def flag_counts(pairs: Any, num_samples: int) -> np.ndarray:
    """How many times each sample was flagged as another row's false negative (its ``candidate_index`` count).

    Example::

        >>> import pandas as pd
        >>> flag_counts(pd.DataFrame({"anchor_index": [0, 1, 2], "candidate_index": [1, 1, 0]}), 3).tolist()
        [1, 2, 0]
    """
    return np.bincount(pairs["candidate_index"].to_numpy(dtype=np.int64), minlength=num_samples)


def top_pairs(pairs: Any, k: int) -> Any:
    """The ``k`` sample pairs flagged most often, as unordered pairs ``first < second``.

    Columns: ``first``, ``second``, ``times`` (flags in either direction, any block), ``batches``
    (distinct steps with a flag), ``blocks`` (the blocks seen, e.g. ``"aa,ap"``), ``guide_score`` (mean).
    Ties go to the smaller indices.

    Example::

        >>> import pandas as pd
        >>> pairs = pd.DataFrame({"anchor_index": [4, 2, 2, 7], "candidate_index": [2, 4, 4, 1],
        ...                       "block": ["ap", "ap", "aa", "ap"], "guide_score": [0.9, 0.8, 0.7, 0.5],
        ...                       "step": [0, 5, 5, 5]})
        >>> top_pairs(pairs, 1).to_dict("records")
        [{'first': 2, 'second': 4, 'times': 3, 'batches': 2, 'blocks': 'aa,ap', 'guide_score': 0.8}]
    """
    import pandas as pd

    a = pairs["anchor_index"].to_numpy(dtype=np.int64)
    c = pairs["candidate_index"].to_numpy(dtype=np.int64)
    frame = pd.DataFrame({"first": np.minimum(a, c), "second": np.maximum(a, c),
                          "block": pairs["block"].astype(str) if "block" in pairs else "?",
                          "step": pairs["step"] if "step" in pairs else -1,
                          "guide_score": pairs["guide_score"] if "guide_score" in pairs else np.nan})
    grouped = frame.groupby(["first", "second"], sort=True).agg(
        times=("block", "size"), batches=("step", "nunique"), blocks=("block", lambda b: ",".join(sorted(set(b)))),
        guide_score=("guide_score", "mean"))
    grouped = grouped.reset_index().sort_values(["times", "first", "second"], ascending=[False, True, True],
                                                kind="stable")
    out = grouped.head(k).reset_index(drop=True)
    out["guide_score"] = out["guide_score"].astype(float).round(6)
    return out


def most_flagged(score: np.ndarray, k: int, highest: bool = True) -> np.ndarray:
    """Indices of the ``k`` samples with the highest (or lowest) finite ``score``; ties go to smaller indices.

    Example::

        >>> most_flagged(np.array([0.5, np.nan, 3.0, 3.0, -1.0]), 2).tolist()
        [2, 3]
        >>> most_flagged(np.array([0.5, np.nan, 3.0, 3.0, -1.0]), 2, highest=False).tolist()
        [4, 0]
    """
    score = np.asarray(score, dtype=float)
    finite = np.flatnonzero(np.isfinite(score))
    key = -score[finite] if highest else score[finite]
    return finite[np.lexsort((finite, key))][:k]


def metric_series(metrics: Any, pattern: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{column: (steps, values)}`` for every metrics column matching the regex ``pattern`` (NaN rows dropped).

    Example::

        >>> import pandas as pd
        >>> m = pd.DataFrame({"step": [4, 9, 9], "sb/kept_fraction": [0.5, None, 0.25], "epoch": [0, 0, 0]})
        >>> {k: (s.tolist(), v.tolist()) for k, (s, v) in metric_series(m, r"kept_fraction$").items()}
        {'sb/kept_fraction': ([4, 9], [0.5, 0.25])}
    """
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if metrics is None or "step" not in metrics:
        return out
    for name in sorted(c for c in metrics.columns if re.search(pattern, str(c))):
        rows = metrics[["step", name]].dropna()
        if len(rows):
            out[name] = (rows["step"].to_numpy(dtype=np.int64), rows[name].to_numpy(dtype=float))
    return out


# ------------------------------------------------------------------------------------------ figures
def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> bytes:
    plt = _pyplot()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, metadata={"Software": None})
    plt.close(fig)
    return buffer.getvalue()


def cartography_png(variability: np.ndarray, confidence: np.ndarray, correctness: np.ndarray,
                    noisy: Optional[np.ndarray] = None) -> bytes:
    """Variability (x) against confidence (y), coloured by correctness; truly mislabelled samples ringed."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5.6))
    points = ax.scatter(variability, confidence, c=correctness, cmap="coolwarm_r", vmin=0, vmax=1, s=7,
                        alpha=0.75, linewidths=0)
    fig.colorbar(points, ax=ax, label="correctness (share of epochs correct)")
    if noisy is not None and bool(np.any(noisy)):
        bad = np.asarray(noisy, dtype=bool)
        ax.scatter(variability[bad], confidence[bad], s=16, facecolors="none", edgecolors="black",
                   linewidths=0.6, label=f"mislabelled ({int(bad.sum())})")
        ax.legend(loc="lower right")
    ax.set(xlabel="variability (std of p(true label) over epochs)", ylabel="confidence (mean p(true label))",
           title=f"Data map of {len(confidence)} samples")
    box = {"facecolor": "white", "alpha": 0.8, "edgecolor": "none"}
    ax.text(0.02, 0.97, "easy to learn", transform=ax.transAxes, va="top", color="dimgray", bbox=box)
    ax.text(0.02, 0.03, "hard to learn", transform=ax.transAxes, va="bottom", color="dimgray", bbox=box)
    ax.text(0.98, 0.5, "ambiguous", transform=ax.transAxes, ha="right", color="dimgray", bbox=box)
    return _png(fig)


def trajectories_png(epochs: Sequence[int], values: np.ndarray, chosen: np.ndarray, ylabel: str,
                     title: str) -> bytes:
    """One line per chosen sample across epochs, over the 10–90% band and median of all samples."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 3.8))
    x = np.asarray(epochs)
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # an epoch in which no sample was seen
            low, mid, high = np.nanquantile(values, [0.1, 0.5, 0.9], axis=0)
    ax.fill_between(x, low, high, color="lightgray", label="10–90% of all samples")
    ax.plot(x, mid, color="gray", lw=2, label="median of all samples")
    colours = plt.cm.viridis(np.linspace(0, 0.9, max(len(chosen), 1)))
    for colour, i in zip(colours, chosen):
        ax.plot(x, values[i], marker=".", lw=1, color=colour, alpha=0.85)
    ax.plot([], [], color=colours[0], lw=1, label=f"{len(chosen)} chosen samples")
    ax.set(xlabel="epoch", ylabel=ylabel, title=title)
    ax.set_xticks(x)
    ax.legend(loc="upper right", fontsize=8)
    return _png(fig)


def epoch_histograms_png(epochs: Sequence[int], values: np.ndarray, max_panels: int = 8) -> bytes:
    """Per-sample loss histograms, one small panel per epoch (evenly spaced epochs beyond ``max_panels``)."""
    plt = _pyplot()
    keep = np.unique(np.linspace(0, len(epochs) - 1, min(len(epochs), max_panels)).round().astype(int))
    finite = values[np.isfinite(values)]
    bins = np.linspace(finite.min(), finite.max(), 41) if finite.size else np.linspace(0, 1, 41)
    cols = min(len(keep), 4)
    rows = int(np.ceil(len(keep) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(10, 2.4 * rows), sharex=True, sharey=True, squeeze=False)
    for ax in axes.flat[len(keep):]:
        ax.set_visible(False)
    for ax, k in zip(axes.flat, keep):
        column = values[:, k][np.isfinite(values[:, k])]
        ax.hist(column, bins=bins, color="tab:blue", alpha=0.8)
        median = float(np.median(column)) if column.size else float("nan")
        ax.set_title(f"epoch {epochs[k]} (n={column.size}, median {median:.3g})", fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("per-sample loss")
    for ax in axes[:, 0]:
        ax.set_ylabel("samples")
    return _png(fig)


def lines_png(series: dict[str, tuple[np.ndarray, np.ndarray]], ylabel: str, title: str) -> bytes:
    """Logged metrics against the global step, one line each."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 3.4))
    for name, (steps, values) in series.items():
        ax.plot(steps, values, marker="." if len(steps) < 60 else None, lw=1.2, label=name)
    ax.set(xlabel="global step", ylabel=ylabel, title=title)
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    return _png(fig)


def dbpm_png(mean_loss: np.ndarray, flag: np.ndarray, weight: Optional[np.ndarray],
             cuts: Optional[tuple[float, float]] = None) -> bytes:
    """DBPM: the mean-loss histogram split by flag (ok / noisy / faulty) with the two cut-offs ``cuts``
    (``μ − β_np·σ``, ``μ + β_fp·σ``) when known, and the weights against the loss."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    finite = np.isfinite(mean_loss)
    bins = np.linspace(mean_loss[finite].min(), mean_loss[finite].max(), 41) if finite.any() else 10
    for code, (name, colour) in enumerate((("ok", "tab:blue"), ("noisy", "tab:orange"), ("faulty", "tab:red"))):
        chosen = finite & (flag == code)
        left.hist(mean_loss[chosen], bins=bins, color=colour, alpha=0.75, label=f"{name} ({int(chosen.sum())})")
        if weight is not None:
            right.scatter(mean_loss[chosen], weight[chosen], color=colour, s=6, label=name)
    for cut in cuts or ():
        left.axvline(cut, color="black", ls="--", lw=1)
    left.set(xlabel="mean loss over the history", ylabel="pairs", title="DBPM flags",
             yscale="log" if finite.any() else "linear")
    left.legend(fontsize=8)
    if weight is not None:
        right.set(xlabel="mean loss over the history", ylabel="weight", title="DBPM weights")
    else:
        right.set_visible(False)
    return _png(fig)


def flag_hist_png(counts: np.ndarray) -> bytes:
    """How often samples were flagged as a false negative (log-scaled sample counts)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 3.0))
    ax.hist(counts, bins=min(50, max(int(counts.max()) + 1, 2)), color="tab:purple", alpha=0.8)
    ax.set(xlabel="times flagged as another row's false negative", ylabel="samples", yscale="log",
           title=f"GIST flags per sample ({int((counts > 0).sum())} of {counts.size} samples flagged at least once)")
    return _png(fig)
