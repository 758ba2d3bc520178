"""``lightning-select report RUN_DIR``: a console summary and one offline HTML page of a training run.

The page embeds, where the run has the data: the cartography map (variability against confidence,
coloured by correctness), the loss trajectories of the most-flagged samples, per-sample loss histograms
by epoch, GIST's masked fraction and most-flagged false-negative pairs (with their texts, read from the
run's dataset), the kept fraction and weight statistics of selection runs, DBPM's flags, and why any
statistic is unavailable. Figures are base64 PNGs inside the file: it opens with no network.

Modules: :mod:`~lightning_select.report.run` (read and cross-check the run directory),
:mod:`~lightning_select.report.figures` (numbers and figures), :mod:`~lightning_select.report.facts`
(summary numbers), :mod:`~lightning_select.report.page` (sections and HTML), ``__main__`` (the command).

Example::

    >>> from lightning_select.report import build_report
    >>> run, page = build_report("outputs/train/runs/<date>")  # doctest: +SKIP
"""

from lightning_select.report.facts import headline, run_facts, summary_text
from lightning_select.report.page import build_report
from lightning_select.report.run import ReportError, RunData, load_run

__all__ = ["ReportError", "RunData", "build_report", "headline", "load_run", "run_facts", "summary_text"]
