"""`natgrad compare`: train every optimizer of the lineup on the same data, then report.

    natgrad compare [--optimizers a,b,...] [--out results/<dataset>] [data/model/run options]

Writes results.json, table.md and curves.png to ``--out`` (`natgrad.experiments.report`).
"""

from __future__ import annotations

import os

from natgrad.experiments import session

__all__ = ["HELP", "add_arguments", "run"]

HELP = "train every optimizer of the lineup, then report"


def add_arguments(p) -> None:
    from natgrad.experiments import lineup, options

    options.add_common(p)
    p.add_argument(
        "--optimizers",
        help=f"comma-separated (default: all: {','.join(lineup.default_lineup())})",
    )
    p.add_argument("--out", help="output directory (default: results/<dataset>)")


def run(args) -> int:
    from natgrad.experiments import lineup

    if args.optimizers is None:
        names = lineup.default_lineup()
    else:
        names = lineup.check_names(n.strip() for n in args.optimizers.split(",") if n.strip())
    out = args.out or os.path.join("results", args.dataset)
    with session.claimed((out, "--out")):
        record, results, seconds, _ = session.train_all(args, names, out)
        return session.report(out, record, results, seconds)
