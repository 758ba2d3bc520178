"""The command line: ``python -m lightning_select.report RUN_DIR`` and ``lightning-select report RUN_DIR``.

Example::

    >>> main(["--help"])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    SystemExit: 0
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def _add_report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a training run's output folder (holding loss_history.parquet and/or "
                        "training_dynamics.parquet)")
    parser.add_argument("--out", default=None, help="where to write the page (default: RUN_DIR/report.html)")
    parser.add_argument("--top", type=int, default=20, help="samples and pairs to list and plot (default: 20)")
    parser.add_argument("--data-dir", default=None, help="the data folder of the run's dataset, when it differs "
                        "from the config's paths.data_dir")
    parser.add_argument("--no-data", action="store_true", help="do not load the run's dataset (no texts, no "
                        "dataset-size check)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _report(args: argparse.Namespace) -> int:
    from lightning_select.report.facts import summary_text
    from lightning_select.report.page import build_report
    from lightning_select.report.run import ReportError

    if args.top < 1:
        print(f"error: --top must be >= 1 (samples and pairs listed), but got {args.top}.", file=sys.stderr)
        return 2
    try:
        run, path = build_report(args.run_dir, args.out, args.top, args.data_dir, not args.no_data,
                                 progress=not args.quiet)
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(summary_text(run, str(path)))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m lightning_select.report RUN_DIR [--out report.html] [--top 20]``."""
    parser = argparse.ArgumentParser(prog="python -m lightning_select.report",
                                     description="Summarise a training run and write an offline HTML report.")
    _add_report_arguments(parser)
    return _report(parser.parse_args(argv))


def cli(argv: Optional[Sequence[str]] = None) -> int:
    """The ``lightning-select`` console script: ``lightning-select report RUN_DIR [...]``."""
    parser = argparse.ArgumentParser(prog="lightning-select", description="lightning_select tools.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_report_arguments(commands.add_parser("report", help="summarise a run and write an offline HTML page"))
    args = parser.parse_args(argv)
    return _report(args)


if __name__ == "__main__":
    sys.exit(main())
