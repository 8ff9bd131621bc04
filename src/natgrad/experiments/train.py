"""`natgrad train`: train one optimizer, optionally with checkpoints, and keep its parameters.

    natgrad train --optimizer NAME [--checkpoint-dir DIR [--checkpoint-every 100] [--resume]]
                  [--out results/<dataset>-<optimizer>] [data/model/run options]

Writes what `natgrad compare` writes, plus params.npz (the final parameters), to ``--out``.
"""

from __future__ import annotations

import os

from natgrad.experiments import session
from natgrad.experiments.options import UsageError

__all__ = ["HELP", "add_arguments", "run"]

HELP = "train one optimizer (with checkpoints if asked)"


def add_arguments(p) -> None:
    from natgrad.experiments import lineup, options

    p.add_argument("--optimizer", required=True, choices=lineup.default_lineup())
    options.add_common(p)
    p.add_argument("--checkpoint-dir", help="keep checkpoint.npz there (default: no checkpoints)")
    p.add_argument(
        "--checkpoint-every",
        type=options.positive_int,
        default=100,
        metavar="STEPS",
        help="steps between checkpoints",
    )
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint")
    p.add_argument("--out", help="output directory (default: results/<dataset>-<optimizer>)")


def run(args) -> int:
    from natgrad.experiments import checkpoint

    if args.resume and not args.checkpoint_dir:
        raise UsageError("--resume: needs --checkpoint-dir (where the checkpoint is)")
    out = args.out or os.path.join("results", f"{args.dataset}-{args.optimizer}")
    with session.claimed((out, "--out"), (args.checkpoint_dir, "--checkpoint-dir")):
        record, results, seconds, result = session.train_all(
            args,
            [args.optimizer],
            out,
            checkpoint_dir=args.checkpoint_dir,
            checkpoint_every=args.checkpoint_every,
            resume=args.resume,
        )
        params = result.state.params
        save = (
            "params.npz",
            lambda path: checkpoint.save(path, params, {"optimizer": args.optimizer}),
        )
        return session.report(out, record, results, seconds, {"final parameters": save})
