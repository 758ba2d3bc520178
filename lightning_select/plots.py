"""Plots of what the policies did (matplotlib, Agg backend; install the ``plots`` extra).

Example::

    >>> import torch, tempfile, os
    >>> from lightning_select import SampleLossStore
    >>> store = SampleLossStore(50, trace_epochs=3)
    >>> for e in range(3):
    ...     store.update(torch.arange(50), torch.rand(50) / (e + 1), step=e, epoch=e)
    >>> path = plot_loss_history(store, os.path.join(tempfile.mkdtemp(), "history.png"))
    >>> os.path.getsize(path) > 0
    True
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

import torch
from torch import Tensor

from lightning_select.stats.history import SampleLossStore


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Union[str, Path]) -> Path:
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_loss_history(store: SampleLossStore, path: Union[str, Path]) -> Path:
    """Two panels: the per-epoch loss distribution (median and 10–90% band, from the trace) and a
    histogram of every seen sample's EMA loss."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    epochs, trace = store.epoch_trace()
    if epochs.numel():
        q = torch.tensor([0.1, 0.5, 0.9])
        bands = torch.stack([torch.nanquantile(trace[:, k], q) for k in range(trace.shape[1])])
        x = epochs.numpy()
        left.fill_between(x, bands[:, 0].numpy(), bands[:, 2].numpy(), alpha=0.3, label="10–90% of samples")
        left.plot(x, bands[:, 1].numpy(), marker="o", label="median")
        left.legend()
    else:
        left.text(0.5, 0.5, "no trace (set trace_epochs)", ha="center", va="center", transform=left.transAxes)
    left.set(xlabel="epoch", ylabel="per-sample loss", title="loss per epoch")
    seen = store.count > 0
    right.hist(store.ema_loss[seen].numpy(), bins=50)
    right.set(xlabel="EMA loss", ylabel="samples", title=f"EMA loss of {int(seen.sum())} seen samples")
    return _save(plt, fig, path)


def plot_flagged_pairs(pairs: dict[str, Tensor], path: Union[str, Path],
                       block_names: tuple[str, ...] = ("ap", "aa", "pp", "an0")) -> Path:
    """Histogram, per block, of how far each flagged candidate's guide score lies above its row's
    cut-off θ_i (from :meth:`GuidedNegatives.flagged_pairs`): mass near 0 means decisions are close to
    the margin, so small margin changes move many candidates."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    gap = (pairs["guide_score"] - pairs["threshold"]).float()
    for code, name in enumerate(block_names):
        sel = pairs["block"] == code
        if bool(sel.any()):
            ax.hist(gap[sel].numpy(), bins=40, alpha=0.6, label=f"{name} ({int(sel.sum())})")
    ax.set(xlabel="guide score − θ_i", ylabel="flagged candidates", title="GIST: flagged in-batch candidates")
    ax.legend()
    return _save(plt, fig, path)
